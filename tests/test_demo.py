"""The README's first command ends in `segnode demo`: Orthanc + segnode, phantoms in, SEG + SR out."""

from __future__ import annotations

import subprocess
import sys

from segnode.cli import _demo_settings
from peers import RunningOrthanc, orthanc


def test_demo_delivers_seg_and_sr_to_orthanc_with_lineage(tmp_path):
    run = subprocess.run([sys.executable, "-m", "segnode", "demo", "--data-dir", str(tmp_path / "demo")],
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
    viewer = [line for line in out.splitlines() if line.startswith("in OHIF, the ")]
    assert len(viewer) == 2 and all("/viewer?StudyInstanceUIDs=1.2.826." in line for line in viewer), out


def test_demo_can_use_an_orthanc_that_is_already_running(tmp_path):
    """`segnode demo --orthanc URL`: the PACS's AE title and DICOM port come from its REST API, and the
    results go there (the rest of the demo is the same code as above)."""
    with orthanc(tmp_path / "orthanc", aet="HOSPITALPACS") as pacs:
        found = RunningOrthanc.at(pacs.url.replace("http://", "http://demo:secret@"))
        assert (found.url, found.aet, found.dicom_port, found.host) == (pacs.url, "HOSPITALPACS", pacs.dicom_port,
                                                                       "127.0.0.1")
        dest = _demo_settings(tmp_path / "demo", found).destinations["orthanc"]
        assert (dest.ae_title, dest.port, dest.orthanc_url, dest.username) == ("HOSPITALPACS", pacs.dicom_port,
                                                                               pacs.url, "demo")
        assert dest.password is not None and dest.password.get_secret_value() == "secret"
        with found:
            pass
        assert pacs.proc is not None and pacs.proc.poll() is None  # not the demo's to stop
    missing = subprocess.run([sys.executable, "-m", "segnode", "demo", "--data-dir", str(tmp_path / "again"),
                              "--orthanc", pacs.url], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and f"no Orthanc answers at {pacs.url}" in missing.stderr


def test_the_demo_never_uses_the_nodes_configuration(tmp_path, monkeypatch):
    """SEGNODE_CONFIG on a production host must not route phantoms to its database, rules or PACS."""
    prod = tmp_path / "prod.yaml"
    prod.write_text("database_url: postgresql://prod/segnode\nrouting: {rules: /etc/segnode/rules.yaml}\n"
                    "destinations: {pacs: {kind: dicomweb, url: 'http://pacs.hospital/dicom-web'}}\n")
    monkeypatch.setenv("SEGNODE_CONFIG", str(prod))
    pacs = RunningOrthanc("http://127.0.0.1:8042", "ORTHANC", 4242, "127.0.0.1")
    settings = _demo_settings(tmp_path / "demo", pacs)
    assert settings.database_url is None and settings.routing.rules is None
    assert list(settings.destinations) == ["orthanc"] and settings.data_dir == tmp_path / "demo"
