"""DICOM series -> volume with exact geometry: array axes (slice, row, column), spacing in mm, and
the affine from array index to patient coordinates (LPS).

Slices are ordered by their position along the slice normal, never by InstanceNumber. A series
that cannot become one regular volume (mixed sizes or orientations, duplicate or missing slices,
no geometry) is refused with a SeriesError that names the series and the reason, because a label
map computed on a wrongly stacked volume would be returned to the PACS looking plausible.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import KW_ONLY, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from pydicom.dataset import Dataset

from segnode.dicom.reader import UnreadableInstance, read_dataset
from segnode.errors import InputError

log = logging.getLogger(__name__)

TiltPolicy = Literal["resample", "refuse"]
GEOMETRY_TOLERANCE = 1e-3  # direction cosines and pixel spacings that differ by less are the same
SPACING_TOLERANCE = 0.1  # a gap between slices more than 10 % off the usual spacing is a gap


class SeriesError(InputError):
    """The series cannot be turned into one regular volume; the message names the series (its UID)
    and says why, so it can be shown to whoever sent it."""


@dataclass
class Volume:
    """A series as one regular volume with its geometry.

    Attributes:
        array: float32 (slices, rows, cols), rescaled values (HU for CT); a 2D image has one slice.
            Slices are in position order along the slice normal, not instance order.
        spacing: mm along each array axis (slice, row, col); for a tilted stack the slice spacing is
            the distance between planes, not the step between slice origins.
        affine: 4x4 from the array index (slice, row, col, 1) to patient coordinates in mm, DICOM LPS.
            Column 0 is the step from one slice to the next (oblique to the image plane for a gantry
            tilt); columns 1 and 2 are one row down and one column across (Image Orientation's
            column and row cosines times the pixel spacing). A projection image (DX) has no patient
            coordinates: its affine is diag(1, row spacing, column spacing, 1).
        order: (index into the files read, frame) of each slice, in array order; maps results back
            to the source instances (SEG, overlays).
        series_uid: Series Instance UID ("" when absent).
        notes: Decisions taken on the way (single slice, gantry tilt, projection), recorded with the result.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    order: list[tuple[int, int]]
    series_uid: str = ""
    notes: list[str] = field(default_factory=list)
    _: KW_ONLY
    projection: bool = False  # a radiograph: a plane (areas, cm²), not a volume; spacing[0] is no depth
    # a projection's Patient Orientation (0020,0020): where increasing column, then row, index points
    patient_orientation: tuple[str, str] | None = None
    assumed_spacing: bool = False  # the pixel spacing is an assumption a routing rule allowed, not a measure

    @property
    def sheared(self) -> bool:
        """Gantry tilt: the slice axis is not perpendicular to the image plane."""
        a = self.affine[:3, :3]
        normal = np.cross(a[:, 2], a[:, 1])
        step = a[:, 0]
        return bool(np.linalg.norm(np.cross(step, normal)) > GEOMETRY_TOLERANCE * np.linalg.norm(step) * np.linalg.norm(normal))


@dataclass
class _Frame:
    file: int
    frame: int
    rows: int
    cols: int
    position: np.ndarray | None  # Image Position (Patient)
    orientation: np.ndarray | None  # Image Orientation (Patient), 6 cosines
    spacing: tuple[float, float] | None  # (between rows, between columns) in mm; None: not stated
    spacing_source: str  # the attribute it came from, for the record
    thickness: float | None
    slope: float
    intercept: float


def _first(ds: Dataset, *path: str) -> Any:
    """ds.A[0].B[0]...C, or None where any step is absent."""
    node: Any = ds
    for i, name in enumerate(path):
        node = getattr(node, name, None)
        if node is None:
            return None
        if i < len(path) - 1:
            if len(node) == 0:
                return None
            node = node[0]
    return node


def _group(ds: Dataset, frame: int, sequence: str, attribute: str) -> Any:
    """An attribute from the per-frame functional group, else the shared one (enhanced multi-frame)."""
    per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    if per_frame is not None and frame < len(per_frame):
        value = _first(per_frame[frame], sequence, attribute)
        if value is not None:
            return value
    shared = getattr(ds, "SharedFunctionalGroupsSequence", None)
    return _first(shared[0], sequence, attribute) if shared else None


def _pair(value: Any) -> tuple[float, float] | None:
    try:
        pair = (float(value[0]), float(value[1]))
    except (TypeError, ValueError, IndexError):
        return None
    return pair if all(np.isfinite(pair)) and min(pair) > 0 else None


