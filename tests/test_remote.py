"""Remote workers without the node's file system: a worker claims a job over HTTP, retrieves the series over
WADO-RS (checking every instance's sha256), segments it with the same code as the node's workers, and returns
the result, which the node stores, audits and queues for delivery. A job is taken once; a result is accepted
once; a worker that cannot reach the node says why."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from segnode import pipeline
from segnode.audit.ledger import Ledger
from segnode.config import default_models_dir
from segnode.flow import JobState
from segnode.jobs import queue
from segnode.phantom.ct import CTOptions, generate_ct, write_phantom
from segnode.remote.worker import NodeUnreachable, RemoteWorker, WorkerSettings
from peers import free_port
from tests.conftest import audit_events, storescu

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def queued_job(node, tmp_path: Path, seed: int = 0) -> int:
    """Send a small CT phantom, complete it; the id of the segment job the rules queued."""
    ledger = Ledger(node.engine, node.trail)
    files = write_phantom(generate_ct(3 + seed, CTOptions(matrix=16, slice_spacing=5.0, z_extent_mm=60.0)),
                          tmp_path / f"ct{seed}")
    assert storescu(node.dimse.port, files).returncode == 0
    time.sleep(0.4)
    pipeline.completion(node.settings, ledger).poll()
    with node.engine.connect() as conn:
        jobs = queue.list_jobs(conn, state="queued", kind="segment")
    return jobs[-1].id


def remote(node, tmp_path: Path, name: str = "gpu1:1", **extra) -> RemoteWorker:
    return RemoteWorker(WorkerSettings(node_url=f"http://127.0.0.1:{node.http_port}", token=TOKEN,
                                       models_dir=default_models_dir(), device="cpu", work_dir=tmp_path,
                                       name=name, **extra))


@pytest.fixture
def web_node(start_node):
    return start_node(http={"token": TOKEN}, routing={"stable_seconds": 0.3}, jobs={"lease_seconds": 30})


def test_a_remote_worker_runs_a_job_the_node_then_delivers(web_node, tmp_path):
    job_id = queued_job(web_node, tmp_path)
    worker = remote(web_node, tmp_path / "work")
    assert worker.run_job(job_id) == "succeeded"
    with web_node.engine.connect() as conn:
        job = queue.get_job(conn, job_id)
    assert job is not None and job.state == JobState.SUCCEEDED and job.output == f"results/{job_id}"
    folder = web_node.settings.data.path(job.output)
    assert {"seg.dcm", "sr.dcm", "segmentation.json", "labels.nii.gz"} <= {p.name for p in folder.iterdir()}
    assert "detail.txt" not in {p.name for p in folder.iterdir()}
    events = [e for e in audit_events(web_node) if e.event_id == "SN-JOB" and f'"job_id":{job_id}' in e.objects]
    assert any("succeeded" in e.detail and "worker gpu1:1" in e.detail and "gpu1:1" in e.actor for e in events)
    assert list((tmp_path / "work").iterdir()) == []  # the series and the result were not left behind
    assert worker.run_job(job_id) == "dropped"  # done: a second message for it runs nothing
    other = remote(web_node, tmp_path, name="gpu2:1")
    assert other.run_job(job_id) == "dropped"


def test_a_job_is_claimed_once_and_a_result_accepted_only_from_its_holder(web_node, tmp_path):
    job_id = queued_job(web_node, tmp_path)
    base = f"http://127.0.0.1:{web_node.http_port}/api/work/jobs/{job_id}"
    first = httpx.post(f"{base}/claim", json={"worker": "a:1"}, headers=AUTH, timeout=30)
    assert first.status_code == 200 and first.json()["instances"]
    second = httpx.post(f"{base}/claim", json={"worker": "b:1"}, headers=AUTH, timeout=30)
    assert second.status_code == 409 and "leased to a:1" in second.json()["detail"]
    stray = httpx.put(f"{base}/result", params={"worker": "b:1"}, content=_tar({"x.json": b"{}"}), headers=AUTH)
    assert stray.status_code == 409
    for name in ("../escape.dcm", "sub/dir.dcm"):  # nothing a worker sends names a path
        bad = httpx.put(f"{base}/result", params={"worker": "a:1"}, content=_tar({name: b"x"}), headers=AUTH)
        assert bad.status_code == 400, name
    assert not (web_node.settings.data_dir / "escape.dcm").exists()
    empty = httpx.put(f"{base}/result", params={"worker": "a:1"}, content=_tar({"notes.txt": b"x"}), headers=AUTH)
    assert empty.status_code == 400 and "segmentation.json" in empty.json()["detail"]
    assert list((web_node.settings.data_dir / "tmp").iterdir()) == []
    failed = httpx.post(f"{base}/fail", json={"worker": "a:1", "error": "CUDA out of memory", "retryable": True},
                        headers=AUTH, timeout=30)
    assert failed.status_code == 200 and failed.json()["state"] == "failed"
    assert httpx.post(f"{base}/renew", json={"worker": "a:1"}, headers=AUTH).status_code == 409
    assert httpx.post(f"{base}/claim", json={"worker": "a:1"}).status_code == 401  # behind the token


def test_a_worker_that_cannot_reach_the_node_retries_then_says_why(tmp_path):
    worker = RemoteWorker(WorkerSettings(node_url=f"http://127.0.0.1:{free_port()}", token=TOKEN,
                                         models_dir=default_models_dir(), name="w:1", retries=3, timeout=2))
    start = time.monotonic()
    with pytest.raises(NodeUnreachable, match="cannot reach the node at http://127.0.0.1:.* after 3 tries"):
        worker.run_job(1)
    assert time.monotonic() - start >= 3  # waited 1 + 2 s between the tries


def test_a_worker_with_a_wrong_token_is_told_so(web_node, tmp_path):
    worker = RemoteWorker(WorkerSettings(node_url=f"http://127.0.0.1:{web_node.http_port}", token="wrong",
                                         models_dir=default_models_dir(), name="w:1"))
    with pytest.raises(NodeUnreachable, match="refused this worker \\(401\\): check --token"):
        worker.check_node()  # what `segnode worker` does before it takes any message
    with pytest.raises(NodeUnreachable, match="refused this worker \\(401\\): check --token"):
        worker.run_job(1)
    remote(web_node, tmp_path).check_node()  # the right token passes


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _folder_tar(folder: Path, **replace: bytes) -> bytes:
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    return _tar({**files, **replace})


def test_a_result_that_is_not_about_the_jobs_input_is_refused(web_node, tmp_path):
    """A token holder cannot have another patient's result, a file of the node's disk, or bytes that are not
    DICOM delivered as a job's result."""
    done = queued_job(web_node, tmp_path, seed=0)
    assert remote(web_node, tmp_path / "w").run_job(done) == "succeeded"
    other = queued_job(web_node, tmp_path, seed=1)  # another series, study and patient
    base = f"http://127.0.0.1:{web_node.http_port}/api/work/jobs/{other}"
    assert httpx.post(f"{base}/claim", json={"worker": "a:1"}, headers=AUTH, timeout=30).status_code == 200
    foreign = web_node.settings.data.result_folder(done)
    record = (foreign / "segmentation.json").read_text()
    escape = json.loads(record)
    escape["outputs"]["secondary_capture"] = ["/etc/passwd"]
    attempts = {  # what is sent -> what the node says
        "not of the job's study and patient": _folder_tar(foreign),
        "must list plain file names": _folder_tar(foreign, **{"segmentation.json": json.dumps(escape).encode()}),
        "seg.dcm is not a DICOM file": _folder_tar(foreign, **{"seg.dcm": b"AAA"}),
        "segmentation.json cannot be used": _folder_tar(foreign, **{"segmentation.json": b"[1"}),
    }
    for reason, body in attempts.items():
        rsp = httpx.put(f"{base}/result", params={"worker": "a:1"}, content=body, headers=AUTH, timeout=30)
        assert rsp.status_code == 400 and reason in rsp.json()["detail"], (reason, rsp.text)
    with web_node.engine.connect() as conn:
        assert queue.get_job(conn, other).state == JobState.RUNNING  # nothing kept, nothing queued to deliver
        assert not queue.list_jobs(conn, kind="deliver") or all(j.parent_job == done for j in
                                                                queue.list_jobs(conn, kind="deliver"))
    assert not web_node.settings.data.result_folder(other).exists()


