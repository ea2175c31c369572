"""Bring a volume into the patient orientation a model was trained in, and its labels back, exactly.

A model sees arrays, not patients: the same anatomy stored with rows and columns reversed, or as a
coronal reformat, is another array, and a model trained on axial slices would swap left and right on
it. Orientations are written as axis codes, one letter per array axis saying where increasing index
points in the patient (DICOM LPS: L left, R right, A anterior, P posterior, S superior/head, I
inferior/feet; Patient Orientation's H and F are read as S and I). An axial series as CT stores it is
"SPL": slices toward the head, rows toward the back, columns toward the patient's left.

Moving between two orientations is a permutation of the axes and a flip of some: no interpolation, so
labels come back on exactly the voxels they were found on. An oblique series goes to the nearest
orientation (the permutation whose axes agree best with the target's).

Projection images (DX, CR) have no patient coordinates: their two in-plane axes are named by Patient
Orientation (0020,0020), and a radiograph whose plane is not the model's (a lateral view for a model
trained on frontal ones) is refused, as is one without Patient Orientation.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np

from segnode.imaging.volume import SeriesError, Volume
from segnode.models.manifest import PATIENT_DIRECTIONS, check_codes

_LETTER = {direction: code for code, direction in PATIENT_DIRECTIONS.items()}


class OrientationError(SeriesError):
    """The image's orientation cannot be known, or cannot be brought into the model's: the series is
    refused (the message names it and says why)."""


def direction(code: str) -> np.ndarray:
    """The unit vector (LPS) an axis code points along."""
    axis, sign = PATIENT_DIRECTIONS[code]
    v = np.zeros(3)
    v[axis] = sign
    return v


def axis_codes(directions: np.ndarray) -> str:
    """The nearest axis codes for the unit direction vectors (LPS) of each array axis, as columns."""
    return "".join(_LETTER[(int(np.argmax(abs(d))), 1 if d[int(np.argmax(abs(d)))] > 0 else -1)]
                   for d in directions.T)


@dataclass(frozen=True)
class Reorientation:
    """How an array was turned: new axis i is old axis `perm[i]`, reversed where `flips[i]`."""

    perm: tuple[int, ...]
    flips: tuple[bool, ...]

    @property
    def identity(self) -> bool:
        return self.perm == tuple(range(len(self.perm))) and not any(self.flips)

    def apply(self, array: np.ndarray) -> np.ndarray:
        """The array in the new orientation (a view where numpy can)."""
        turned = np.transpose(array, self.perm)
        axes = tuple(i for i, flip in enumerate(self.flips) if flip)
        return np.flip(turned, axes) if axes else turned

    def restore(self, array: np.ndarray) -> np.ndarray:
        """The inverse of `apply`: an array in the new orientation back in the old one."""
        axes = tuple(i for i, flip in enumerate(self.flips) if flip)
        unflipped = np.flip(array, axes) if axes else array
        return np.ascontiguousarray(np.transpose(unflipped, np.argsort(self.perm)))

    def index_map(self, new_shape: tuple[int, ...]) -> np.ndarray:
        """4x4 (3D) from a new index to the old index, so that new affine = old affine @ this."""
        m = np.zeros((4, 4))
        m[3, 3] = 1.0
        for i, (old, flip) in enumerate(zip(self.perm, self.flips)):
            m[old, i] = -1.0 if flip else 1.0
            m[old, 3] = new_shape[i] - 1 if flip else 0.0
        return m


def _best(source: list[np.ndarray], target: list[np.ndarray]) -> Reorientation:
    """The signed permutation that lines the source axes up best with the target's."""
    best: tuple[float, tuple[int, ...]] = (-1.0, ())
    for perm in itertools.permutations(range(len(source))):
        score = sum(abs(float(np.dot(t, source[p]))) for t, p in zip(target, perm))
        if score > best[0] + 1e-9:
            best = (score, perm)
    perm = best[1]
    return Reorientation(perm, tuple(float(np.dot(t, source[p])) < 0 for t, p in zip(target, perm)))


def volume_reorientation(affine: np.ndarray, target: str) -> Reorientation:
    """For a 3D volume (LPS affine, columns = array axes): the turn into `target` codes (3 letters)."""
    directions = [affine[:3, j] / np.linalg.norm(affine[:3, j]) for j in range(3)]
    return _best(directions, [direction(c) for c in check_codes(target, 3)])


