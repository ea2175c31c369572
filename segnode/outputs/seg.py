"""A label map in its source geometry -> DICOM-SEG (highdicom), the form PACS viewers (OHIF) display.

BINARY by default with empty frames left out (huge SEGs stall viewers); LABELMAP on request,
compressed (JPEG-LS lossless or RLE). Segments carry the model's SNOMED codes, colours and
algorithm identification; Contributing Equipment names segnode and the model with its weights hash,
and DeviceUID changes with the weights. UIDs derive from the job, so re-encoding gives the same
instance and a re-push creates no duplicate in the PACS.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, RLELossless

from segnode import __version__
from segnode.dicom.reader import decode_standard
from segnode.dicom.uids import derived_uid
from segnode.imaging.volume import pixel_spacing
from segnode.models.manifest import Manifest

SegType = Literal["BINARY", "LABELMAP"]
MANUFACTURER = "segnode"
SERIES_NUMBER_SEG, SERIES_NUMBER_SR = 9901, 9902


@dataclass(frozen=True)
class Provenance:
    """What produced a result: the job (its key seeds every UID), model and software."""

    job_key: str  # the job's idempotency key
    manifest: Manifest
    previous_sr: Dataset | None = None  # the SR of the result this one replaces (a late instance re-ran the series)

    @property
    def model_label(self) -> str:
        """The model's name and version ("name version"), as the series descriptions show it; "revised" when it
        replaces an earlier result of the same series, so the PACS shows which is current."""
        return f"{self.manifest.name} {self.manifest.version}{' revised' if self.previous_sr is not None else ''}"

    @property
    def device_uid(self) -> str:
        """One device per model version and weights: new weights, new device."""
        return derived_uid("device", self.manifest.name, self.manifest.version, self.manifest.weights_sha256)

    def algorithm(self) -> hd.AlgorithmIdentificationSequence:
        """The model as the SEG's segment algorithm (AI family, weights hash as a parameter)."""
        return hd.AlgorithmIdentificationSequence(
            name=self.manifest.name, family=codes.cid7162.ArtificialIntelligence, version=self.manifest.version,
            source=MANUFACTURER, parameters={"weights_sha256": self.manifest.weights_sha256})

    def equipment(self) -> hd.ContributingEquipment:
        """segnode and the model as Contributing Equipment, with the weights hash, for every output."""
        return hd.ContributingEquipment(
            manufacturer=MANUFACTURER, purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=self.manifest.name[:64],
            software_versions=[f"segnode {__version__}", f"{self.manifest.name} {self.manifest.version}"],
            device_serial_number=self.manifest.weights_sha256[:16],
            contribution_description=f"automatic segmentation, weights sha256 {self.manifest.weights_sha256}")


def _coded(code: Any) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


def segment_descriptions(prov: Provenance) -> list[hd.seg.SegmentDescription]:
    """One segment per manifest label, numbered by its label value, with its codes (and type modifier, e.g.
    laterality), colour and a tracking UID derived from the job (stable across re-encodings)."""
    descriptions = [hd.seg.SegmentDescription(
        segment_number=label.value, segment_label=label.name, segmented_property_category=_coded(label.category),
        segmented_property_type=_coded(label.type), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=prov.algorithm(),
        tracking_uid=derived_uid(prov.job_key, "segment", str(label.value)), tracking_id=label.name,
        display_color=hd.color.CIELabColor.from_rgb(*label.color)) for label in prov.manifest.labels]
    for description, label in zip(descriptions, prov.manifest.labels):
        if label.modifier is not None:  # highdicom takes no modifier; PS3.3 C.8.20.2: inside the type's item
            item = description.SegmentedPropertyTypeCodeSequence[0]
            item.SegmentedPropertyTypeModifierCodeSequence = [_coded(label.modifier)]
    return descriptions


def frames_for_sources(labels: np.ndarray, order: Sequence[tuple[int, int]], sources: Sequence[Dataset]
                       ) -> tuple[list[Dataset], np.ndarray]:
    """Pair label slices with the source images highdicom expects them against.

    Args:
        labels: uint8 (slices, rows, cols) in volume order.
        order: (source index, frame) of each slice (Volume.order).
        sources: The source datasets.

    Returns:
        (source images, label frames (frames, rows, cols) uint8 in their order): a single-frame
        series gets its slices in volume order; one multi-frame instance gets its frames back in
        frame order (frames the volume does not cover are empty).
    """
    if len(sources) == 1 and int(getattr(sources[0], "NumberOfFrames", 1) or 1) > 1:
        frames = np.zeros((int(sources[0].NumberOfFrames), *labels.shape[1:]), dtype=np.uint8)
        for index, (_, frame) in enumerate(order):
            frames[frame] = labels[index]
        return [sources[0]], frames
    return [sources[file] for file, _ in order], labels


def charset_safe(sources: Sequence[Dataset]) -> tuple[list[Dataset], list[str] | None]:
    """Sources highdicom accepts, and the Specific Character Set to put back on what it builds.

    highdicom 0.28 knows the single-valued defined terms only: it refuses a multi-valued Specific
    Character Set (ISO 2022 code extensions, PS3.5 Annex H: Japanese, Korean, Chinese), and an empty
    value 1 (PS3.3 C.12.1.1.2: ISO 2022 IR 6). pydicom has decoded every text into Unicode already, so
    the copies say UTF-8 (ISO_IR 192); the output then carries the source's own value again, and pydicom
    encodes the texts in it when writing - they all came from the source, so they all fit.

    Returns:
        (sources, None) when nothing needs changing; else (header copies, the value for the results).
    """
    value = sources[0].get("SpecificCharacterSet") if sources else None
    if value is None or isinstance(value, str) or len(value) < 2:
        return list(sources), None
    copies = []
    for source in sources:
        decode_standard(source)  # every text decoded with the source's own character set first
        copy = deepcopy(source)
        copy.SpecificCharacterSet = "ISO_IR 192"
        copies.append(copy)
    return copies, [str(v) for v in value]


