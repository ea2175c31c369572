"""kill -9 during a 1000-instance transfer loses nothing that was acknowledged."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pydicom.uid import CTImageStorage

from peers import start_node_process
from testdata import ct_series
from tests.conftest import dataset_bytes


def test_kill_9_mid_series_loses_no_acknowledged_instance(tmp_path):
    data_dir, log = tmp_path / "data", tmp_path / "node.log"
    series = list(ct_series(n_slices=1000, rows=24, cols=24, seed=1234, patient_name="Crash^Test"))
    node = start_node_process(data_dir, stderr=log.open("ab"))
    proc, dimse, http = node.proc, node.dimse_port, node.http_port

    acked: list[str] = []
    kill_after = 400

    def killer() -> None:
        while len(acked) < kill_after and proc.poll() is None:
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)

    ae = AE("CRASHSCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", dimse, ae_title="SEGNODE")
    assert assoc.is_established
    threading.Thread(target=killer, daemon=True).start()
    for ds in series:
        status = assoc.send_c_store(ds)
        if not status or status.Status != 0:
            break
        acked.append(ds.SOPInstanceUID)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert kill_after <= len(acked) < len(series), "the kill did not land mid-series"

    node = start_node_process(data_dir, dimse_port=dimse, http_port=http, stderr=log.open("ab"))  # recovery first
    try:
        with sqlite3.connect(data_dir / "segnode.db") as db:
            rows = dict(db.execute("SELECT sop_instance_uid, path FROM instances").fetchall())
        by_uid = {ds.SOPInstanceUID: ds for ds in series}
        for uid in acked:
            assert uid in rows, f"acknowledged instance {uid} lost"
            assert dataset_bytes(data_dir / rows[uid]) == encode(by_uid[uid], True, True)  # byte-exact
        assert set(rows) <= set(by_uid)
        assert list((data_dir / "tmp").iterdir()) == []
        verify = subprocess.run([sys.executable, "-m", "segnode", "audit", "verify", "--data-dir", str(data_dir)],
                                capture_output=True, text=True, timeout=60)
        assert verify.returncode == 0, verify.stdout
        # the node takes the rest of the series after the restart
        assoc = ae.associate("127.0.0.1", dimse, ae_title="SEGNODE")
        for ds in series[len(acked):]:
            assert assoc.send_c_store(ds).Status == 0
        assoc.release()
        studies = httpx.get(f"http://127.0.0.1:{http}/api/studies", timeout=10).json()
        assert studies[0]["series"][0]["instances"] == 1000
    finally:
        node.stop()
    assert "Crash^Test" not in log.read_text()
