"""A real PACS as the sender: Orthanc pushes a study to segnode over C-STORE and over STOW-RS."""

from __future__ import annotations

import httpx
import pytest

from peers import orthanc
from tests.conftest import dataset_bytes, instances


@pytest.fixture
def pacs(node, tmp_path, ct_files):
    """Orthanc holding the CT series, with segnode registered as a DICOM modality and a DICOMweb server."""
    with orthanc(tmp_path / "orthanc", peers={"segnode": ("SEGNODE", "127.0.0.1", node.dimse.port)},
                 dicomweb_servers={"segnode": f"http://127.0.0.1:{node.http_port}/dicom-web/"}) as server:
        for path in ct_files:
            assert httpx.post(f"{server.url}/instances", content=path.read_bytes(), timeout=30).status_code == 200
        yield server


def _study_id(pacs) -> str:
    studies = httpx.get(f"{pacs.url}/studies", timeout=10).json()
    assert len(studies) == 1
    return studies[0]


def _check_received(node, ct_files) -> None:
    rows = {r.sop_instance_uid: r for r in instances(node)}
    assert len(rows) == len(ct_files)
    sent = {dataset_bytes(p) for p in ct_files}
    assert {dataset_bytes(node.settings.data_dir / r.path) for r in rows.values()} == sent


def test_orthanc_c_store_to_segnode(node, pacs, ct_files):
    rsp = httpx.post(f"{pacs.url}/modalities/segnode/store", json={"Resources": [_study_id(pacs)]}, timeout=60)
    assert rsp.status_code == 200, rsp.text
    _check_received(node, ct_files)
    assert all(r.source.startswith("dimse:ORTHANC@") for r in instances(node))


def test_orthanc_stow_rs_to_segnode(node, pacs, ct_files):
    rsp = httpx.post(f"{pacs.url}/dicom-web/servers/segnode/stow", json={"Resources": [_study_id(pacs)]}, timeout=60)
    assert rsp.status_code == 200, rsp.text
    _check_received(node, ct_files)
    assert all(r.source.startswith("stow:") for r in instances(node))