def test_archives_that_would_cost_the_node_are_refused_early(web_node, tmp_path):
    job_id = queued_job(web_node, tmp_path)
    base = f"http://127.0.0.1:{web_node.http_port}/api/work/jobs/{job_id}"
    assert httpx.post(f"{base}/claim", json={"worker": "a:1"}, headers=AUTH, timeout=30).status_code == 200
    sparse = io.BytesIO()
    with tarfile.open(fileobj=sparse, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("seg.dcm")
        info.size = 0
        info.type = tarfile.GNUTYPE_SPARSE  # a few bytes that would expand to the size limit on disk
        tar.addfile(info)
    many = _tar({f"f{i}": b"" for i in range(1200)})
    twice = io.BytesIO()
    with tarfile.open(fileobj=twice, mode="w") as tar:
        for _ in range(2):
            info = tarfile.TarInfo("seg.dcm")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    for what, body in (("sparse", sparse.getvalue()), ("1200 files", many), ("a name twice", twice.getvalue())):
        rsp = httpx.put(f"{base}/result", params={"worker": "a:1"}, content=body, headers=AUTH, timeout=30)
        assert rsp.status_code == 400, (what, rsp.text)
    error = httpx.post(f"{base}/fail", json={"worker": "a:1", "error": "bad\u0000byte \x1b[2J", "retryable": True},
                       headers=AUTH, timeout=30)
    assert error.status_code == 200
    with web_node.engine.connect() as conn:
        assert "bad\\x00byte \\x1b[2J" in queue.get_job(conn, job_id).last_error  # escaped, not raw
    assert httpx.post(f"http://127.0.0.1:{web_node.http_port}/api/work/jobs/{2**63}/claim", json={"worker": "a:1"},
                      headers=AUTH).status_code == 404


def test_a_worker_without_the_jobs_model_version_leaves_the_job_to_others(tmp_path):
    worker = RemoteWorker(WorkerSettings(node_url="http://127.0.0.1:1", token=TOKEN, models_dir=tmp_path, name="w:1"))
    assert "not installed here" in worker.lacks("ct-abdomen-phantom-3d", "1.0.0", "0" * 64)
    shipped = RemoteWorker(WorkerSettings(node_url="http://127.0.0.1:1", token=TOKEN, models_dir=default_models_dir(),
                                          name="w:1"))
    assert "the job wants 0.9" in shipped.lacks("ct-abdomen-phantom-3d", "0.9", "0" * 64)
