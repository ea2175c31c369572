"""What a stored value means to the model: pixel meaning and spacing as modalities store them, each
source interpreted (and tested to give the expected value) or refused with the series and the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from segnode.imaging.volume import SeriesError, read_image, read_series
from segnode.phantom.dx import DXOptions, generate_dx, write_dx
from testdata import ct_series


@pytest.fixture(scope="module")
def radiograph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dx(generate_dx(4, DXOptions(matrix=64)), tmp_path_factory.mktemp("dx"))


def _restored(source: Path, folder: Path, change) -> Path:  # type: ignore[no-untyped-def]
    ds = dcmread(source)
    change(ds)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / source.name
    ds.save_as(path, enforce_file_format=True)
    return path


def _inverted_pixels(ds: Dataset) -> None:
    top = 2 ** int(ds.BitsStored) - 1
    ds.PixelData = (top - ds.pixel_array.astype(np.int64)).astype(ds.pixel_array.dtype).tobytes()


def _monochrome1(ds: Dataset) -> None:  # the DX IOD's own way: MONOCHROME1 goes with INVERSE
    _inverted_pixels(ds)
    ds.PhotometricInterpretation, ds.PresentationLUTShape = "MONOCHROME1", "INVERSE"


def _inverse_lut(ds: Dataset) -> None:  # MONOCHROME2 shown through an inverting Presentation LUT
    _inverted_pixels(ds)
    ds.PresentationLUTShape = "INVERSE"


@pytest.mark.parametrize("change", [_monochrome1, _inverse_lut], ids=["MONOCHROME1", "presentation-LUT-INVERSE"])
def test_an_inverted_radiograph_means_what_the_monochrome2_one_means(radiograph, tmp_path, change):
    original = read_image(radiograph)
    inverted = read_image(_restored(radiograph, tmp_path / "inverted", change))
    np.testing.assert_array_equal(inverted.array, original.array)
    assert any("inverted to MONOCHROME2" in note for note in inverted.notes)


def _ct_files(folder: Path, change=None) -> list[Path]:  # type: ignore[no-untyped-def]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in ct_series(n_slices=3, rows=16, cols=16, seed=5):
        if change is not None:
            change(ds)
        path = folder / f"{int(ds.InstanceNumber):03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_hounsfield_units_are_never_inverted(tmp_path):
    def monochrome1(ds: Dataset) -> None:
        ds.PhotometricInterpretation = "MONOCHROME1"

    plain = read_series(_ct_files(tmp_path / "a"))
    shown_inverted = read_series(_ct_files(tmp_path / "b", monochrome1))
    np.testing.assert_array_equal(shown_inverted.array, plain.array)


def test_pixel_padding_becomes_the_lowest_real_value(tmp_path):
    def padded(ds: Dataset) -> None:
        px = ds.pixel_array.copy()
        px[:2, :] = 0  # stored 0 -> -1024 HU after rescale; marked as padding
        ds.PixelData, ds.PixelPaddingValue = px.tobytes(), 0

    vol = read_series(_ct_files(tmp_path / "p", padded))
    real = vol.array[:, 2:, :]
    assert (vol.array[:, :2, :] == real.min()).all() and real.min() > -1024
    assert any("padding" in note for note in vol.notes)


def _spacing(**attributes: object):  # type: ignore[no-untyped-def]
    def change(ds: Dataset) -> None:
        for keyword in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing",
                        "EstimatedRadiographicMagnificationFactor"):
            if keyword in ds:
                delattr(ds, keyword)
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
    return change


@pytest.mark.parametrize("attributes, expected, source", [
    ({"PixelSpacing": [0.3, 0.4]}, (0.3, 0.4), None),
    ({"ImagerPixelSpacing": [0.2, 0.2], "EstimatedRadiographicMagnificationFactor": 1.25}, (0.16, 0.16),
     "Estimated Radiographic Magnification Factor 1.25"),
    ({"ImagerPixelSpacing": [0.2, 0.25]}, (0.2, 0.25), "at the detector"),
    ({"NominalScannedPixelSpacing": [0.5, 0.5]}, (0.5, 0.5), "Nominal Scanned Pixel Spacing"),
    ({"PixelSpacing": [0.3, 0.3], "ImagerPixelSpacing": [0.2, 0.2]}, (0.3, 0.3), None),  # calibrated wins
], ids=["pixel", "imager-magnified", "imager-only", "nominal-scanned", "pixel-over-imager"])
def test_each_spacing_source_gives_the_expected_millimetres(radiograph, tmp_path, attributes, expected, source):
    vol = read_image(_restored(radiograph, tmp_path / "s", _spacing(**attributes)))
    assert vol.spacing[1:] == pytest.approx(expected)
    noted = [note for note in vol.notes if note.startswith("pixel spacing from")]
    assert (source in noted[0]) if source else noted == []


def test_missing_spacing_is_refused_with_the_series_and_the_reason(radiograph, tmp_path):
    path = _restored(radiograph, tmp_path / "none", _spacing())
    with pytest.raises(SeriesError, match=r"series [0-9.]+: no pixel spacing"):
        read_image(path)


@pytest.mark.parametrize("kind", ["PALETTE COLOR", "YBR_FULL"])
def test_colour_images_are_refused(radiograph, tmp_path, kind):
    def colour(ds: Dataset) -> None:
        ds.PhotometricInterpretation = kind

    with pytest.raises(SeriesError, match="only grayscale"):
        read_image(_restored(radiograph, tmp_path / "c", colour))


def test_a_vendor_private_element_pydicom_cannot_decode_costs_nothing(tmp_path):
    """Elscint/Philips write a decimal string where pydicom's private dictionary expects FD (8 bytes)."""
    def private(ds: Dataset) -> None:
        ds.add_new(0x01F10010, "LO", "ELSCINT1")
        ds.add_new(0x01F11026, "UN", b"0.5 ")

    plain = read_series(_ct_files(tmp_path / "a"))
    tagged = read_series(_ct_files(tmp_path / "b", private))
    np.testing.assert_array_equal(tagged.array, plain.array)


