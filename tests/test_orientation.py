"""The same anatomy stored in any of the 48 axis-aligned orientations (rows, columns or slices reversed,
axial, coronal or sagittal) gives the same labels at the same patient positions: the engine brings each
series into the orientation the model was trained in and maps its labels back exactly. Radiographs
likewise in their 8 in-plane variants, by Patient Orientation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from segnode.config import default_models_dir
from segnode.imaging.orientation import OrientationError, axis_codes
from segnode.imaging.volume import read_image, read_series
from segnode.inference.engine import Engine, EngineOptions, engine_for
from segnode.phantom.ct import CTOptions, generate_ct, write_phantom
from segnode.phantom.dx import DXOptions, generate_dx, write_dx
from test_engine import OneHot, _manifest
from testdata import canonical_labels, restored_ct, signed_permutations

VARIANTS = signed_permutations(3)
NAMED = {  # stored as modalities and workstations store them
    "axial": ((0, 1, 2), (False, False, False)), "rows-reversed": ((0, 1, 2), (False, True, False)),
    "columns-reversed": ((0, 1, 2), (False, False, True)), "both-reversed": ((0, 1, 2), (False, True, True)),
    "slices-reversed": ((0, 1, 2), (True, False, False)), "coronal": ((1, 0, 2), (False, False, False)),
    "sagittal": ((2, 0, 1), (False, False, False)), "transposed": ((0, 2, 1), (False, False, False)),
}


@pytest.fixture(scope="module")
def canonical(tmp_path_factory: pytest.TempPathFactory):
    """An axial CT phantom read as the node reads it, and its truth on the same voxels."""
    phantom = generate_ct(3, CTOptions(matrix=64, slice_spacing=5.0, z_extent_mm=160.0))
    vol = read_series(write_phantom(phantom, tmp_path_factory.mktemp("axial")))
    return vol, phantom.labels[[f for f, _ in vol.order]]


def _identity_engine(vol) -> Engine:  # type: ignore[no-untyped-def]
    manifest = _manifest(3, list(vol.spacing), [16, 24, 24]).model_copy(update={"orientation": "SPL"})
    return Engine(manifest, OneHot(6))


@pytest.mark.parametrize("perm, flips", VARIANTS, ids=[f"{p}-{f}" for p, f in VARIANTS])
def test_every_orientation_lands_on_the_same_patient_positions(canonical, tmp_path, perm, flips):
    """Model-free (the image holds the labels): exact, voxel for voxel, in all 48."""
    vol, truth = canonical
    labels_as_hu = truth.astype(np.float32) - 1024  # stored 0..5 with intercept -1024
    files = restored_ct(labels_as_hu, vol.affine, perm, flips, tmp_path)
    stored = read_series(files)
    stored.array += 1024  # back to label values for the one-hot 'model'
    got = _identity_engine(vol).segment(stored).labels
    assert got.shape == stored.array.shape
    np.testing.assert_array_equal(canonical_labels(got, stored.affine, vol.affine), truth)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def test_the_shipped_model_gives_the_same_organs_whatever_the_stored_orientation(canonical, tmp_path):
    """Both reversals and two reformats among them: before, the kidneys came back swapped left/right."""
    vol, _ = canonical
    engine = engine_for(default_models_dir() / "ct-abdomen-phantom-3d", EngineOptions(device="cpu"))
    names = {label.value: label.name for label in engine.manifest.labels}
    reference = engine.segment(vol).labels
    assert {"kidney_right", "kidney_left"} <= set(names.values()) and (reference > 0).any()
    for name, (perm, flips) in NAMED.items():
        stored = read_series(restored_ct(vol.array, vol.affine, perm, flips, tmp_path / name))
        assert (axis_codes(stored.affine[:3, :3]) == "SPL") == (name in ("axial", "slices-reversed"))  # the reader sorts slices
        got = canonical_labels(engine.segment(stored).labels, stored.affine, vol.affine)
        for value, label in names.items():
            dice = _dice(got == value, reference == value)
            assert dice >= 0.99, (name, label, dice)


@pytest.fixture(scope="module")
def radiograph(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    dx = generate_dx(5, DXOptions(matrix=128))
    return write_dx(dx, tmp_path_factory.mktemp("dx")), dx.labels


PLANE = signed_permutations(2)
_LETTERS = {"L": "R", "R": "L", "H": "F", "F": "H"}


def _restored_dx(source: Path, folder: Path, perm: tuple[int, ...], flips: tuple[bool, ...]) -> Path:
    """The same radiograph turned in its plane (transposed and/or flipped), Patient Orientation to match."""
    from segnode.imaging.orientation import Reorientation

    ds = dcmread(source)
    turn = Reorientation(perm, flips)
    pixels = np.ascontiguousarray(turn.apply(ds.pixel_array))
    along_column, along_row = ds.PatientOrientation[1], ds.PatientOrientation[0]  # rows axis, columns axis
    codes = [along_column, along_row]
    codes = [_LETTERS[codes[p]] if flip else codes[p] for p, flip in zip(perm, flips)]
    ds.PatientOrientation = [codes[1], codes[0]]
    ds.Rows, ds.Columns = pixels.shape
    spacing = [float(v) for v in ds.PixelSpacing]
    ds.PixelSpacing = ds.ImagerPixelSpacing = [spacing[perm[0]], spacing[perm[1]]]
    ds.PixelData = pixels.tobytes()
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / "dx.dcm", enforce_file_format=True)
    return folder / "dx.dcm"


def test_the_shipped_radiograph_model_gives_the_same_organs_in_all_eight_in_plane_variants(radiograph, tmp_path):
    from segnode.imaging.orientation import Reorientation

    source, _ = radiograph
    engine = engine_for(default_models_dir() / "dx-chest-phantom-2d", EngineOptions(device="cpu"))
    reference = engine.segment(read_image(source)).labels[0]
    for perm, flips in PLANE:
        got = engine.segment(read_image(_restored_dx(source, tmp_path / f"{perm}{flips}", perm, flips))).labels[0]
        back = Reorientation(perm, flips).restore(got)
        for label in engine.manifest.labels:
            assert _dice(back == label.value, reference == label.value) >= 0.99, (perm, flips, label.name)


def test_a_radiograph_without_patient_orientation_or_in_another_view_is_refused(radiograph, tmp_path):
    source, _ = radiograph
    engine = engine_for(default_models_dir() / "dx-chest-phantom-2d", EngineOptions(device="cpu"))
    ds = dcmread(source)
    del ds.PatientOrientation
    ds.save_as(tmp_path / "none.dcm", enforce_file_format=True)
    with pytest.raises(OrientationError, match="no Patient Orientation"):
        engine.segment(read_image(tmp_path / "none.dcm"))
    ds.PatientOrientation = ["P", "F"]  # a lateral view: rows toward the feet, columns toward the back
    ds.save_as(tmp_path / "lateral.dcm", enforce_file_format=True)
    with pytest.raises(OrientationError, match="not the model's"):
        engine.segment(read_image(tmp_path / "lateral.dcm"))


def test_an_image_of_the_other_kind_is_refused_with_the_series(radiograph, canonical, tmp_path):
    """A radiograph that carries patient coordinates reads as a one-slice volume; a CT slice without them as
    a projection: neither fits the model routed to, and each is refused by name."""
    source, _ = radiograph
    ds = dcmread(source)
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 0, -1]
    ds.save_as(tmp_path / "dx-volume.dcm", enforce_file_format=True)
    dx_model = engine_for(default_models_dir() / "dx-chest-phantom-2d", EngineOptions(device="cpu"))
    with pytest.raises(OrientationError, match=rf"series {ds.SeriesInstanceUID}: a volume for a model trained on "
                                               "radiographs"):
        dx_model.segment(read_image(tmp_path / "dx-volume.dcm"))


def test_a_3d_model_refuses_a_series_that_covers_too_little_of_the_body(canonical, tmp_path):
    from segnode.imaging.volume import SeriesError

    vol, _ = canonical
    files = restored_ct(vol.array[10:12], vol.affine, (0, 1, 2), (False, False, False), tmp_path)
    ct_model = engine_for(default_models_dir() / "ct-abdomen-phantom-3d", EngineOptions(device="cpu"))
    with pytest.raises(SeriesError, match="covers 10 mm along array axis 0; ct-abdomen-phantom-3d looks at 192 mm"):
        ct_model.segment(read_series(files))