def pixel_spacing(ds: Dataset, measured: Any = None) -> tuple[tuple[float, float] | None, str]:
    """The spacing (rows, columns) in mm in the patient plane and where it came from: Pixel Spacing
    (`measured`, e.g. from an enhanced image's Pixel Measures, else the attribute), else Imager Pixel
    Spacing divided by the Estimated Radiographic Magnification Factor, else Nominal Scanned Pixel
    Spacing; (None, "") when none is given. Never assumed."""
    spacing = _pair(measured) or _pair(ds.get("PixelSpacing"))
    if spacing:
        return spacing, "Pixel Spacing"
    imager = _pair(ds.get("ImagerPixelSpacing"))
    if imager:
        factor = ds.get("EstimatedRadiographicMagnificationFactor")
        if factor is not None and float(factor) > 0:
            return ((imager[0] / float(factor), imager[1] / float(factor)),
                    f"Imager Pixel Spacing / Estimated Radiographic Magnification Factor {float(factor):g}")
        return imager, "Imager Pixel Spacing (at the detector: no magnification factor given)"
    nominal = _pair(ds.get("NominalScannedPixelSpacing"))
    if nominal:
        return nominal, "Nominal Scanned Pixel Spacing"
    return None, ""


def _rescaled_somewhere(ds: Dataset) -> bool:
    return any(_first(item, "PixelValueTransformationSequence", "RescaleSlope") is not None
               for item in [*ds.get("PerFrameFunctionalGroupsSequence", []),
                            *ds.get("SharedFunctionalGroupsSequence", [])])


def _frames(datasets: list[Dataset]) -> list[_Frame]:
    frames = []
    for f, ds in enumerate(datasets):
        n = int(getattr(ds, "NumberOfFrames", 1) or 1)
        enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
        for k in range(n):
            if enhanced:
                ipp = _group(ds, k, "PlanePositionSequence", "ImagePositionPatient")
                iop = _group(ds, k, "PlaneOrientationSequence", "ImageOrientationPatient")
                spacing = _group(ds, k, "PixelMeasuresSequence", "PixelSpacing")
                thickness = _group(ds, k, "PixelMeasuresSequence", "SliceThickness")
                slope = _group(ds, k, "PixelValueTransformationSequence", "RescaleSlope")
                intercept = _group(ds, k, "PixelValueTransformationSequence", "RescaleIntercept")
            else:
                ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
                spacing = None
                thickness, slope, intercept = ds.get("SliceThickness"), ds.get("RescaleSlope"), ds.get("RescaleIntercept")
            if enhanced and (slope is None or intercept is None) and _rescaled_somewhere(ds):
                raise _refuse(str(ds.get("SeriesInstanceUID", "")), f"frame {k + 1} of instance {f + 1} has no "
                              "Pixel Value Transformation while other frames have one: its values cannot be read")
            measured, source = pixel_spacing(ds, spacing)
            frames.append(_Frame(
                f, k, int(ds.Rows), int(ds.Columns),
                None if ipp is None else np.array(ipp, dtype=float),
                None if iop is None else np.array(iop, dtype=float),
                measured, source,
                None if thickness is None else float(thickness),
                1.0 if slope is None else float(slope), 0.0 if intercept is None else float(intercept)))
    return frames


def _describe(values: Counter) -> str:
    return " and ".join(f"{v} ({n} slice{'s' if n > 1 else ''})" for v, n in values.most_common())


def _refuse(series: str, reason: str) -> SeriesError:
    return SeriesError(f"series {series or '(no Series Instance UID)'}: {reason}")


def _check_uniform(series: str, frames: list[_Frame]) -> None:
    sizes = Counter(f"{f.rows}x{f.cols}" for f in frames)
    if len(sizes) > 1:
        raise _refuse(series, f"mixed image sizes {_describe(sizes)}; one series must have one size")
    if any(f.orientation is None for f in frames) or any(f.position is None for f in frames):
        raise _refuse(series, "slices without Image Position/Orientation (Patient); cannot place them in space")
    ref = frames[0]
    orientations = Counter(
        "same" if np.allclose(f.orientation, ref.orientation, atol=GEOMETRY_TOLERANCE)  # type: ignore[arg-type]
        else ",".join(f"{v:.3f}" for v in f.orientation) for f in frames)  # type: ignore[union-attr]
    if len(orientations) > 1:
        raise _refuse(series, "mixed orientations: " + _describe(Counter(
            {(",".join(f"{v:.3f}" for v in ref.orientation) if k == "same" else k): n  # type: ignore[union-attr]
             for k, n in orientations.items()})) + "; send each orientation as its own series")
    spacings = Counter(f"{f.spacing[0]:.4f}x{f.spacing[1]:.4f} mm" for f in frames if f.spacing is not None)
    if len(spacings) > 1:
        raise _refuse(series, f"mixed pixel spacings {_describe(spacings)}")


