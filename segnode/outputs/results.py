"""A job's result files: the label map (NIfTI), the DICOM-SEG, the TID 1500 SR and, when asked for,
secondary-capture images with the contours burned in, side by side; segmentation.json lists them."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

from pydicom import dcmread

from segnode.config import OutputsConfig
from segnode.errors import SegnodeError
from segnode.flow import EncodedResults, SegmentedSeries
from segnode.models.manifest import Manifest
from segnode.datadir import SEG_FILE, SR_FILE
from segnode.outputs.overlay import build_overlays
from segnode.outputs.seg import Provenance, build_seg
from segnode.outputs.sr import build_sr, segment_stats

log = logging.getLogger(__name__)


class EncodingError(SegnodeError):
    """The segmentation could not be encoded as DICOM for this series: the same input fails the same way,
    so the job ends at once (inference is not run again)."""


def encode_results(result: SegmentedSeries, files: Sequence[Path], manifest: Manifest, job_key: str, out: Path,
                   outputs: OutputsConfig | None = None, previous_sr: Path | None = None) -> EncodedResults:
    """Write OUT/seg.dcm and OUT/sr.dcm (and OUT/sc-NNNN.dcm) for the segmentation in `result` of the
    series `files`, and list them in the result's record (segmentation.json).

    Args:
        result: the segmentation with its volume (source order and geometry) and record file.
        files: the series' instance files, whose headers the SEG and SR reference and copy.
        manifest: the model that produced it (labels, codes, version: the provenance).
        job_key: the job's idempotency key, from which the result UIDs are derived (same job: same UIDs).
        outputs: SEG encoding (`seg_type`) and whether to write contour images (`secondary_capture`).
        previous_sr: The SR of the result this one replaces, if any: the new objects' series descriptions say
            "revised" and the SR lists the old one in its Predecessor Documents Sequence.
    Returns:
        The files written and their SOP Instance UIDs, with each label's volume in mL.
    Raises:
        EncodingError: highdicom or pydicom refused to build or write an object for this series.
        OSError, MemoryError: the disk or memory ran out (may pass on a later try).
    """
    try:
        previous = dcmread(previous_sr, stop_before_pixels=True) if previous_sr is not None else None
        return _encode(result, files, Provenance(job_key, manifest, previous), out, outputs or OutputsConfig())
    except (OSError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - highdicom/pydicom raise many types; all are this input's
        log.exception("encoding the results failed")
        raise EncodingError(f"the results could not be encoded as DICOM: {type(exc).__name__}: {exc}") from exc


def _encode(result: SegmentedSeries, files: Sequence[Path], prov: Provenance, out: Path,
            outputs: OutputsConfig) -> EncodedResults:
    seg_type, secondary_capture = outputs.seg_type, outputs.secondary_capture
    start = time.perf_counter()
    sources = [dcmread(f, stop_before_pixels=True) for f in files]
    manifest = prov.manifest
    labels = result.segmentation.labels
    seg = build_seg(labels, result.volume.order, sources, prov, seg_type)
    stats = segment_stats(labels, result.volume.array, result.volume.affine, [lb.value for lb in manifest.labels],
                          [lb.name for lb in manifest.labels], hounsfield=str(sources[0].get("Modality")) == "CT",
                          planar=result.volume.projection)
    sr = build_sr(seg, sources, result.volume.order, stats, prov, assumed_spacing=result.volume.assumed_spacing)
    seg.save_as(out / SEG_FILE, enforce_file_format=True)
    sr.save_as(out / SR_FILE, enforce_file_format=True)
    overlays = []
    if secondary_capture:
        modality = str(sources[0].get("Modality"))
        for number, sc in enumerate(build_overlays(labels, result.volume.array, result.volume.order, sources, prov,
                                                   modality), start=1):
            overlays.append(out / f"sc-{number:04d}.dcm")
            sc.save_as(overlays[-1], enforce_file_format=True)
    volumes = {s.name: round(s.volume_ml, 2) for s in stats if s.volume_ml is not None}
    areas = {s.name: round(s.area_cm2, 2) for s in stats if s.area_cm2 is not None}
    record_path = result.record_path
    record = json.loads(record_path.read_text())
    record["timings_s"]["encode"] = round(time.perf_counter() - start, 4)
    record["outputs"] = {"seg": {"file": SEG_FILE, "sop_instance_uid": seg.SOPInstanceUID, "type": seg_type},
                         "sr": {"file": SR_FILE, "sop_instance_uid": sr.SOPInstanceUID},
                         **({"areas_cm2": areas} if result.volume.projection else {"volumes_ml": volumes}),
                         "secondary_capture": [f.name for f in overlays]}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return EncodedResults(seg=out / SEG_FILE, sr=out / SR_FILE, seg_uid=seg.SOPInstanceUID, sr_uid=sr.SOPInstanceUID,
                          volumes_ml=volumes, areas_cm2=areas, overlays=tuple(overlays))

