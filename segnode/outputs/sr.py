"""TID 1500 Measurement Report (Comprehensive 3D SR): per segment its volume and, for CT, the mean
and standard deviation of HU, each group referencing its SEG segment, with the device observer and
algorithm identification IHE AI Results expects."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Sequence

import highdicom as hd
import numpy as np
from scipy import ndimage
from skimage import measure
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.sr.codedict import codes

from segnode.dicom.uids import derived_uid
from segnode.models.manifest import Label
from segnode.outputs.seg import MANUFACTURER, SERIES_NUMBER_SR, Provenance, _coded, charset_safe, restore_charset

MILLILITER = Code("ml", "UCUM", "milliliter")
SQUARE_CENTIMETER = Code("cm2", "UCUM", "square centimeter")
# segnode's own code (a private coding scheme, PS3.16 8.2: "99" prefix): the measurement method when the
# pixel spacing was assumed by a routing rule, not stated by the image
ASSUMED_SPACING = Code("ASSUMED-SPACING", "99SEGNODE", "Measured at an assumed pixel spacing, not a stated one")
HOUNSFIELD = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
LATERALITY = {"7771000", "24028007", "51440002"}  # SCT Left, Right, Right and left (CID 244)


@dataclass
class SegmentStats:
    """Measurements of one segment.

    Attributes:
        value: Label value (the SEG's segment number).
        name: The label's name.
        voxels: Voxel (pixel) count.
        volume_ml: Volume in mL; None for a projection image (it has no depth).
        area_cm2: Area in cm² on the image plane of a projection image; None for a volume.
        mean: Mean HU inside the segment; CT only, else None.
        std: Population standard deviation of HU inside the segment; CT only, else None.
    """

    value: int
    name: str
    voxels: int
    _: KW_ONLY
    volume_ml: float | None = None
    area_cm2: float | None = None
    mean: float | None = None
    std: float | None = None
    section: int = 0
    outline: np.ndarray | None = None


# Graphic Data (FL) has a 16-bit length in explicit VR: 65534 bytes, 8191 points; a longer outline is written
# as UN and unreadable. Ragged edges are simplified (Douglas-Peucker, scikit-image) until they fit well below.
MAX_OUTLINE_POINTS = 4096


def largest_section(mask: np.ndarray) -> tuple[int, np.ndarray]:
    """The slice where a segment is largest, and the outline of its largest connected part there.

    Args:
        mask: (slices, rows, cols) bool, not empty.

    Returns:
        (slice index, (n, 2) float closed polyline: first point == last). The outline
        is the boundary between the part's pixels and the others (marching squares, scikit-image) in DICOM
        SCOORD image coordinates: (column, row), (0, 0) the top left corner of the top left pixel, so a pixel's
        centre is at (c + 0.5, r + 0.5). Holes in the part are not outlined (one SCOORD per group); at most
        MAX_OUTLINE_POINTS points.
    """
    section = int(np.argmax(mask.reshape(len(mask), -1).sum(axis=1)))
    parts, count = ndimage.label(mask[section])  # 4-connected, as the outline separates diagonal neighbours
    sizes = np.bincount(parts.ravel(), minlength=count + 1)[1:]
    part = parts == int(np.argmax(sizes)) + 1
    padded = np.pad(part, 1).astype(np.float32)  # closes outlines that touch the image border
    contours = measure.find_contours(padded, 0.5)
    # the outer boundary encloses the largest area (shoelace); the others are holes
    outer = max(contours, key=lambda c: abs(float(np.dot(c[:-1, 0], c[1:, 1]) - np.dot(c[1:, 0], c[:-1, 1]))))
    tolerance = 0.25  # drops the collinear points of pixel edges
    simplified = measure.approximate_polygon(outer, tolerance=tolerance)
    while len(simplified) > MAX_OUTLINE_POINTS:  # a ragged edge: coarser, until Graphic Data fits
        tolerance *= 2
        simplified = measure.approximate_polygon(outer, tolerance=tolerance)
    return section, np.ascontiguousarray(simplified[:, ::-1] - 0.5)  # padded (row, col) -> SCOORD


def segment_stats(labels: np.ndarray, image: np.ndarray, affine: np.ndarray, values: Sequence[int],
                  names: Sequence[str], hounsfield: bool, planar: bool = False) -> list[SegmentStats]:
    """Per-label volume (or, on a projection image, area) and, for CT, HU statistics. The volume is the
    voxel count times the affine's voxel volume |det|, which stays exact for sheared (gantry-tilted)
    stacks too; an area is the pixel count times the pixel's area (row by column spacing).

    Args:
        labels: (slices, rows, cols) integer label map.
        image: (slices, rows, cols) rescaled values (HU for CT), the same geometry.
        affine: 4x4 from index (slice, row, col, 1) to patient mm (LPS).
        values: Label values to measure.
        names: Their names, in the same order.
        hounsfield: Also give mean and std of `image` inside each label (CT).
        planar: A projection image: areas in cm², no volume (its depth is a convention, not a measure).

    Returns:
        One SegmentStats per label present, in `values` order; absent labels are left out. Each also
        gives its largest section (slice index in `labels`) and the outline of its largest part there
        (`largest_section`).
    """
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    pixel_cm2 = float(np.linalg.norm(affine[:3, 1]) * np.linalg.norm(affine[:3, 2])) / 100.0
    out = []
    for value, name in zip(values, names):
        mask = labels == value
        n = int(mask.sum())
        if n == 0:
            continue
        stats = (SegmentStats(value, name, n, area_cm2=n * pixel_cm2) if planar
                 else SegmentStats(value, name, n, volume_ml=n * voxel_ml))
        stats.section, stats.outline = largest_section(mask)
        if hounsfield:
            inside = image[mask]
            stats.mean, stats.std = float(inside.mean()), float(inside.std())
        out.append(stats)
    return out


def _frame_of(seg: Dataset, segment: int) -> int:
    """The SEG frame holding `segment` on a single image: its own frame (BINARY), else the one frame
    every segment shares (LABELMAP)."""
    for number, item in enumerate(seg.get("PerFrameFunctionalGroupsSequence", []), start=1):
        identification = item.get("SegmentIdentificationSequence")
        if identification and int(identification[0].ReferencedSegmentNumber) == segment:
            return number
    return 1


def build_sr(seg: Dataset, sources: Sequence[Dataset], order: Sequence[tuple[int, int]],
             stats: Sequence[SegmentStats], prov: Provenance, assumed_spacing: bool = False) -> Dataset:
    """The TID 1500 Measurement Report for a SEG: a group per segment with its volume (mL, 3 decimals;
    a volumetric ROI group) or, on a projection image, its area (cm², 3 decimals; a planar ROI group
    referencing the SEG frame) and, where measured, HU mean and std (2 decimals), observed by the model
    as a device; then, with the same tracking identifier, a planar ROI group outlining each segment on its
    largest section (a SCOORD polyline around its largest part there, on that source image and frame).
    Viewers that draw only image regions (OHIF lists and draws a measurement only when its group has a
    SCOORD) merge the two by tracking UID: the outline, shown with the segment's measurements.

    Args:
        seg: The SEG the groups reference (its SOP Instance UID and segment numbers).
        sources: The source datasets (evidence; the first gives series UID and modality).
        order: (source index, frame) of each slice of the label map the stats were taken from (Volume.order).
        stats: From segment_stats; values must be the manifest's label values.
        prov: The job and model; UIDs derive from the job key.
        assumed_spacing: the sizes rest on a pixel spacing a routing rule assumed: every measurement says
            so as its method (ASSUMED_SPACING).

    Returns:
        The hd.sr.Comprehensive3DSR, not yet written.

    Raises:
        KeyError: a stats value is not one of the manifest's labels.
    """
    sources, charset = charset_safe(sources)
    if charset is not None:
        seg = charset_safe([seg])[0][0]
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=prov.device_uid, name=prov.manifest.name[:64], manufacturer_name=MANUFACTURER,
            model_name=prov.manifest.name[:64], serial_number=prov.manifest.weights_sha256[:16]))
    algorithm = hd.sr.AlgorithmIdentification(name=prov.manifest.name, version=prov.manifest.version,
                                              family=codes.cid7162.ArtificialIntelligence, manufacturer=MANUFACTURER)
    labels = {label.value: label for label in prov.manifest.labels}
    groups: list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
                 | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations] = []
    for s in stats:
        label = labels[s.value]
        method = ASSUMED_SPACING if assumed_spacing else None
        measurements = ([hd.sr.Measurement(name=codes.SCT.Area, value=round(s.area_cm2, 3), unit=SQUARE_CENTIMETER,
                                           algorithm_id=algorithm, method=method)] if s.area_cm2 is not None else
                        [hd.sr.Measurement(name=codes.SCT.Volume, value=round(s.volume_ml or 0.0, 3), unit=MILLILITER,
                                           algorithm_id=algorithm, method=method)])
        if s.mean is not None and s.std is not None:
            measurements += [
                hd.sr.Measurement(name=codes.DCM.AttenuationCoefficient, value=round(s.mean, 2), unit=HOUNSFIELD,
                                  derivation=codes.SCT.Mean, algorithm_id=algorithm),
                hd.sr.Measurement(name=codes.DCM.AttenuationCoefficient, value=round(s.std, 2), unit=HOUNSFIELD,
                                  derivation=codes.SCT.StandardDeviation, algorithm_id=algorithm)]
        tracking = hd.sr.TrackingIdentifier(uid=derived_uid(prov.job_key, "roi", str(s.value)), identifier=s.name)
        if s.area_cm2 is not None:
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                referenced_segment=hd.sr.ReferencedSegmentationFrame(
                    sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                    frame_number=_frame_of(seg, s.value), segment_number=s.value,
                    source_image=hd.sr.SourceImageForSegmentation(sources[0].SOPClassUID, sources[0].SOPInstanceUID)),
                finding_type=_coded(label.type), finding_category=_coded(label.category), algorithm_id=algorithm,
                measurements=measurements))
            continue
        sites = _finding_sites(label)
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=s.value,
                source_series=hd.sr.SourceSeriesForSegmentation(sources[0].SeriesInstanceUID)),
            finding_type=_coded(label.type), finding_category=_coded(label.category), algorithm_id=algorithm,
            finding_sites=sites, measurements=measurements))
    for s in stats:  # after the segment groups: readers that take the first group of a tracking UID get those
        groups.append(_outline_group(s, sources, order, labels[s.value], prov, algorithm))
    modality = str(getattr(sources[0], "Modality", ""))
    procedure = codes.SCT.ComputedTomography if modality == "CT" else codes.SCT.ImagingProcedure
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=observer),
                                     procedure_reported=procedure, imaging_measurements=groups,
                                     title=codes.cid7021.ImagingMeasurementReport)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg, *sources], content=report[0], series_instance_uid=derived_uid(prov.job_key, "sr-series"),
        series_number=SERIES_NUMBER_SR, sop_instance_uid=derived_uid(prov.job_key, "sr"), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, contributing_equipment=[prov.equipment()],
        previous_versions=[prov.previous_sr] if prov.previous_sr is not None else None)  # Predecessor Documents
    sr.SeriesDescription = f"Measurements {prov.model_label}"[:64]
    _one_segment_reference(sr, seg)
    restore_charset(sr, charset)
    return sr


def _outline_group(s: SegmentStats, sources: Sequence[Dataset], order: Sequence[tuple[int, int]], label: Label,
                   prov: Provenance, algorithm: hd.sr.AlgorithmIdentification
                   ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group: the segment's outline on its largest section, tracked as the segment's own group."""
    assert s.outline is not None, "segment_stats gives every segment its outline"
    file, frame = order[s.section]
    source = sources[file]
    frames = [frame + 1] if int(getattr(source, "NumberOfFrames", 1) or 1) > 1 else None
    region = hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=s.outline,
                               source_image=hd.sr.SourceImageForRegion(source.SOPClassUID, source.SOPInstanceUID,
                                                                       referenced_frame_numbers=frames))
    # no measurement of its own: the segment's are in its segment group (same tracking UID); the outline, which
    # cannot show holes, would not agree with an area of the segment's pixels on that section
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid(prov.job_key, "roi", str(s.value)),
                                                     identifier=s.name),
        referenced_region=region, finding_type=_coded(label.type), finding_category=_coded(label.category),
        algorithm_id=algorithm, finding_sites=_finding_sites(label))


def _finding_sites(label: Label) -> list[hd.sr.FindingSite] | None:
    """Laterality (TotalSegmentator's Kidney + Left) goes with the finding site; other modifiers live in the SEG."""
    if label.modifier is None or label.modifier.value not in LATERALITY:
        return None
    return [hd.sr.FindingSite(anatomic_location=_coded(label.type), laterality=_coded(label.modifier))]


def _one_segment_reference(sr: Dataset, seg: Dataset) -> None:
    """highdicom references a segmentation frame by frame and segment number; PS3.3 C.18.4 allows one
    of the two. A BINARY SEG's frame is its segment's own, so the frame stays; a LABELMAP frame holds
    every segment, so the segment number stays."""
    binary = str(seg.get("SegmentationType", "")) == "BINARY"
    for item in sr.iterall():
        if item.keyword != "ReferencedSOPSequence":
            continue
        for reference in item.value:
            if "ReferencedFrameNumber" in reference and "ReferencedSegmentNumber" in reference:
                del reference[("ReferencedSegmentNumber" if binary else "ReferencedFrameNumber")]