def _values(value: Any) -> list[Any]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


# projection radiography: the stored value is a display brightness, whose sense MONOCHROME1 reverses.
# Elsewhere (CT's HU, PET's activity, MR's signal) values keep their meaning whatever their display.
_DISPLAY_VALUED = {"CR", "DX", "MG", "RF", "XA", "IO", "PX", "DF", "RG", "OT"}


def _inverted(ds: Dataset) -> bool:
    """Whether the image is shown with its lowest values white (MONOCHROME1, or a Presentation LUT Shape
    of INVERSE) and its values are display brightness (projection radiography), so that the model, which
    sees MONOCHROME2 values, must see it inverted. Quantitative modalities (CT, PT, NM, MR, ...) never."""
    if str(ds.get("Modality", "")).strip() not in _DISPLAY_VALUED:
        return False
    return (str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"
            or str(ds.get("PresentationLUTShape", "")).strip() == "INVERSE")


def _stored_range(ds: Dataset) -> tuple[int, int]:
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _as_stored(ds: Dataset, value: Any) -> int:
    """A US/SS pixel value as the pixels hold it: signed when Pixel Representation is 1, whatever VR the
    element was written with (US 63536 on signed pixels is -2000)."""
    number = int(value)
    bits = int(ds.get("BitsAllocated") or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1 and number >= 2 ** (bits - 1):
        number -= 2**bits
    return number


def _padding(ds: Dataset, raw: np.ndarray) -> np.ndarray | None:
    """Pixels marked as padding (Pixel Padding Value, up to Pixel Padding Range Limit): not anatomy."""
    value = ds.get("PixelPaddingValue")
    if value is None:
        return None
    limit = ds.get("PixelPaddingRangeLimit", value)
    lo, hi = sorted((_as_stored(ds, value), _as_stored(ds, limit)))
    mask = (raw >= lo) & (raw <= hi)
    return mask if mask.any() else None


def _pixels(datasets: list[Dataset], frames: list[_Frame]) -> tuple[np.ndarray, list[str]]:
    """float32 (frames, rows, cols) in the meaning the models were trained on: the Modality LUT or rescale
    applied, MONOCHROME1 turned into MONOCHROME2, padding set to the lowest real value of its frame; and
    the note to record when padding was found."""
    from pydicom.pixels import apply_modality_lut

    cache: dict[int, np.ndarray] = {}
    table_range: tuple[float, float] = (0.0, 0.0)  # a Modality LUT's output range, for the file in the cache
    out = np.empty((len(frames), frames[0].rows, frames[0].cols), dtype=np.float32)
    padded: set[int] = set()
    for i, f in enumerate(frames):
        ds = datasets[f.file]
        if f.file not in cache:
            try:
                cache = {f.file: ds.pixel_array}  # one file's pixels at a time
            except Exception as exc:  # missing decoder, truncated or absent pixel data
                raise _refuse(str(ds.get("SeriesInstanceUID", "")),
                              f"cannot decode the pixels of instance {f.file + 1}: {exc}") from exc
            if "ModalityLUTSequence" in ds:
                lo, hi = _stored_range(ds)
                every = apply_modality_lut(np.arange(lo, hi + 1).astype(cache[f.file].dtype), ds)
                table_range = (float(np.min(every)), float(np.max(every)))
        px = cache[f.file]
        raw = px[f.frame] if px.ndim == 3 and int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 else px
        pad = _padding(ds, raw)
        if "ModalityLUTSequence" in ds:  # a table from stored values to output values (LUT Data US or OW)
            values = np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
            low, high = table_range
        else:
            values = raw.astype(np.float32) * np.float32(f.slope) + np.float32(f.intercept)
            low, high = (v * f.slope + f.intercept for v in _stored_range(ds))
        if _inverted(ds):  # mirror within the range the values can take: MONOCHROME1 -> MONOCHROME2
            values = np.float32(low + high) - values
        if pad is not None:
            values[pad] = values[~pad].min() if (~pad).any() else 0.0
            padded.add(f.file)
        out[i] = values
    return out, (["pixel padding set to the lowest value of its image"] if padded else [])


def read_series(paths: Sequence[Path], tilt: TiltPolicy = "resample", assumed_spacing: float | None = None) -> Volume:
    """One volume from a series: single-frame slices, enhanced multi-frame, or one 2D image.

    Args:
        paths: The series' Part 10 files, in any order (slices are sorted by position).
        tilt: "resample": a gantry-tilted stack keeps its exact sheared affine and the engine
            resamples it to an orthogonal grid (and back); "refuse" raises instead. Either way the
            choice is in the volume's `notes`.
        assumed_spacing: mm to read images that state no pixel spacing at (a routing rule's explicit
            `assume_pixel_spacing_mm`), instead of refusing them; the volume is marked `assumed_spacing`
            and its notes say so, and no SEG states it as measured.

    Returns:
        The volume: float32 (slices, rows, cols) rescaled values, spacing in mm, LPS affine.

    Raises:
        SeriesError: no paths; instances from more than one series; no pixel data or undecodable
            pixels; colour images; mixed sizes, orientations or pixel spacings; missing position or
            orientation (on more than one image); duplicate positions, uneven slice spacing
            (missing slices) or positions off a line; a gantry tilt with tilt="refuse".
        pydicom.errors.InvalidDicomError: a file is not DICOM.
        OSError: a file cannot be read.
    """
    if not paths:
        raise SeriesError("no instances given")
    try:
        datasets: list[Dataset] = [read_dataset(p) for p in paths]
    except UnreadableInstance as exc:
        raise SeriesError(f"an instance of the series cannot be read ({exc}); it must be sent again, intact") from exc
    uids = Counter(str(ds.get("SeriesInstanceUID", "")) for ds in datasets)
    series = uids.most_common(1)[0][0]
    if len(uids) > 1:
        raise _refuse(series, f"the instances belong to {len(uids)} series ({', '.join(uids)}); read one at a time")
    if any("PixelData" not in ds for ds in datasets):
        raise _refuse(series, "an instance has no pixel data (not an image)")
    if any(int(ds.get("SamplesPerPixel", 1)) != 1 for ds in datasets):
        raise _refuse(series, "color images (SamplesPerPixel > 1) cannot be segmented; send grayscale")
    kinds = Counter(str(ds.get("PhotometricInterpretation", "")).strip() for ds in datasets)
    if set(kinds) - {"MONOCHROME1", "MONOCHROME2"}:
        raise _refuse(series, f"Photometric Interpretation {_describe(kinds)}: only grayscale (MONOCHROME1/2) images "
                              "can be segmented")
    frames = _frames(datasets)
    assumed = assumed_spacing is not None and all(f.spacing is None for f in frames)
    if assumed_spacing is not None and assumed:
        for f in frames:
            f.spacing = (float(assumed_spacing), float(assumed_spacing))
            f.spacing_source = (f"an ASSUMED {float(assumed_spacing):g} mm (the routing rule's "
                                "assume_pixel_spacing_mm): not measured, sizes are estimates")
    if any(f.spacing is None for f in frames):
        raise _refuse(series, "no pixel spacing (Pixel Spacing, Imager Pixel Spacing or Nominal Scanned Pixel "
                              "Spacing): sizes cannot be measured, and a model sees the wrong scale; the modality "
                              "must send one")
    meaning = _meaning_notes(datasets, frames)
    if len(frames) == 1 and (frames[0].position is None or frames[0].orientation is None):
        projection = _projection(datasets[0], frames, series, meaning)  # a radiograph: no position in space
        return replace(projection, assumed_spacing=assumed)
    _check_uniform(series, frames)
    iop = frames[0].orientation
    assert iop is not None
    row_dir, col_dir = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    along = np.array([float(np.dot(f.position, normal)) for f in frames])  # type: ignore[arg-type]
    order = np.argsort(along, kind="stable")
    frames, along = [frames[i] for i in order], along[order]
    assert frames[0].spacing is not None  # refused above when absent
    dr, dc = frames[0].spacing
    notes: list[str] = list(meaning)
    if len(frames) == 1:
        thickness = frames[0].thickness or 1.0
        step = normal * thickness
        notes.append(f"a single slice; slice thickness {thickness:g} mm used as its depth")
    else:
        gaps = np.diff(along)
        usual = float(np.median(gaps))
        dup = np.flatnonzero(gaps < GEOMETRY_TOLERANCE)
        if dup.size:
            raise _refuse(series, f"two or more slices share a position ({dup.size} duplicate"
                                  f"{'s' if dup.size > 1 else ''}, first at {along[dup[0]]:.2f} mm along the normal); "
                                  f"duplicate or mixed acquisitions")
        odd = np.flatnonzero(np.abs(gaps - usual) > SPACING_TOLERANCE * usual)
        if odd.size:
            i = int(odd[0])
            raise _refuse(series, f"uneven slice spacing: {gaps[i]:.2f} mm between the slices at {along[i]:.2f} and "
                                  f"{along[i + 1]:.2f} mm along the normal where {usual:.2f} mm is usual "
                                  f"({odd.size} such gap{'s' if odd.size > 1 else ''}; missing slices?); "
                                  f"send the complete series")
        positions = np.array([f.position for f in frames])
        step = (positions[-1] - positions[0]) / (len(frames) - 1)
        residual = np.abs(positions - (positions[0] + np.outer(np.arange(len(frames)), step))).max()
        if residual > max(0.01, SPACING_TOLERANCE * usual):
            raise _refuse(series, f"slice positions do not lie on a line (off by up to {residual:.2f} mm)")
        lateral = np.linalg.norm(step - np.dot(step, normal) * normal)
        if lateral > GEOMETRY_TOLERANCE * np.linalg.norm(step):
            angle = float(np.degrees(np.arctan2(lateral, np.dot(step, normal))))
            if tilt == "refuse":
                raise _refuse(series, f"gantry tilt of {angle:.1f} degrees (sheared slices); the tilt policy is "
                                      f"'refuse' (set it to 'resample' to segment on an orthogonal grid)")
            notes.append(f"gantry tilt of {angle:.1f} degrees: resampled to an orthogonal grid and back")
        else:  # what is left is the rounding of decimal strings: the stack is orthogonal
            step = normal * float(np.dot(step, normal))
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = step, col_dir * dr, row_dir * dc, frames[0].position
    dz = abs(float(np.dot(step, normal)))
    array, padding = _pixels(datasets, frames)
    return Volume(array, (dz, dr, dc), affine, [(f.file, f.frame) for f in frames], series, [*notes, *padding],
                  assumed_spacing=assumed)


def _meaning_notes(datasets: list[Dataset], frames: list[_Frame]) -> list[str]:
    """What was done to the stored values and where the spacing came from, for the result's record."""
    notes = []
    if frames[0].spacing_source != "Pixel Spacing":
        notes.append(f"pixel spacing from {frames[0].spacing_source}")
    if any(_inverted(ds) for ds in datasets):
        notes.append("MONOCHROME1 (or inverse presentation): values inverted to MONOCHROME2 for the model")
    return notes


def _projection(ds: Dataset, frames: list[_Frame], series: str, notes: list[str]) -> Volume:
    """A projection image (DX, CR): its plane is the detector; depth 1 mm by convention."""
    assert frames[0].spacing is not None  # refused above when absent
    dr, dc = frames[0].spacing
    affine = np.diag([1.0, dr, dc, 1.0])
    stated = [str(v) for v in _values(ds.get("PatientOrientation"))]
    orientation = (stated[0], stated[1]) if len(stated) == 2 and all(stated) else None
    array, padding = _pixels([ds], frames)
    return Volume(array, (1.0, dr, dc), affine, [(0, 0)], series,
                  ["projection image: pixel spacing only, no patient coordinates", *notes, *padding], projection=True,
                  patient_orientation=orientation)


def dicom_files(folder: Path) -> list[Path]:
    """The Part 10 files directly in `folder` (by their 'DICM' marker), sorted by name; other files
    (labels, notes) are passed over, subfolders are not searched.

    Args:
        folder: A folder holding one series.

    Returns:
        The DICOM files, sorted by name.

    Raises:
        SeriesError: `folder` is not a folder or holds no Part 10 file.
    """
    found = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.is_file():
            with path.open("rb") as fh:
                head = fh.read(132)
            if head[128:132] == b"DICM":
                found.append(path)
    if not found:
        raise SeriesError(f"{folder}: no DICOM files (Part 10, with the 'DICM' marker) in this folder")
    return found


def read_image(path: Path) -> Volume:
    """A single 2D image (e.g. DX) as a one-slice volume; `read_series` of that one file.

    Args:
        path: The image's Part 10 file.

    Returns:
        float32 (1, rows, cols); a projection image's spacing is (1.0, row, col) mm.

    Raises:
        SeriesError: as `read_series` (no pixel data, colour, undecodable).
    """
    return read_series([path])
