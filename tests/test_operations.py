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
    session = httpx.post(_url(node, "/api/session"), json={"token": "s3cret"}, timeout=10).cookies
    schema = httpx.get(_url(node, "/openapi.json"), cookies=session, timeout=10)
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


def test_the_sign_in_cookie_is_a_signed_session_that_ends_and_signs_out(start_node):
    node = start_node(http={"token": "s3cret"})
    signed = httpx.post(_url(node, "/api/session"), json={"token": "s3cret"}, timeout=10)
    cookie = signed.headers["set-cookie"]
    assert signed.status_code == 204 and "s3cret" not in cookie  # the browser never holds the token
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Max-Age=43200" in cookie
    assert httpx.get(_url(node, "/api/jobs"), cookies=signed.cookies, timeout=10).status_code == 200
    form = httpx.post(_url(node, "/api/session"), data={"token": "s3cret"}, timeout=10)  # a plain HTML form too
    assert form.status_code == 204
    value = signed.cookies["segnode_session"]
    expired = "1000." + value.split(".")[1]
    for forged in (expired, "9999999999." + "0" * 64, "s3cret"):
        assert httpx.get(_url(node, "/api/jobs"), cookies={"segnode_session": forged},
                         timeout=10).status_code == 401, forged
    out = httpx.delete(_url(node, "/api/session"), cookies=signed.cookies, timeout=10)
    assert out.status_code == 204 and 'segnode_session=""' in out.headers["set-cookie"]
    other = start_node(http={"token": "another"})  # a session of one token opens nothing signed with another
    assert httpx.get(_url(other, "/api/jobs"), cookies=signed.cookies, timeout=10).status_code == 401


def test_sign_in_refuses_a_large_or_odd_body_before_reading_it_whole(start_node):
    node = start_node(http={"token": "s3cret"})
    big = httpx.post(_url(node, "/api/session"), content=b"{" + b" " * 5000 + b"}",
                     headers={"Content-Type": "application/json"}, timeout=10)
    assert big.status_code == 413
    lone = httpx.post(_url(node, "/api/session"), content=b'{"token": "\\ud800"}',
                      headers={"Content-Type": "application/json"}, timeout=10)
    assert lone.status_code == 401  # a lone surrogate is a wrong token, not a server error
    assert httpx.post(_url(node, "/api/session"), content=b"[1]", timeout=10).status_code == 401


def test_changes_with_the_cookie_need_the_dashboards_header_on_every_route(start_node):
    node = start_node(http={"token": "s3cret"})
    session = httpx.post(_url(node, "/api/session"), json={"token": "s3cret"}, timeout=10).cookies
    study = "1.2.826.0.1.3680043.8.498.1"
    forged = httpx.post(_url(node, f"/api/studies/{study}/complete"), cookies=session, timeout=10)
    assert forged.status_code == 403 and "x-segnode-request" in forged.json()["detail"]
    asked = httpx.post(_url(node, f"/api/studies/{study}/complete"), cookies=session,
                       headers={"X-Segnode-Request": "1"}, timeout=10)
    assert asked.status_code == 404  # allowed through; nothing open in that study


def test_refusals_are_counted_each_and_audited_once_a_minute_per_host_with_a_safe_path(start_node):
    from tests.conftest import audit_events

    node = start_node(http={"token": "s3cret"})
    path = "/api/studies/x%1b%5B31m" + "a" * 4990 + "/trace"
    auth = {"Authorization": "Bearer s3cret"}
    key = "segnode_http_refusals_total"
    before = scrape(_url(node, ""), headers=auth)  # the counters are the process's: other tests' refusals too
    for _ in range(20):
        assert httpx.get(_url(node, path), timeout=10).status_code == 401
        assert httpx.get(_url(node, "/nothing/here"), timeout=10).status_code == 404
    alerts = [e for e in audit_events(node) if e.event_id == "110113"]
    assert len(alerts) == 1 and len([e for e in audit_events(node) if "HTTP 404" in e.detail]) == 1
    assert "\\x1b[31m" in alerts[0].detail and "\x1b" not in alerts[0].detail  # escaped, not raw
    assert len(alerts[0].detail) < 400 and "(+4815 characters)" in alerts[0].detail
    after = scrape(_url(node, ""), headers=auth)
    for status in ("401", "404"):
        label = (key, (("status", status),))
        assert after[label] - before.get(label, 0) == 20, status


def test_refusal_audit_keeps_count_of_what_it_did_not_record():
    from segnode.web.guard import RefusalAudit

    audit = RefusalAudit(window=0.2, hosts=2)
    assert audit.admit("a") == 0 and audit.admit("a") is None and audit.admit("a") is None
    assert audit.admit("b") == 0 and audit.admit("c") == 0  # "a" forgotten: two hosts at most
    import time

    time.sleep(0.25)
    assert audit.admit("b") == 0 and audit.admit("b") is None
    time.sleep(0.25)
    assert audit.admit("b") == 1  # the one refused in between is told with the next record


def test_the_overview_shows_the_most_recent_studies_and_says_how_many_there_are(start_node):
    from segnode.web.dashboard import overview
    from tests.test_stow import _series, part10

    node = start_node()
    studies = []
    for seed in range(3):
        ds = _series(1, seed=40 + seed)[0]
        studies.append(ds.StudyInstanceUID)
        assert stow(node, [("application/dicom", part10(ds))]).status_code == 200
    with node.engine.connect() as conn:
        page = overview(conn, limit=2)
    assert [s["study_uid"] for s in page["studies"]] == studies[::-1][:2]  # newest first
    assert len(set(studies)) == 3 and page["dead_total"] == 0 and page["studies"][0]["series"][0]["instances"] == 1
