"""Completion, routing and the job queue, in-process against a real node fed by dcmtk's storescu."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from segnode import pipeline
from segnode.audit.ledger import Ledger
from segnode.audit.trail import verify_connection
from segnode.completion import request_completion
from segnode.db.models import Instance, RoutingDecisionRow, SeriesState
from segnode.flow import JobSpec, input_hash
from segnode.jobs import queue
from segnode.phantom.ct import CTOptions, generate_ct, write_phantom
from tests.conftest import audit_events, dataset_bytes, storescu


@pytest.fixture
def series(tmp_path: Path):
    """Write CT phantom series (default rules route them to the 3D model); same seed = same study."""
    def _write(seed: int = 1, name: str = "ct", slices_mm: float = 60.0, **options) -> list[Path]:
        return write_phantom(generate_ct(seed, CTOptions(matrix=16, slice_spacing=5.0, z_extent_mm=slices_mm,
                                                         **options)), tmp_path / name)
    return _write


def _stage(node, **routing):
    node.settings.routing = node.settings.routing.model_copy(update=routing)
    led = Ledger(node.engine, node.trail)
    return led, pipeline.completion(node.settings, led)


def _routed(node, series, **jobs):
    """A series stored, its study quiet, completed and routed: (ledger, completion), its job queued."""
    if jobs:
        node.settings.jobs = node.settings.jobs.model_copy(update=jobs)
    led, completion = _stage(node, stable_seconds=0.3)
    assert storescu(node.dimse.port, series()).returncode == 0
    time.sleep(0.4)
    completion.poll()
    return led, completion


def _jobs(node, **filters):
    with node.engine.connect() as conn:
        return queue.list_jobs(conn, **filters)


def _series_rows(node):
    with node.engine.connect() as conn:
        return {r.series_uid: r for r in conn.execute(select(SeriesState)).all()}


def _events(node, code):
    return [e for e in audit_events(node) if e.event_id == code]


def test_a_quiet_study_completes_once_and_is_routed_with_the_rule_set_hash(node, series):
    led, completion = _stage(node, stable_seconds=0.5)
    files = series()
    assert storescu(node.dimse.port, files).returncode == 0
    assert completion.poll() == []  # still arriving as far as anyone can tell
    time.sleep(0.6)
    done = completion.poll()
    assert len(done) == 1 and completion.poll() == []
    (job,) = _jobs(node)
    assert job.model == "ct-abdomen-phantom-3d" and job.state == "queued" and job.instances == len(files)
    assert job.rule == "ct-abdomen" and len(job.ruleset_sha256) == 64
    (route,) = _events(node, "SN-ROUTE")
    assert json.loads(route.objects)["ruleset_sha256"] == job.ruleset_sha256 == completion.rules().sha256
    assert len(_events(node, "SN-COMPLETE")) == 1 and len(_events(node, "SN-JOB")) == 1
    with node.engine.connect() as conn:
        assert verify_connection(conn).ok


def test_a_slow_series_is_not_cut_while_its_study_keeps_arriving(node, series):
    led, completion = _stage(node, stable_seconds=1.0)
    files = series()
    for f in files[:4]:  # one instance every 0.6 s: always less than the quiet time apart
        assert storescu(node.dimse.port, [f]).returncode == 0
        assert completion.poll() == []
        time.sleep(0.6)
    assert completion.poll() == []
    time.sleep(0.5)
    assert len(completion.poll()) == 1
    assert _jobs(node)[0].instances == 4


def test_any_instance_of_the_study_restarts_the_clock(node, series):
    led, completion = _stage(node, stable_seconds=1.0)
    first = series()
    assert storescu(node.dimse.port, first).returncode == 0
    time.sleep(0.7)
    second = series(seed=1, name="second", slices_mm=30.0, reversed_order=True)  # same study, its own series
    for path in second:  # a different series UID in the same study
        ds = dcmread(path)
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1432.99"
        ds.SOPInstanceUID = generate_uid(prefix="1.2.826.0.1.3680043.10.1432.", entropy_srcs=[str(path)])
        ds.save_as(path, enforce_file_format=True)
    assert storescu(node.dimse.port, second).returncode == 0
    time.sleep(0.5)
    assert completion.poll() == []  # 1.2 s after the first series, but the study was busy 0.5 s ago
    time.sleep(0.6)
    assert len(completion.poll()) == 2


def test_expected_instance_count_completes_at_once(node, series, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("""mode: first
rules:
  - name: counted
    match: {attribute: Modality, equals: CT}
    action: {models: [ct-abdomen-phantom-3d], expected_instances: 12}
