"""The README's first command ends in `segnode demo`: it must work and show a segmentation."""

from __future__ import annotations

import subprocess
import sys


def test_demo_receives_routes_and_segments_a_phantom(tmp_path):
    run = subprocess.run([sys.executable, "-m", "node", "demo", "--data-dir", str(tmp_path / "demo")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "rule ct-abdomen -> ct-abdomen-phantom-3d" in run.stdout and ": succeeded" in run.stdout
    assert "Dice against the phantom's truth: liver" in run.stdout
    assert "audit trail:" in run.stdout and "intact" in run.stdout
