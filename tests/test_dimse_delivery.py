"""C-STORE delivery against dcmtk's storescp (a real peer): presentation contexts per kind of instance, and
a PACS that does not take a SOP class refused in one permanent, explained failure."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import dcmread

from peers import storescp
from segnode.config import Destination
from segnode.config import default_models_dir
from segnode.delivery.send import DeliveryError, send_dimse
from segnode.imaging.volume import read_series
from segnode.models.registry import read_manifest
from segnode.outputs.seg import Provenance, build_seg
from segnode.phantom.ct import CTOptions, generate_ct, write_phantom
from tests.testdata import write_ct_series


def _destination(port: int) -> Destination:
    return Destination(kind="dimse", ae_title="STORESCP", host="127.0.0.1", port=port)


def test_a_delivery_of_more_files_than_an_association_has_contexts_arrives_whole(tmp_path):
    files = write_ct_series(tmp_path / "many", n_slices=140, rows=8, cols=8)  # one kind: one context, not 140
    with storescp(tmp_path / "pacs") as port:
        answers = send_dimse(_destination(port), files, "SEGNODE")
    assert len(answers) == 140 and set(answers.values()) == {"C-STORE status 0x0000"}
    assert len(list((tmp_path / "pacs").iterdir())) == 140


def test_a_pacs_that_does_not_take_label_map_segmentation_is_a_permanent_explained_failure(tmp_path):
    phantom = generate_ct(5, CTOptions(matrix=32, slice_spacing=8.0, z_extent_mm=80.0))
    files = write_phantom(phantom, tmp_path / "ct")
    volume = read_series(files)
    sources = [dcmread(f, stop_before_pixels=True) for f in files]
    prov = Provenance("labelmap-job", read_manifest(default_models_dir() / "ct-abdomen-phantom-3d"))
    seg = build_seg(np.asarray(phantom.labels[[f for f, _ in volume.order]]), volume.order, sources, prov,
                    kind="LABELMAP")
    seg.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    # dcmtk 3.6.7 (Debian 12) predates the Label Map Segmentation IOD (2024), as Orthanc 1.10 does
    with storescp(tmp_path / "pacs") as port, pytest.raises(DeliveryError) as caught:
        send_dimse(_destination(port), [files[0], tmp_path / "seg.dcm"], "SEGNODE")
    assert caught.value.retryable is False
    message = str(caught.value)
    assert "does not accept Label Map Segmentation Storage" in message and "seg_type: BINARY" in message
    assert "nothing was sent" in message and not list((tmp_path / "pacs").glob("*"))