""")
    led, completion = _stage(node, stable_seconds=3600, rules=rules)
    files = series()
    assert len(files) == 12
    assert storescu(node.dimse.port, files[:11]).returncode == 0
    assert completion.poll() == []
    assert storescu(node.dimse.port, files[11:]).returncode == 0
    assert len(completion.poll()) == 1
    assert next(iter(_series_rows(node).values())).completed_by == "expected"


def test_completion_on_request(node, series):
    led, completion = _stage(node, stable_seconds=3600)
    files = series()
    assert storescu(node.dimse.port, files).returncode == 0
    study = dcmread(files[0]).StudyInstanceUID
    assert request_completion(led, study, "test") == 1
    assert len(completion.poll()) == 1
    assert next(iter(_series_rows(node).values())).completed_by == "manual"


def _run_jobs(node, led, runner=None):
    worker = pipeline.worker(node.settings, led, runner=runner or (lambda job, files, out: f"{len(files)} files"))
    while worker.run_once():
        pass
    return worker


def test_a_late_instance_reopens_the_series_and_its_new_result_supersedes(node, series):
    led, completion = _stage(node, stable_seconds=0.3)
    files = series()
    assert storescu(node.dimse.port, files[:-1]).returncode == 0
    time.sleep(0.4)
    assert len(completion.poll()) == 1
    _run_jobs(node, led)
    assert storescu(node.dimse.port, files[-1:]).returncode == 0
    time.sleep(0.4)
    assert len(completion.poll()) == 1
    first, second = _jobs(node)
    assert first.state == "succeeded" and second.state == "queued"
    assert second.supersedes == first.id and second.generation == 2 and second.instances == len(files)
    (reopened,) = _events(node, "SN-REOPEN")
    assert "supersede" in reopened.detail
    with node.engine.connect() as conn:
        decisions = conn.execute(select(RoutingDecisionRow)).all()
    assert [d.generation for d in decisions] == [1, 2]


def test_the_same_input_is_never_queued_twice(node, series):
    led, completion = _routed(node, series)
    (job,) = _jobs(node)
    spec = JobSpec(series_uid=job.series_uid, study_uid=job.study_uid, generation=1, model=job.model,
                         model_version=job.model_version, weights_sha256=job.weights_sha256,
                         input_sha256=job.input_sha256, instances=job.instances, rule="again", ruleset_sha256="x" * 64)
    with led.transaction() as (conn, append):
        assert queue.enqueue(conn, append, spec, 3) == (job.id, False)
    assert len(_jobs(node)) == 1


def _queue_jobs(node, led, count: int) -> list[int]:
    ids = []
    with led.transaction() as (conn, append):
        for i in range(count):
            # series without instances: the worker finds the same (empty) input and runs the job
            spec = JobSpec(series_uid=f"1.2.3.{i}", study_uid="1.2.3", generation=1, model="m", model_version="1",
                           weights_sha256="0" * 64, input_sha256=input_hash([]), instances=0, rule="r",
                           ruleset_sha256="0" * 64)
            ids.append(queue.enqueue(conn, append, spec, 3)[0])
    return ids


def test_two_workers_never_run_the_same_job(node):
    led = Ledger(node.engine, node.trail)
    ids = _queue_jobs(node, led, 12)
    ran: list[int] = []
    lock = threading.Lock()

    def runner(job, files, out):
        with lock:
            ran.append(job.id)
        time.sleep(0.02)
        return "ok"

    workers = []
    for n in range(2):  # each with its own database connections and owner name
        w = pipeline.worker(node.settings, pipeline.ledger(node.settings), runner=runner)
        w.owner += f"-{n}"
        workers.append(w)
    threads = [threading.Thread(target=lambda w=w: [None for _ in iter(w.run_once, False)]) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ran) == ids  # every job exactly once
    assert {j.state for j in _jobs(node)} == {"succeeded"}
    assert {j.lease_owner for j in _jobs(node)} == {""}  # leases released
    owners = {json.loads(e.actor)["worker"] for e in _events(node, "SN-JOB") if e.detail.startswith("succeeded")}
    assert owners == {w.owner for w in workers}  # both took part


def test_a_failing_job_retries_with_backoff_then_dies_and_can_be_retried(node, series):
    led, completion = _routed(node, series, backoff_seconds=0.2, max_attempts=3)

    def broken(job, files, out):
        raise RuntimeError("GPU fell off the bus")

    worker = pipeline.worker(node.settings, led, runner=broken)
    assert worker.run_once()
    (job,) = _jobs(node)
    assert job.state == "failed" and job.attempts == 1 and "GPU fell off the bus" in job.last_error
    assert job.next_run_at == pytest.approx(time.time() + 0.2, abs=0.15)
    assert not worker.run_once()  # not before its backoff
    time.sleep(0.25)
    assert worker.run_once()
    assert _jobs(node)[0].next_run_at == pytest.approx(time.time() + 0.4, abs=0.15)  # doubled
    time.sleep(0.45)
    assert worker.run_once()
    (job,) = _jobs(node)
    assert job.state == "dead" and job.attempts == 3
    assert queue.retry(led, job.id)
    _run_jobs(node, led)
    assert _jobs(node)[0].state == "succeeded"


def test_a_job_whose_worker_died_is_queued_again(node, series):
    led, completion = _routed(node, series, lease_seconds=0.3)
    ghost = queue.claim(node.engine, "ghost", lease_seconds=0.2)  # a worker that then vanishes
    assert ghost is not None and _jobs(node)[0].state == "running"
    time.sleep(0.3)
    ran = []
    _run_jobs(node, led, runner=lambda job, files, out: ran.append(job.attempts) or "ok")
    (job,) = _jobs(node)
    assert ran == [2] and job.state == "succeeded"
    assert any("stopped renewing its lease" in e.detail for e in _events(node, "SN-JOB"))


def test_completion_survives_a_restart_without_losing_or_repeating(node, series):
    led, completion = _stage(node, stable_seconds=0.3)
    assert storescu(node.dimse.port, series()).returncode == 0
    time.sleep(0.4)
    fresh = pipeline.completion(node.settings, led)  # a new process: nothing in memory
    assert len(fresh.poll()) == 1
    assert completion.poll() == [] and pipeline.completion(node.settings, led).poll() == []
    assert len(_jobs(node)) == 1


def test_rules_replay_shows_what_a_new_rule_file_would_route_differently(node, series, tmp_path):
    led, completion = _routed(node, series)
    strict = tmp_path / "strict.yaml"
    strict.write_text("""mode: first