def projection_reorientation(patient_orientation: tuple[str, str] | None, target: str) -> Reorientation:
    """For a projection image (1, rows, cols): the in-plane turn into `target` (2 letters: where rows,
    then columns, point), from Patient Orientation (column direction, row direction: PS3.3 C.7.6.1.1.1).

    Raises:
        OrientationError: no usable Patient Orientation, or an image plane other than the model's.
    """
    want = check_codes(target, 2)
    if not patient_orientation or len(patient_orientation) != 2 or not all(patient_orientation):
        raise OrientationError("no Patient Orientation (0020,0020): left and right cannot be told apart on this "
                               f"radiograph, and the model expects rows toward {want[0]} and columns toward {want[1]}")
    along_row, along_column = (str(v).strip().upper()[:1] for v in patient_orientation)  # dominant letter
    try:
        have = check_codes(along_column + along_row, 2)  # (rows, columns), as the target
    except ValueError as exc:
        raise OrientationError(f"Patient Orientation {list(patient_orientation)} cannot be read: {exc}") from exc
    source = [direction(c) for c in have]
    wanted = [direction(c) for c in want]
    turn = _best(source, wanted)
    if any(abs(float(np.dot(t, source[p]))) < 0.5 for t, p in zip(wanted, turn.perm)):
        raise OrientationError(f"the image plane (rows toward {have[0]}, columns toward {have[1]}) is not the model's "
                               f"(rows toward {want[0]}, columns toward {want[1]}): a different view")
    return Reorientation((0, *(p + 1 for p in turn.perm)), (False, *turn.flips))


def describe(codes_before: str, codes_after: str) -> str:
    return f"reoriented for the model: array axes {'-'.join(codes_before)} -> {'-'.join(codes_after)} " \
           f"(labels mapped back exactly)"


def reorient_volume(volume: Volume, target: str) -> tuple[Volume, Reorientation]:
    """`volume` in the `target` orientation (3 letters for a volume, 2 for a projection image), and the
    turn that `Reorientation.restore` undoes on its labels.

    Raises:
        OrientationError: a projection image without Patient Orientation, or showing another view.
    """
    series = f"series {volume.series_uid or '(no Series Instance UID)'}"
    if volume.projection != (len(target) == 2):
        raise OrientationError(f"{series}: a {'radiograph (no patient coordinates)' if volume.projection else 'volume'}"
                               f" for a model trained on {'volumes' if len(target) == 3 else 'radiographs'} "
                               f"(orientation {target}): route it to a model for its kind of image")
    if volume.projection:
        try:
            turn = projection_reorientation(volume.patient_orientation, target)
        except OrientationError as exc:
            raise OrientationError(f"{series}: {exc}") from exc
    else:
        turn = volume_reorientation(volume.affine, target)
    if turn.identity:
        return volume, turn
    array = np.ascontiguousarray(turn.apply(volume.array))
    affine = volume.affine @ turn.index_map(array.shape)
    s = volume.spacing
    spacing = (s[turn.perm[0]], s[turn.perm[1]], s[turn.perm[2]])
    orientation: tuple[str, str] | None
    if volume.projection:
        before, after = _plane_codes(volume.patient_orientation), check_codes(target, 2)
        orientation = patient_orientation_of(after)
    else:
        before, after = axis_codes(volume.affine[:3, :3]), axis_codes(affine[:3, :3])
        orientation = volume.patient_orientation
    return replace(volume, array=array, affine=affine, spacing=spacing, order=[],
                   notes=[*volume.notes, describe(before, after)], patient_orientation=orientation), turn


def _plane_codes(patient_orientation: tuple[str, str] | None) -> str:
    assert patient_orientation is not None
    return check_codes(patient_orientation[1][:1] + patient_orientation[0][:1], 2)


def patient_orientation_of(codes: str) -> tuple[str, str]:
    """Patient Orientation (0020,0020) values - (row direction, column direction), H/F for head and feet -
    for a radiograph's (rows, columns) axis codes."""
    letter = {"S": "H", "I": "F"}
    return letter.get(codes[1], codes[1]), letter.get(codes[0], codes[0])