def test_a_modality_lut_in_ow_is_applied(radiograph, tmp_path):
    from pydicom.sequence import Sequence

    def lut(ds: Dataset) -> None:
        item = Dataset()
        item.LUTDescriptor = [4096, 0, 16]
        item.add_new(0x00283006, "OW", (2 * np.arange(4096, dtype=np.uint16)).tobytes())  # LUT Data as OW
        item.ModalityLUTType = "US"
        ds.ModalityLUTSequence = Sequence([item])
        for keyword in ("RescaleSlope", "RescaleIntercept"):
            if keyword in ds:
                delattr(ds, keyword)

    original = read_image(radiograph)
    doubled = read_image(_restored(radiograph, tmp_path / "lut", lut))
    np.testing.assert_array_equal(doubled.array, 2 * original.array)


def test_monochrome1_of_a_quantitative_modality_keeps_its_values(tmp_path):
    """PET's activity (as CT's HU, MR's signal) means the same whatever its display: never inverted."""
    def pet(ds: Dataset) -> None:
        ds.Modality, ds.RescaleIntercept, ds.RescaleSlope = "PT", 0, 0.25

    def pet_monochrome1(ds: Dataset) -> None:
        pet(ds)
        ds.PhotometricInterpretation = "MONOCHROME1"

    np.testing.assert_array_equal(read_series(_ct_files(tmp_path / "m1", pet_monochrome1)).array,
                                  read_series(_ct_files(tmp_path / "m2", pet)).array)


def test_padding_written_as_us_on_signed_pixels_is_masked(tmp_path):
    def signed(ds: Dataset) -> None:
        px = ds.pixel_array.astype(np.int16) - 1024
        px[:2, :] = -2000
        ds.PixelRepresentation, ds.RescaleIntercept = 1, 0
        ds.PixelData = px.tobytes()
        ds.add_new(0x00280120, "US", 63536)  # -2000 as the US the attribute was written with

    vol = read_series(_ct_files(tmp_path / "s", signed))
    assert vol.array.min() > -2000 and any("padding" in note for note in vol.notes)
    plain = read_series(_ct_files(tmp_path / "p"))
    assert not any("padding" in note for note in plain.notes)  # said only when pixels were masked
