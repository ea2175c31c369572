"""The README's first command ends in `segnode demo`: Orthanc + segnode, phantoms in, SEG + SR out."""

from __future__ import annotations

import subprocess
import sys


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
