"""Secondary-capture images with the contours burned in, for PACS viewers that cannot show DICOM-SEG.

One RGB image per source image (or frame) that holds a label: the source's grey values (CT in a
soft-tissue window, W400/L40; other modalities between their 1st and 99th percentiles) with each
label's outline drawn in its manifest colour. They are pictures, not data: the SEG stays the
result, these only let a radiologist see it in any viewer. UIDs derive from the job, as the SEG's.
"""

from __future__ import annotations

from typing import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage

from segnode.dicom.uids import derived_uid
from segnode.outputs.seg import MANUFACTURER, Provenance, charset_safe, restore_charset

SERIES_NUMBER_SC = 9903
CT_WINDOW = (-160.0, 240.0)  # level 40, width 400 HU


def grey_range(volume: np.ndarray, modality: str) -> tuple[float, float]:
    """The values shown black and white, one range for the whole series so slices look alike.

    Args:
        volume: Rescaled values (HU for CT), any shape.
        modality: DICOM Modality; "CT" gets a fixed soft-tissue window.

    Returns:
        (black, white) in the volume's units: (-160, 240) HU for CT, else the 1st and 99th
        percentiles of every k-th voxel (k = size // 10**6, at least 1: under 2 million values;
        white >= black + 1).
    """
    if modality == "CT":
        return CT_WINDOW
    flat = volume.ravel()
    flat = flat[:: max(1, flat.size // 1_000_000)]  # a regular sample: exact enough, and fast on large series
    lo, hi = np.percentile(flat, [1, 99])
    return float(lo), float(max(hi, lo + 1))


def burn_contours(image: np.ndarray, labels: np.ndarray, colors: dict[int, Sequence[int]],
                  grey: tuple[float, float]) -> np.ndarray:
    """The image in grey with each label's outline in its colour; the line is one pixel per 256 of
    the matrix wide, so it stays visible on a 512 or 2048 image.

    Args:
        image: (rows, cols) rescaled values (HU for CT).
        labels: (rows, cols) integer label map.
        colors: {label value: (r, g, b) 0-255}; values not in it are not drawn.
        grey: (black, white) values, as grey_range gives.

    Returns:
        uint8 RGB (rows, cols, 3).
    """
    lo, hi = grey
    shade = (np.clip((image.astype(np.float32) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    rgb = np.repeat(shade[..., None], 3, axis=-1)
    width = max(1, max(labels.shape) // 256)
    for value, color in colors.items():
        mask = labels == value
        if mask.any():
            edge = mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)
            rgb[edge] = np.asarray(color, dtype=np.uint8)
    return rgb


def patient_orientation(source: Dataset) -> tuple[str, str]:
    """Row and column directions as patient letters (e.g. L, P): the source's Patient Orientation,
    or the dominant LPS axis of its Image Orientation (highdicom takes one letter each).

    Args:
        source: The source image's dataset.

    Returns:
        (direction of the rows, direction of the columns), one of L R P A H F each; ("L", "P")
        for an axial default when the source has neither attribute.
    """
    if "PatientOrientation" in source and len(source.PatientOrientation) == 2:
        return str(source.PatientOrientation[0])[:1], str(source.PatientOrientation[1])[:1]
    cosines = [float(v) for v in source.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]

    def letter(v: Sequence[float]) -> str:
        axis = int(np.argmax(np.abs(v)))
        return ("LR", "PA", "HF")[axis][0 if v[axis] > 0 else 1]

    return letter(cosines[:3]), letter(cosines[3:])


def _instance_number(source: Dataset, frame: int, fallback: int) -> int:
    """The source image's Instance Number (a multi-frame source's frame number), so contour image N shows
    what source image N shows; `fallback` (volume order) when the source has none."""
    if int(source.get("NumberOfFrames", 1) or 1) > 1:
        return frame + 1
    number = source.get("InstanceNumber")
    return int(number) if number not in (None, "") else fallback


def build_overlays(labels: np.ndarray, volume: np.ndarray, order: Sequence[tuple[int, int]],
                   sources: Sequence[Dataset], prov: Provenance, modality: str) -> list[Dataset]:
    """Secondary-capture images of the slices that hold a label, in volume order.

    Args:
        labels: uint8 (slices, rows, cols) in volume order.
        volume: (slices, rows, cols) rescaled values (HU for CT), the same geometry.
        order: (source index, frame) of each slice (Volume.order).
        sources: The source datasets (headers suffice), indexed by `order`.
        prov: The job and model; UIDs derive from the job key, so re-encoding repeats them.
        modality: DICOM Modality, for the grey range.

    Returns:
        RGB SC instances (8 bit, explicit VR little endian), each numbered and placed as its source image
        (Instance Number; frame of reference, position and orientation of a single-frame source) and
        referencing it (and its frame); none for a label map that is all background.
    """
    sources, charset = charset_safe(sources)
    colors: dict[int, Sequence[int]] = {label.value: label.color for label in prov.manifest.labels}
    legend = ", ".join(f"{label.name} rgb({','.join(str(c) for c in label.color)})" for label in prov.manifest.labels)
    grey = grey_range(volume, modality)
    series_uid = derived_uid(prov.job_key, "sc-series")
    out: list[Dataset] = []
    for index in np.flatnonzero(labels.reshape(len(labels), -1).any(axis=1)):
        file, frame = order[int(index)]
        source = sources[file]
        spacing = source.get("PixelSpacing") or source.get("ImagerPixelSpacing")
        sc = hd.sc.SCImage.from_ref_dataset(
            source, burn_contours(volume[index], labels[index], colors, grey), "RGB", 8, "PATIENT",
            series_instance_uid=series_uid, series_number=SERIES_NUMBER_SC,
            sop_instance_uid=derived_uid(prov.job_key, "sc", str(int(index))),
            instance_number=_instance_number(source, frame, len(out) + 1),
            manufacturer=MANUFACTURER, patient_orientation=patient_orientation(source),
            pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing else None,  # type: ignore[arg-type]
            transfer_syntax_uid="1.2.840.10008.1.2.1", contributing_equipment=[prov.equipment()])
        sc.DeviceUID = prov.device_uid
        sc.SeriesDescription = f"contours {prov.model_label} (not for diagnosis)"[:64]
        sc.ImageComments = f"Burned-in outlines of an automatic segmentation: {legend}"[:10240]
        if "Laterality" not in sc and "ImageLaterality" not in sc:
            sc.ImageLaterality = source.get("ImageLaterality") or "U"  # unpaired (dciodvfy asks for one of them)
        sc.BurnedInAnnotation = "NO"  # outlines only: no text, nothing that identifies the patient
        reference = Dataset()
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
        if int(source.get("NumberOfFrames", 1) or 1) > 1:
            reference.ReferencedFrameNumber = frame + 1
        sc.SourceImageSequence = [reference]
        if int(source.get("NumberOfFrames", 1) or 1) == 1:  # where it lies, so a viewer can sync it with its slice
            for keyword in ("FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient", "SliceLocation"):
                if keyword in source:
                    setattr(sc, keyword, source[keyword].value)
        restore_charset(sc, charset)
        out.append(sc)
    return out
