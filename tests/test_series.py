"""Series -> volume: ordering by position, exact affine, enhanced multi-frame, compressed pixels, and a
named refusal for every series that is not one regular volume."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import EnhancedCTImageStorage, JPEG2000Lossless, RLELossless, generate_uid

from segnode.imaging.volume import SeriesError, dicom_files, read_series
from segnode.phantom.ct import CTOptions, generate_ct, write_phantom


def _series(tmp_path: Path, name: str = "ct", **options) -> tuple[list[Path], object]:
    phantom = generate_ct(11, CTOptions(matrix=32, slice_spacing=5.0, z_extent_mm=60.0, **options))
    return write_phantom(phantom, tmp_path / name), phantom


def _ipp_along_normal(vol) -> np.ndarray:
    return vol.affine[:3, 0]


def test_slices_are_ordered_by_position_not_instance_number(tmp_path):
    files, phantom = _series(tmp_path)
    shuffled = [files[i] for i in np.random.default_rng(0).permutation(len(files))]
    forward = read_series(shuffled)
    backward, rev_phantom = _series(tmp_path, "rev", reversed_order=True)
    reverse = read_series(backward)
    # the same anatomy stacked the same way, whatever the file and instance order
    forward_labels = phantom.labels[[files.index(shuffled[f]) for f, _ in forward.order]]
    np.testing.assert_array_equal(forward_labels, rev_phantom.labels[[f for f, _ in reverse.order]])
    np.testing.assert_allclose(forward.affine, reverse.affine, atol=1e-3)
    # index (k, 0, 0) lands on the k-th slice's Image Position (Patient), pixel values in HU
    for k, (file, _) in enumerate(forward.order):
        ds = dcmread(shuffled[file])
        np.testing.assert_allclose(forward.affine @ [k, 0, 0, 1], [*map(float, ds.ImagePositionPatient), 1], atol=1e-3)
        np.testing.assert_allclose(forward.array[k], ds.pixel_array * 1.0 + float(ds.RescaleIntercept))
    assert forward.spacing == pytest.approx((5.0, *phantom.pixel_spacing), abs=1e-3)


def test_oblique_series_keeps_its_rotated_affine(tmp_path):
    files, phantom = _series(tmp_path, oblique_deg=20.0)
    vol = read_series(files)
    np.testing.assert_allclose(vol.affine[:3, 2] / vol.spacing[2], phantom.orientation[:3], atol=1e-5)
    np.testing.assert_allclose(vol.affine[:3, 1] / vol.spacing[1], phantom.orientation[3:], atol=1e-5)
    assert not vol.sheared and vol.notes == []


def test_tilted_series_is_accepted_sheared_or_refused_by_policy(tmp_path):
    files, _ = _series(tmp_path, tilt_deg=15.0)
    vol = read_series(files)
    assert vol.sheared and "gantry tilt of 15.0 degrees" in vol.notes[0]
    with pytest.raises(SeriesError, match=r"gantry tilt of 15\.0 degrees.*'refuse'"):
        read_series(files, tilt="refuse")


def _rewrite(files: list[Path], index: int, change) -> None:
    ds = dcmread(files[index])
    change(ds)
    ds.save_as(files[index], enforce_file_format=True)


@pytest.mark.parametrize("damage, reason", [
    (lambda files: files.pop(5), r"uneven slice spacing: 10\.00 mm between .* where 5\.00 mm is usual.*missing"),
    (lambda files: files.append(files[3]), r"share a position"),
    (lambda files: _rewrite(files, 2, lambda ds: setattr(ds, "Rows", 16) or setattr(
        ds, "PixelData", ds.PixelData[: 16 * 32 * 2])), r"mixed image sizes 32x32 \(\d+ slices\) and 16x32 \(1 slice\)"),
    (lambda files: _rewrite(files, 2, lambda ds: setattr(ds, "ImageOrientationPatient", [0, 1, 0, 0, 0, -1])),
     r"mixed orientations"),
    (lambda files: _rewrite(files, 2, lambda ds: setattr(ds, "SeriesInstanceUID", generate_uid())),
     r"belong to 2 series"),
    (lambda files: _rewrite(files, 2, lambda ds: delattr(ds, "ImagePositionPatient")), r"without Image Position"),
    (lambda files: _rewrite(files, 2, lambda ds: delattr(ds, "PixelData")), r"no pixel data"),
    (lambda files: _rewrite(files, 2, lambda ds: setattr(ds, "PixelSpacing", [0.5, 0.5])), r"mixed pixel spacings"),
    (lambda files: _rewrite(files, 0, lambda ds: setattr(ds, "SamplesPerPixel", 3)), r"color images"),
])
def test_irregular_series_are_refused_with_the_series_and_reason(tmp_path, damage, reason):
    files, phantom = _series(tmp_path)
    damage(files)
    with pytest.raises(SeriesError, match=reason) as info:
        read_series(files)
    if "2 series" not in reason:
        assert phantom.datasets[0].SeriesInstanceUID in str(info.value)


def _enhanced(files: list[Path]) -> Dataset:
    """The single-frame series as one Enhanced CT instance: frames in shuffled order, per-frame
    positions and rescale, shared orientation and pixel measures."""
    slices = [dcmread(f) for f in files]
    order = np.random.default_rng(1).permutation(len(slices))
    first = slices[0]
    ds = copy.deepcopy(first)
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                    "RescaleSlope", "RescaleIntercept", "RescaleType", "SliceLocation"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.NumberOfFrames = len(slices)
    shared = Dataset()
    orientation, measures = Dataset(), Dataset()
    orientation.ImageOrientationPatient = first.ImageOrientationPatient
    measures.PixelSpacing, measures.SliceThickness = first.PixelSpacing, first.SliceThickness
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = Sequence([orientation]), Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for i in order:
        frame, position, rescale = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = slices[i].ImagePositionPatient
        rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = 1, -1024, "HU"
        frame.PlanePositionSequence, frame.PixelValueTransformationSequence = Sequence([position]), Sequence([rescale])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = b"".join(slices[i].PixelData for i in order)
    return ds


def test_enhanced_multiframe_reads_like_the_single_frame_series(tmp_path):
    files, _ = _series(tmp_path, oblique_deg=10.0)
    single = read_series(files)
    path = tmp_path / "enhanced.dcm"
    _enhanced(files).save_as(path, enforce_file_format=True)
    multi = read_series([path])
    np.testing.assert_array_equal(multi.array, single.array)
    np.testing.assert_allclose(multi.affine, single.affine, atol=1e-6)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_series_decode_to_the_same_volume(tmp_path, syntax):
    files, _ = _series(tmp_path)
    plain = read_series(files)
    for path in files:
        ds = dcmread(path)
        ds.compress(syntax)
        ds.save_as(path, enforce_file_format=True)
    assert dcmread(files[0]).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(read_series(files).array, plain.array)


def test_dicom_files_skips_other_files_and_names_an_empty_folder(tmp_path):
    files, _ = _series(tmp_path)
    assert dicom_files(tmp_path / "ct") == sorted(files)  # labels.npz and phantom.json are passed over
    (tmp_path / "empty").mkdir()
    with pytest.raises(SeriesError, match="no DICOM files"):
        dicom_files(tmp_path / "empty")


def test_an_enhanced_frame_without_its_rescale_is_refused_not_read_raw(tmp_path):
    files, _ = _series(tmp_path)
    ds = _enhanced(files)
    del ds.PerFrameFunctionalGroupsSequence[2].PixelValueTransformationSequence
    ds.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    with pytest.raises(SeriesError, match="frame 3 of instance 1 has no Pixel Value Transformation"):
        read_series([tmp_path / "enhanced.dcm"])
