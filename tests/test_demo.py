"""The README's first command ends in `segnode demo`: Orthanc + segnode, phantoms in, SEG + SR out."""

from __future__ import annotations

import subprocess
import sys

import httpx

from node.peers import orthanc


def test_demo_delivers_seg_and_sr_to_orthanc_with_lineage(tmp_path):
    run = subprocess.run([sys.executable, "-m", "node", "demo", "--data-dir", str(tmp_path / "demo")],
                         capture_output=True, text=True, timeout=900)
    out = run.stdout
    assert run.returncode == 0, out + run.stderr
    assert "ct-abdomen-phantom-3d 1.1.0 (rule ct-abdomen): succeeded" in out
    assert "dx-chest-phantom-2d 1.0.0 (rule chest-radiograph): succeeded" in out
    deliveries = [line for line in out.splitlines() if line.startswith("delivery job")]
    assert len(deliveries) == 2 and all(line.endswith("to orthanc: succeeded") for line in deliveries)
    assert "liver" in out and "mL (truth" in out and "Dice 0.9" in out
    assert "DICOM Instances Transferred: confirmed by Orthanc REST" in out
    assert "audit trail:" in out and "intact" in out


def test_demo_uses_an_orthanc_that_is_already_running(tmp_path):
    with orthanc(tmp_path / "orthanc", aet="HOSPITALPACS") as pacs:
        run = subprocess.run([sys.executable, "-m", "node", "demo", "--data-dir", str(tmp_path / "demo"),
                              "--orthanc", pacs.url], capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout + run.stderr
        assert f"Orthanc (already running) at {pacs.url}, DICOM HOSPITALPACS@127.0.0.1:{pacs.dicom_port}" in run.stdout
        modalities = {httpx.get(f"{pacs.url}/series/{s}", timeout=10).json()["MainDicomTags"]["Modality"]
                      for s in httpx.get(f"{pacs.url}/series", timeout=10).json()}
        assert {"CT", "DX", "SEG", "SR"} <= modalities  # images from the 'modality', results from segnode
    assert pacs.proc is not None and pacs.proc.returncode is not None  # stopped by us, not by the demo
    missing = subprocess.run([sys.executable, "-m", "node", "demo", "--data-dir", str(tmp_path / "again"),
                              "--orthanc", pacs.url], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and f"no Orthanc answers at {pacs.url}" in missing.stderr
