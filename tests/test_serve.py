"""`segnode serve` as deployed: listener, completion and workers as supervised processes. A series
sent with storescu ends as one label map, also when a worker or the whole node is killed mid-job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import psutil
from pydicom import dcmread
from sqlalchemy import create_engine, select

from segnode.db.models import AuditEvent
from segnode.imaging.nifti import read_labels
from peers import free_port, start_node_process
from segnode.phantom.ct import CTOptions, generate_ct, write_phantom
from tests.conftest import echoscu, eventually, scrape, storescu


def _config(tmp_path: Path, workers: int = 1) -> Path:
    path = tmp_path / "segnode.yaml"
    path.write_text(f"""
routing: {{stable_seconds: 0.5, poll_seconds: 0.2}}
jobs: {{workers: {workers}, lease_seconds: 2, backoff_seconds: 0}}
""")
    return path


def _jobs(node) -> list[dict]:
    return httpx.get(f"{node.url}/api/jobs", timeout=10).json()


def _events(data_dir: Path, code: str) -> list:
    engine = create_engine(f"sqlite:///{data_dir / 'segnode.db'}")
    with engine.connect() as conn:
        rows = conn.execute(select(AuditEvent).where(AuditEvent.event_id == code)).all()
    engine.dispose()
    return rows


def _children(node, kind: str) -> list[psutil.Process]:
    return [p for p in psutil.Process(node.proc.pid).children() if "segnode.stage" in p.cmdline() and kind in p.cmdline()]


def _phantom(tmp_path: Path, seed: int, slices: float = 2.0) -> list[Path]:
    return write_phantom(generate_ct(seed, CTOptions(matrix=64, slice_spacing=slices, z_extent_mm=240.0)),
                         tmp_path / f"ct-{seed}")


def test_a_series_sent_to_the_node_comes_out_as_a_label_map(tmp_path):
    data = tmp_path / "data"
    log = tmp_path / "node.log"
    node = start_node_process(data, "--config", str(_config(tmp_path, workers=2)), stderr=log.open("ab"))
    try:
        files = _phantom(tmp_path, 200_100, slices=4.0)
        assert storescu(node.dimse_port, files).returncode == 0
        job = eventually(lambda: [j for j in _jobs(node) if j["state"] == "succeeded"], timeout=180)[0]
        labels, affine = read_labels(data / job["output"] / "labels.nii.gz")
        assert labels.shape == (len(files), 64, 64) and set(np.unique(labels)) >= {0, 1, 2, 5}
        record = json.loads((data / job["output"] / "segmentation.json").read_text())
        assert record["model"]["weights_sha256"] == job["weights_sha256"]
        seg = dcmread(data / job["output"] / "seg.dcm")
        sr = dcmread(data / job["output"] / "sr.dcm")
        assert seg.SOPInstanceUID == record["outputs"]["seg"]["sop_instance_uid"] and seg.Modality == "SEG"
        assert sr.SOPInstanceUID == record["outputs"]["sr"]["sop_instance_uid"] and sr.Modality == "SR"
        assert seg.StudyInstanceUID == sr.StudyInstanceUID == dcmread(files[0]).StudyInstanceUID
        assert record["outputs"]["volumes_ml"]["liver"] > 100
        cli = subprocess.run([sys.executable, "-m", "segnode", "infer", "--model", "ct-abdomen-phantom-3d",
                              str(files[0].parent), "--out", str(tmp_path / "cli"), "--device", "cpu"],
                             capture_output=True, text=True, timeout=300)
        assert cli.returncode == 0, cli.stderr
        assert "reading the series" not in cli.stderr  # no stage lines when not on a terminal
        by_hand, _ = read_labels(tmp_path / "cli" / "labels.nii.gz")
        np.testing.assert_array_equal(by_hand, labels)  # `segnode infer` and the served node answer the same
        study = dcmread(files[0]).StudyInstanceUID
        again = httpx.post(f"{node.url}/api/studies/{study}/complete", timeout=10)
        assert again.status_code == 404  # completed already: nothing open
        assert len(_jobs(node)) == 1
        # each process counted what it did; /metrics merges the listener's, completion's and the workers'
        samples = scrape(node.url)
        assert samples[("segnode_instances_received_total", (("channel", "dimse"), ("status", "0000")))] == len(files)
        for stage in ("receive", "completion_wait", "queue_wait", "read", "windows", "resample", "encode"):
            assert samples[("segnode_stage_seconds_count", (("stage", stage),))] >= 1, stage
        assert samples[("segnode_jobs", (("kind", "segment"), ("state", "succeeded")))] == 1
        assert samples[("segnode_model_load_seconds_count", (("model", "ct-abdomen-phantom-3d"),))] >= 1
    finally:
        node.stop()
    text = log.read_text()
    assert "Traceback" not in text, text
    # each worker loaded the rules' models before the first study, and encoding left no line per module
    assert text.count("model ct-abdomen-phantom-3d warm") == 2 and "highdicom" not in text


def test_a_killed_worker_is_restarted_and_its_job_runs_once(tmp_path):
    data = tmp_path / "data"
    log = tmp_path / "node.log"
    node = start_node_process(data, "--config", str(_config(tmp_path)), stderr=log.open("ab"))
    try:
        assert storescu(node.dimse_port, _phantom(tmp_path, 200_101)).returncode == 0
        eventually(lambda: [j for j in _jobs(node) if j["state"] == "running"], timeout=120)
        ready = httpx.get(f"{node.url}/readyz", timeout=10)
        assert ready.status_code == 200 and "workers" in ready.json()["checks"]
        (worker,) = _children(node, "worker")
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
        assert echoscu(node.dimse_port).returncode == 0  # the listener does not notice
        ready = httpx.get(f"{node.url}/readyz", timeout=10)  # the restart waits >= 1 s: no worker meanwhile
        assert ready.status_code == 503 and "none of 1 is running" in ready.json()["failing"]["workers"]
        assert httpx.get(f"{node.url}/livez", timeout=10).status_code == 200
        (job,) = eventually(lambda: [j for j in _jobs(node) if j["state"] == "succeeded"], timeout=180)
        assert job["attempts"] == 2 and len(_jobs(node)) == 1
        (restarted,) = eventually(lambda: _children(node, "worker"), timeout=30)
        assert restarted.pid != worker.pid
        eventually(lambda: httpx.get(f"{node.url}/readyz", timeout=10).status_code == 200, timeout=30)
    finally:
        node.stop()
    crashed = [e for e in _events(data, "110100") if "exited with status -9" in e.detail]
    assert len(crashed) == 1
    assert any("stopped renewing its lease" in e.detail for e in _events(data, "SN-JOB"))


def test_a_node_killed_mid_job_finishes_the_job_once_after_restart(tmp_path):
    data = tmp_path / "data"
    config = _config(tmp_path)
    dimse, http = free_port(), free_port()
    log = tmp_path / "node.log"
    node = start_node_process(data, "--config", str(config), dimse_port=dimse, http_port=http, stderr=log.open("ab"))
    files = _phantom(tmp_path, 200_102)
    assert storescu(node.dimse_port, files).returncode == 0
    eventually(lambda: [j for j in _jobs(node) if j["state"] == "running"], timeout=120)
    children = psutil.Process(node.proc.pid).children()
    node.proc.kill()
    node.proc.wait()
    psutil.wait_procs(children, timeout=10)
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)  # died with it
    node = start_node_process(data, "--config", str(config), dimse_port=dimse, http_port=http, stderr=log.open("ab"))
    try:
        (job,) = eventually(lambda: [j for j in _jobs(node) if j["state"] == "succeeded"], timeout=180)
        assert len(_jobs(node)) == 1 and (data / job["output"] / "labels.nii.gz").exists()
    finally:
        node.stop()
    assert len(_events(data, "SN-COMPLETE")) == 1  # completed and routed once, before the kill
    verify = subprocess.run([sys.executable, "-m", "segnode", "audit", "verify", "--data-dir", str(data)],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_stopping_the_node_lets_restarted_children_finish_instead_of_killing_them(tmp_path):
    """A child restarted by the supervisor is stopped with SIGTERM like the first ones (it finishes its
    loop and exits 0), not killed when the supervisor's thread ends."""
    from segnode.supervisor import Supervisor
    from tests.conftest import make_settings

    settings = make_settings(tmp_path / "data", jobs={"workers": 1, "warm_up": False})
    exits: list[tuple[str, int]] = []
    supervisor = Supervisor(settings, on_exit=lambda name, code, delay, pid: exits.append((name, code)))
    supervisor.start()
    try:
        worker = next(c for c in supervisor.children if c.name == "worker-1")
        first = eventually(lambda: worker.proc, timeout=30)
        eventually(lambda: "segnode.stage" in " ".join(psutil.Process(first.pid).cmdline()), timeout=30)
        os.kill(first.pid, signal.SIGKILL)
        restarted = eventually(lambda: worker.proc if worker.proc not in (None, first) else None, timeout=30)
        eventually(lambda: psutil.Process(restarted.pid).status() == psutil.STATUS_SLEEPING, timeout=60)
    finally:
        supervisor.stop()
    assert exits == [("worker-1", -signal.SIGKILL)]
    assert restarted.returncode == 0  # it handled SIGTERM; -9 would mean killed with the supervisor's thread
    assert all(c.proc is not None and c.proc.returncode == 0 for c in supervisor.children)


def test_stage_processes_run_the_nodes_own_code_wherever_it_was_started(tmp_path, monkeypatch):
    """Started from a folder holding another `segnode` package (or with another one installed), the children
    still import the code the node runs: never the working directory's, never a second version."""
    from segnode.supervisor import Supervisor
    from tests.conftest import make_settings

    shadow = tmp_path / "elsewhere"
    (shadow / "segnode").mkdir(parents=True)
    (shadow / "segnode" / "__init__.py").write_text("raise SystemExit(97)\n")
    monkeypatch.chdir(shadow)
    monkeypatch.setenv("PYTHONPATH", str(shadow))  # as if another segnode came first on the path
    exits: list[tuple[str, int]] = []
    supervisor = Supervisor(make_settings(tmp_path / "data", jobs={"workers": 1, "warm_up": False}),
                            on_exit=lambda name, code, delay, pid: exits.append((name, code)))
    supervisor.start()
    try:
        worker = next(c for c in supervisor.children if c.name == "worker-1")
        child = eventually(lambda: worker.proc, timeout=30)
        eventually(lambda: psutil.Process(child.pid).status() == psutil.STATUS_SLEEPING, timeout=60)
        assert child.poll() is None
    finally:
        supervisor.stop()
    assert exits == []
