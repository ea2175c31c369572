"""What the people who run a node see: truthful liveness and readiness, an API that refuses what it
cannot filter by, an API reference behind the token with nothing loaded from outside, and a CLI that
names what each job is."""

from __future__ import annotations

import argparse
import subprocess
import sys

import httpx

from segnode.audit.ledger import Ledger
from segnode.cli import build_parser
from segnode.flow import JobKind, JobSpec
from segnode.jobs import queue
from segnode.supervisor import Supervisor
from tests.conftest import make_settings, scrape, storescu
from tests.test_stow import stow


def _url(node, path: str) -> str:
    return f"http://127.0.0.1:{node.http_port}{path}"


def test_readiness_names_what_keeps_the_node_from_taking_work(start_node):
    node = start_node()
    ready = httpx.get(_url(node, "/readyz"), timeout=10)
    assert ready.status_code == 200 and {"disk", "database", "dimse"} <= set(ready.json()["checks"])
    node.dimse.stop()
    ready = httpx.get(_url(node, "/readyz"), timeout=10)
    assert ready.status_code == 503 and "restart the node" in ready.json()["failing"]["dimse"]
    assert httpx.get(_url(node, "/livez"), timeout=10).status_code == 200  # alive: do not restart it blindly


def test_a_disk_under_the_watermark_is_not_ready_though_alive(start_node):
    node = start_node(storage={"free_space_floor_mb": 0, "free_space_watermark_mb": 10**9})
    ready = httpx.get(_url(node, "/readyz"), timeout=10)
    assert ready.status_code == 503
    assert "under storage.free_space_watermark_mb (1000000000)" in ready.json()["failing"]["disk"]
    assert httpx.get(_url(node, "/healthz"), timeout=10).json()["status"] == "ok"


def test_no_running_worker_is_a_readiness_reason(tmp_path):
    supervisor = Supervisor(make_settings(tmp_path / "data", jobs={"workers": 2}))  # not started
    assert "none of 2 is running" in (supervisor.workers_not_running() or "")


def _queue_delivery(node) -> None:
    led = Ledger(node.engine, node.trail)
    common = dict(study_uid="1.2.3", generation=1, model="m", model_version="1", weights_sha256="0" * 64,
                  input_sha256="1" * 64, instances=1, rule="r", ruleset_sha256="0" * 64)
    with led.transaction() as (conn, append):
        parent, _ = queue.enqueue(conn, append, JobSpec(series_uid="1.2.3.4", **common), 3)
        queue.enqueue(conn, append, JobSpec(kind=JobKind.DELIVER, series_uid="1.2.3.4", destination="pacs",
                                            parent_job=parent, parent_key="k", **common), 3)


def test_jobs_filters_refuse_unknown_values_and_jobs_say_what_they_are(node, capsys):
    _queue_delivery(node)
    bogus = httpx.get(_url(node, "/api/jobs"), params={"state": "bogus"}, timeout=10)
    assert bogus.status_code == 400 and "queued" in bogus.json()["detail"] and "dead" in bogus.json()["detail"]
    assert httpx.get(_url(node, "/api/jobs"), params={"kind": "x"}, timeout=10).status_code == 400
    (delivery,) = httpx.get(_url(node, "/api/jobs"), params={"kind": "deliver"}, timeout=10).json()
    assert delivery["kind"] == "deliver" and delivery["destination"] == "pacs"

    from segnode.cli import main

    assert main(["jobs", "list", "--data-dir", str(node.settings.data_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "segment  m 1" in lines[0] and "deliver  job 1 -> pacs" in lines[1]


def test_the_api_reference_is_behind_the_token_and_loads_nothing_from_outside(start_node):
    node = start_node(http={"token": "s3cret"})
    for path in ("/docs", "/openapi.json", "/api/jobs"):
        assert httpx.get(_url(node, path), timeout=10).status_code == 401, path
    auth = {"Authorization": "Bearer s3cret"}
    page = httpx.get(_url(node, "/docs"), headers=auth, timeout=10)
    assert page.status_code == 200 and "/api/jobs" in page.text and "/dicom-web/studies" in page.text
    assert "<script" not in page.text and "http://" not in page.text and "https://" not in page.text
    schema = httpx.get(_url(node, "/openapi.json"), cookies={"segnode_token": "s3cret"}, timeout=10)
    assert schema.status_code == 200 and "/api/studies" in schema.json()["paths"]
    for probe in ("/livez", "/healthz", "/readyz"):  # orchestrators probe without a token
        assert httpx.get(_url(node, probe), timeout=10).status_code == 200, probe


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_no_help_text_shows_an_internal_placeholder():
    parsers = list(_parsers(build_parser()))
    assert len(parsers) > 15
    for parser in parsers:
        assert "SUPPRESS" not in parser.format_help(), parser.prog
    out = subprocess.run([sys.executable, "-m", "segnode", "--help"], capture_output=True, text=True, check=True)
    assert "SUPPRESS" not in out.stdout and "serve" in out.stdout


def test_metrics_count_what_arrived_and_what_was_refused(start_node, ct_files):
    node = start_node(http={"token": "s3cret"})
    auth = {"Authorization": "Bearer s3cret"}
    assert httpx.get(_url(node, "/metrics"), timeout=10).status_code == 401
    url = _url(node, "")
    before = scrape(url, auth)
    assert storescu(node.dimse.port, ct_files).returncode == 0
    truncated = ct_files[0].read_bytes()[:-200]  # over STOW-RS: refused 0xC210
    assert stow(node, [("application/dicom", truncated)], headers=auth).status_code == 409
    after = scrape(url, auth)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("segnode_instances_received_total", channel="dimse", status="0000") == len(ct_files)
    assert delta("segnode_instances_received_total", channel="stow", status="C210") == 1
    assert delta("segnode_received_bytes_total", channel="dimse") >= sum(f.stat().st_size for f in ct_files)
    assert delta("segnode_stage_seconds_count", stage="receive") == len(ct_files)
    assert after[("segnode_jobs", (("kind", "deliver"), ("state", "dead")))] == 0
    assert after[("segnode_dead_letter_jobs", ())] == 0 and after[("segnode_dimse_associations", ())] == 0
    assert after[("segnode_disk_free_bytes", ())] > 0


def test_long_cli_work_says_what_it_is_doing_on_a_terminal(tmp_path):
    import os
    import pty

    from segnode.phantom.ct import CTOptions, generate_ct, write_phantom

    write_phantom(generate_ct(5, CTOptions(matrix=16, slice_spacing=5.0, z_extent_mm=60.0)), tmp_path / "ct")
    master, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "segnode", "infer", "--model", "ct-abdomen-phantom-3d",
                             str(tmp_path / "ct"), "--out", str(tmp_path / "out"), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=terminal, text=True)
    os.close(terminal)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the terminal's last writer is gone
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.wait(timeout=300) == 0
    lines = seen.decode().splitlines()
    stages = [line.split("] ", 1)[1] for line in lines if line.startswith("[")]
    assert [s.split()[0] for s in stages] == ["reading", "loading", "segmenting", "writing"], lines
    assert "labels.nii.gz" in proc.stdout.read()  # the report stays on standard output
