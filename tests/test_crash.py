"""kill -9 during a 1000-instance transfer loses nothing that was acknowledged."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
from pydicom import dcmread

from peers import start_node_process
from segnode.tools import dcmtk
from testdata import write_ct_series
from tests.conftest import dataset_bytes, storescu


def _send_until(port: int, files: list[Path], kill_after: int, victim: subprocess.Popen[bytes]) -> int:
    """Send the files with dcmtk's storescu, as a modality would; SIGKILL `victim` once `kill_after` have
    been acknowledged. Returns how many were acknowledged (responses are in the order files were sent)."""
    acked = 0
    sender = subprocess.Popen([dcmtk("storescu"), "-v", "-aec", "SEGNODE", "-aet", "CRASHSCU", "127.0.0.1", str(port),
                               *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert sender.stdout is not None
    for line in sender.stdout:
        if "Received Store Response (Success)" in line:
            acked += 1
            if acked == kill_after:
                os.kill(victim.pid, signal.SIGKILL)
    sender.wait(timeout=120)
    return acked


def test_kill_9_mid_series_loses_no_acknowledged_instance(tmp_path):
    data_dir, log = tmp_path / "data", tmp_path / "node.log"
    files = write_ct_series(tmp_path / "series", n_slices=1000, rows=24, cols=24, seed=1234, patient_name="Crash^Test")
    node = start_node_process(data_dir, stderr=log.open("ab"))
    proc, dimse, http = node.proc, node.dimse_port, node.http_port

    kill_after = 400
    acked = _send_until(dimse, files, kill_after, proc)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert kill_after <= acked < len(files), "the kill did not land mid-series"

    node = start_node_process(data_dir, dimse_port=dimse, http_port=http, stderr=log.open("ab"))  # recovery first
    try:
        with sqlite3.connect(data_dir / "segnode.db") as db:
            rows = dict(db.execute("SELECT sop_instance_uid, path FROM instances").fetchall())
        uids = [str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in files]
        for uid, path in zip(uids[:acked], files[:acked]):
            assert uid in rows, f"acknowledged instance {uid} lost"
            assert dataset_bytes(data_dir / rows[uid]) == dataset_bytes(path)  # byte-exact
        assert set(rows) <= set(uids)
        assert list((data_dir / "tmp").iterdir()) == []
        verify = subprocess.run([sys.executable, "-m", "segnode", "audit", "verify", "--data-dir", str(data_dir)],
                                capture_output=True, text=True, timeout=60)
        assert verify.returncode == 0, verify.stdout
        # the node takes the rest of the series after the restart
        assert storescu(dimse, files[acked:], aet="CRASHSCU").returncode == 0
        studies = httpx.get(f"http://127.0.0.1:{http}/api/studies", timeout=10).json()
        assert studies[0]["series"][0]["instances"] == 1000
    finally:
        node.stop()
        if proc.poll() is None:  # the transfer stalled before the kill: leave no node behind
            proc.kill()
    assert "Crash^Test" not in log.read_text()