def restore_charset(built: Dataset, original: list[str] | None) -> None:
    """Give `built` the source's Specific Character Set again (see `charset_safe`)."""
    if original is not None:
        built.SpecificCharacterSet = original


def build_seg(labels: np.ndarray, order: Sequence[tuple[int, int]], sources: Sequence[Dataset], prov: Provenance,
              kind: SegType = "BINARY", compression: Literal["jpegls", "rle"] = "jpegls") -> Dataset:
    """The SEG instance for a label map in the volume order `order` of `sources`.

    Args:
        labels: (slices, rows, cols) label values, cast to uint8; values are the manifest's.
        order: (source index, frame) of each slice (Volume.order).
        sources: The source datasets (headers suffice).
        prov: The job and model; UIDs derive from the job key, so re-encoding gives the same instance.
        kind: "BINARY" (uncompressed, empty frames omitted) or "LABELMAP" (compressed).
        compression: For LABELMAP: "jpegls" (JPEG-LS lossless) or "rle".

    Returns:
        The hd.seg.Segmentation, not yet written.

    Raises:
        ValueError: highdicom refuses the label map against the sources (e.g. rows and columns differ).
    """
    safe, charset = charset_safe(sources)
    images, frames = frames_for_sources(np.asarray(labels, dtype=np.uint8), order, safe)
    measures = None
    if "FrameOfReferenceUID" not in images[0]:  # a projection image: the spacing the reader measured with
        spacing, _ = pixel_spacing(images[0])
        if spacing is not None:  # else (a rule's assumed spacing) none: never written as if it had been measured
            # a nominal 1 mm depth, as the volume reader uses
            measures = hd.PixelMeasuresSequence(pixel_spacing=list(spacing), slice_thickness=1.0)
    syntax = ExplicitVRLittleEndian if kind == "BINARY" else (JPEGLSLossless if compression == "jpegls" else RLELossless)
    seg = hd.seg.Segmentation(
        source_images=images, pixel_array=frames, segmentation_type=kind,
        segment_descriptions=segment_descriptions(prov),
        series_instance_uid=derived_uid(prov.job_key, "seg-series"), series_number=SERIES_NUMBER_SEG,
        sop_instance_uid=derived_uid(prov.job_key, "seg"), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=prov.manifest.name[:64],
        software_versions=[f"segnode {__version__}", f"{prov.manifest.name} {prov.manifest.version}"],  # type: ignore[arg-type]
        device_serial_number=prov.manifest.weights_sha256[:16],
        content_description=f"{prov.model_label} (automatic)"[:64], content_label="SEGNODE",
        content_creator_name="segnode^automatic", transfer_syntax_uid=syntax, omit_empty_frames=True,
        contributing_equipment=[prov.equipment()], pixel_measures=measures)
    seg.DeviceUID = prov.device_uid
    if kind == "LABELMAP":
        _background_by_padding_only(seg)
    if "FrameOfReferenceUID" not in images[0]:  # a projection image: orientation by patient directions
        seg.PatientOrientation = images[0].get("PatientOrientation", ["", ""])
    seg.SeriesDescription = f"SEG {prov.model_label}"[:64]
    restore_charset(seg, charset)
    return seg


def _background_by_padding_only(seg: Dataset) -> None:
    """A label map's background is the Pixel Padding Value (PS3.3 C.8.20.2, Sup 243); highdicom also lists it
    as segment 0. OHIF 3.13 (cornerstone's SEG adapter before cornerstone3D #2882) takes the n-th item of
    the Segment Sequence as segment n, so that item listed a "Background" segment and shifted every colour
    by one. Only the model's segments are listed; pixel value 0 stays background by the padding value."""
    padding = int(seg.PixelPaddingValue)
    seg.SegmentSequence = [item for item in seg.SegmentSequence if int(item.SegmentNumber) != padding]


def labels_from_seg(seg: Dataset, sources: Sequence[Dataset], order: Sequence[tuple[int, int]]) -> np.ndarray:
    """Read a SEG back (highdicom) into a label map in the volume order it was built from.

    Args:
        seg: The SEG (a dataset or an hd.seg.Segmentation).
        sources: The source datasets it was built against.
        order: (source index, frame) of each slice (Volume.order).

    Returns:
        uint8 (slices, rows, cols); frames the SEG omitted (empty) are background.
    """
    parsed = seg if isinstance(seg, hd.seg.Segmentation) else hd.seg.Segmentation.from_dataset(seg)
    if len(sources) == 1 and int(getattr(sources[0], "NumberOfFrames", 1) or 1) > 1:
        frames = parsed.get_pixels_by_source_frame(
            sources[0].SOPInstanceUID, source_frame_numbers=list(range(1, int(sources[0].NumberOfFrames) + 1)),
            combine_segments=True, assert_missing_frames_are_empty=True)
        return np.stack([frames[frame] for _, frame in order]).astype(np.uint8)
    uids = [sources[file].SOPInstanceUID for file, _ in order]
    return parsed.get_pixels_by_source_instance(uids, combine_segments=True,
                                                assert_missing_frames_are_empty=True).astype(np.uint8)