rules:
  - name: thin-only
    match: {attribute: SliceThickness, range: {max: 1.5}}
    action: {models: [ct-abdomen-phantom-3d]}
""")
    run = subprocess.run([sys.executable, "-m", "segnode", "rules", "replay", "--rules", str(strict), "--data-dir",
                          str(node.settings.data_dir)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "over 1 routed series: 1 would be routed differently" in run.stdout
    assert "ct-abdomen-phantom-3d (rules ct-abdomen) -> ignored (rules -)" in run.stdout
    same = subprocess.run([sys.executable, "-m", "segnode", "rules", "replay", "--data-dir", str(node.settings.data_dir)],
                          capture_output=True, text=True, timeout=120)
    assert "1 routed series: 0 would be routed differently" in same.stdout
    assert len(_jobs(node)) == 1  # a dry run


def test_a_job_for_a_model_version_no_longer_installed_is_dead_at_once_with_what_to_do(node, series):
    led, completion = _routed(node, series, backoff_seconds=0, max_attempts=3)
    with led.transaction() as (conn, _):  # the model was replaced after routing
        conn.execute(queue.JOBS.update().values(model_version="0.9.0"))
    worker = pipeline.worker(node.settings, led)  # the real runner: it checks the installed version first
    assert worker.run_once()
    (job,) = _jobs(node)
    assert job.state == "dead" and job.attempts == 1  # retrying would fail the same way
    assert "ModelVersionMismatch" in job.last_error and "queued for 0.9.0" in job.last_error
    assert "retrying cannot help" in job.last_error and "send the series again" in job.last_error
    assert not worker.run_once()


def test_a_series_found_unreadable_later_is_set_aside_and_the_others_are_routed(node, series):
    """An instance pydicom cannot decode (its file damaged after it was stored) stops its own series only."""
    from pydicom import dcmread as read
    from testdata import poison_bytes

    led, completion = _stage(node, stable_seconds=0.3)
    first, second = series(seed=1, name="a"), series(seed=2, name="b")
    assert storescu(node.dimse.port, first).returncode == 0
    with node.engine.connect() as conn:
        stored = conn.execute(select(Instance.path).order_by(Instance.id)).scalars().first()
    path = node.settings.data_dir / stored
    meta_end = len(path.read_bytes()) - len(dataset_bytes(path))
    path.write_bytes(path.read_bytes()[:meta_end] + poison_bytes(read(path), "short-us"))
    assert storescu(node.dimse.port, second).returncode == 0
    time.sleep(0.4)
    done = completion.poll()
    second_uid = str(dcmread(second[0]).SeriesInstanceUID)
    assert done == [second_uid]  # routed although the other series fails
    rows = _series_rows(node)
    bad = next(uid for uid in rows if uid != second_uid)
    assert rows[bad].state == "refused" and rows[second_uid].state == "complete"
    (event,) = [e for e in _events(node, "SN-COMPLETE") if e.outcome == 8]
    assert bad in event.objects and "set aside, not routed" in event.detail and "cannot be read" in event.detail
    assert completion.poll() == [] and [j.series_uid for j in _jobs(node)] == [second_uid]


def test_an_encoding_failure_ends_the_job_after_one_inference(node, series, monkeypatch):
    from segnode.jobs import worker as worker_module
    from segnode.outputs import results

    led, completion = _routed(node, series, backoff_seconds=0, max_attempts=3)
    inferred = []
    real_infer = worker_module.infer_series
    monkeypatch.setattr(worker_module, "infer_series", lambda *a, **k: inferred.append(1) or real_infer(*a, **k))

    def broken(*args, **kwargs):
        raise ValueError("Specific Character Set cannot be encoded")

    monkeypatch.setattr(results, "_encode", broken)
    worker = pipeline.worker(node.settings, led)
    while worker.run_once():
        pass
    (job,) = _jobs(node)
    assert job.state == "dead" and job.attempts == 1 and len(inferred) == 1
    assert "EncodingError" in job.last_error and "Specific Character Set" in job.last_error


@pytest.mark.parametrize("assume", [None, 0.5], ids=["refused", "assumed-by-rule"])
def test_a_radiograph_without_pixel_spacing_is_refused_unless_its_rule_assumes_one(node, tmp_path, assume):
    """The assumption is the rule's, explicit, and it is said everywhere: segmentation.json, the audit
    trail, the SR's method; the SEG states no spacing, as the image stated none."""
    import highdicom as hd

    from segnode.phantom.dx import DXOptions, generate_dx, write_dx

    rules = tmp_path / "rules.yaml"
    option = f", assume_pixel_spacing_mm: {assume}" if assume else ""
    rules.write_text("mode: first\nrules:\n  - name: chest\n    match: {attribute: Modality, equals: DX}\n"
                     f"    action: {{models: [dx-chest-phantom-2d]{option}}}\n")
    node.settings.routing = node.settings.routing.model_copy(update={"rules": rules, "stable_seconds": 0.3})
    led = Ledger(node.engine, node.trail)
    path = write_dx(generate_dx(6, DXOptions(matrix=128)), tmp_path / "dx")
    ds = dcmread(path)
    del ds.PixelSpacing, ds.ImagerPixelSpacing
    ds.save_as(path, enforce_file_format=True)
    assert storescu(node.dimse.port, [path]).returncode == 0
    time.sleep(0.4)
    assert pipeline.completion(node.settings, led).poll()
    worker = pipeline.worker(node.settings, led)
    while worker.run_once():
        pass
    (job,) = _jobs(node)
    if assume is None:
        assert job.state == "dead" and job.attempts == 1 and "refused" in job.last_error
        assert "no pixel spacing" in job.last_error and str(ds.SeriesInstanceUID) in job.last_error
        return
    assert job.state == "succeeded", job.last_error
    out = node.settings.data_dir / job.output
    record = json.loads((out / "segmentation.json").read_text())
    assert record["assumed_pixel_spacing_mm"] == 0.5 and any("ASSUMED 0.5 mm" in n for n in record["notes"])
    assert any("ASSUMED 0.5 mm" in e.detail for e in _events(node, "SN-JOB"))
    seg = dcmread(out / "seg.dcm")
    assert "PixelSpacing" not in seg and "PixelMeasuresSequence" not in seg.SharedFunctionalGroupsSequence[0]
    groups = hd.sr.srread(out / "sr.dcm").content.get_planar_roi_measurement_groups()
    assert groups and all(m.method.value == "ASSUMED-SPACING" for g in groups for m in g.get_measurements())


def test_a_queued_job_whose_series_changed_is_superseded_with_its_audit_event(node, series):
    led, completion = _routed(node, series)
    files = series()
    (first,) = _jobs(node)
    assert first.state == "queued"
    late = series(seed=1, name="late", slices_mm=70.0)[-1:]  # one more slice of the same study and series
    assert storescu(node.dimse.port, late).returncode == 0
    time.sleep(0.4)
    assert completion.poll()
    old, new = _jobs(node)
    assert old.id == first.id and old.state == "superseded" and new.state == "queued" and new.generation == 2
    assert len(files) + 1 == new.instances
    (event,) = [e for e in _events(node, "SN-JOB") if e.detail.startswith("superseded")]
    assert f'"job_id":{old.id}' in event.objects and "covers it" in event.detail
