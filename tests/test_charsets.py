"""Every defined term of Specific Character Set (PS3.3 C.12.1.1.2), single- and multi-valued, an empty
value 1 included (PS3.5 Annex H), passes from the source into the SEG and the SR, and the patient's
name comes back as sent when both are read with highdicom."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from segnode.config import default_models_dir
from segnode.imaging.volume import read_series
from segnode.models.registry import read_manifest
from segnode.outputs.seg import Provenance, build_seg
from segnode.outputs.sr import build_sr, segment_stats
from segnode.phantom.ct import CTOptions, generate_ct, write_phantom

LATIN = "Müller^Jörg"
CASES = [
    ("ISO_IR 100", LATIN), ("ISO_IR 101", "Dvořák^Zdeněk"), ("ISO_IR 109", LATIN), ("ISO_IR 110", LATIN),
    ("ISO_IR 144", "Иванов^Иван"), ("ISO_IR 127", "قباني^لنزار"), ("ISO_IR 126", "Διονυσιος"),
    ("ISO_IR 138", "שרון^דבורה"), ("ISO_IR 148", "Çelik^Ağa"), ("ISO_IR 203", LATIN), ("ISO_IR 13", "ﾔﾏﾀﾞ^ﾀﾛｳ"),
    ("ISO_IR 166", "ประเทศไทย"), ("ISO_IR 192", "Wang^XiaoDong=王^小东"), ("GB18030", "Wang^XiaoDong=王^小东"),
    ("GBK", "王^小东"),
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    (["ISO 2022 IR 13", "ISO 2022 IR 87"], "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"),
    (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동"),
    (["ISO 2022 IR 6", "ISO 2022 IR 100"], LATIN),
    (["", "ISO 2022 IR 58"], "Zhang^XiaoDong=张^小东"),  # pydicom alone garbles it: segnode.dicom.charsets
    (["ISO 2022 IR 6", "ISO 2022 IR 58"], "王^小东"),
    (["", "ISO 2022 IR 87", "ISO 2022 IR 159"], "Yamada^Tarou=山田^太郎"),
]


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    phantom = generate_ct(2, CTOptions(matrix=16, slice_spacing=10.0, z_extent_mm=40.0))
    return write_phantom(phantom, tmp_path_factory.mktemp("charset"))


@pytest.mark.parametrize("charset, name", CASES, ids=[str(c) for c, _ in CASES])
def test_the_character_set_and_the_names_pass_into_seg_and_sr(series, tmp_path, charset, name):
    files = []
    for path in series:
        ds = dcmread(path)
        ds.SpecificCharacterSet, ds.PatientName = charset, name
        files.append(tmp_path / path.name)
        ds.save_as(files[-1], enforce_file_format=True)
    vol = read_series(files)
    sources = [dcmread(f, stop_before_pixels=True) for f in files]
    assert str(sources[0].PatientName) == name
    labels = np.zeros(vol.array.shape, np.uint8)
    labels[:, 4:9, 4:9] = 1
    prov = Provenance("charset-job", read_manifest(default_models_dir() / "ct-abdomen-phantom-3d"))
    seg = build_seg(labels, vol.order, sources, prov)
    stats = segment_stats(labels, vol.array, vol.affine, [1], ["liver"], hounsfield=True)
    sr = build_sr(seg, sources, vol.order, stats, prov)
    expected = charset if isinstance(charset, list) else [charset]
    for built, read in ((seg, hd.seg.segread), (sr, hd.sr.srread)):
        buffer = io.BytesIO()
        built.save_as(buffer, enforce_file_format=True)
        back = read(io.BytesIO(buffer.getvalue()))
        stored = back.SpecificCharacterSet
        assert (list(stored) if not isinstance(stored, str) else [stored]) == expected
        assert str(back.PatientName) == name



def test_gb2312_names_as_a_modality_writes_them_are_read_right():
    """ESC $ ) A before each run of Chinese (PS3.5 Annex K): pydicom alone leaves '$)A' in the name."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", generate_uid()
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 58"]
    ds.PatientName = b"Zhang^XiaoDong=\x1b$)A\xd5\xc5^\x1b$)A\xd0\xa1\xb6\xab"  # as sent, not as pydicom writes
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert str(dcmread(io.BytesIO(buffer.getvalue())).PatientName) == "Zhang^XiaoDong=张^小东"


def test_a_vendor_private_element_does_not_stop_the_results_of_a_multi_valued_character_set(series, tmp_path):
    """The copies highdicom gets decode standard elements only: an ELSCINT1 element that disagrees with
    pydicom's private dictionary (as the reader tolerates it) must not make encoding fail."""
    files = []
    for path in series:
        ds = dcmread(path)
        ds.SpecificCharacterSet, ds.PatientName = ["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎"
        ds.add_new(0x01F10010, "LO", "ELSCINT1")
        ds.add_new(0x01F11026, "UN", b"0.5 ")
        files.append(tmp_path / path.name)
        ds.save_as(files[-1], enforce_file_format=True)
    vol = read_series(files)
    sources = [dcmread(f, stop_before_pixels=True) for f in files]
    labels = np.zeros(vol.array.shape, np.uint8)
    labels[:, 4:9, 4:9] = 1
    prov = Provenance("charset-job", read_manifest(default_models_dir() / "ct-abdomen-phantom-3d"))
    seg = build_seg(labels, vol.order, sources, prov)
    assert list(seg.SpecificCharacterSet) == ["", "ISO 2022 IR 87"] and str(seg.PatientName) == "Yamada^Tarou=山田^太郎"
