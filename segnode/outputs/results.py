"""A job's result files: the label map (NIfTI), the DICOM-SEG, the TID 1500 SR and, when asked for,
secondary-capture images with the contours burned in, side by side; segmentation.json lists them."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from pydicom import dcmread

from segnode.inference.infer import Result
from segnode.models.manifest import Manifest
from segnode.outputs.files import SEG_FILE, SR_FILE
from segnode.outputs.overlay import build_overlays
from segnode.outputs.seg import Provenance, SegType, build_seg
from segnode.outputs.sr import build_sr, segment_stats

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    """The DICOM files written for one job.

    Attributes:
        seg: Path of the SEG.
        sr: Path of the SR.
        seg_uid: The SEG's SOP Instance UID.
        sr_uid: The SR's SOP Instance UID.
        volumes_ml: {label name: volume in mL, 2 decimals}, labels present only.
        overlays: Paths of the contour images (secondary capture), empty unless asked for.
    """

    seg: Path
    sr: Path
    seg_uid: str
    sr_uid: str
    volumes_ml: dict[str, float]
    overlays: list[Path] = field(default_factory=list)


def encode_results(result: Result, files: Sequence[Path], manifest: Manifest, job_key: str, out: Path,
                   seg_type: SegType = "BINARY", secondary_capture: bool = False) -> Encoded:
    """Write OUT/seg.dcm and OUT/sr.dcm (and OUT/sc-NNNN.dcm) for the segmentation in `result` of the
    series `files`, and add them (with volumes and the encoding time) to segmentation.json.

    Args:
        result: What infer_series returned for the series.
        files: The series' files, in the order infer_series read them (Volume.order indexes them).
        manifest: The model's manifest (labels, codes, colours).
        job_key: The job's idempotency key; every UID derives from it.
        out: Output folder, which must exist (infer_series made it).
        seg_type: "BINARY" or "LABELMAP".
        secondary_capture: Also write contour images.

    Returns:
        The files written, their UIDs and the volumes in mL.
    """
    start = time.perf_counter()
    sources = [dcmread(f, stop_before_pixels=True) for f in files]
    prov = Provenance(job_key, manifest)
    labels = result.segmentation.labels
    seg = build_seg(labels, result.volume.order, sources, prov, seg_type)
    stats = segment_stats(labels, result.volume.array, result.volume.affine, [lb.value for lb in manifest.labels],
                          [lb.name for lb in manifest.labels], hounsfield=str(sources[0].get("Modality")) == "CT")
    sr = build_sr(seg, sources, stats, prov)
    seg.save_as(out / SEG_FILE, enforce_file_format=True)
    sr.save_as(out / SR_FILE, enforce_file_format=True)
    overlays = []
    if secondary_capture:
        modality = str(sources[0].get("Modality"))
        for number, sc in enumerate(build_overlays(labels, result.volume.array, result.volume.order, sources, prov,
                                                   modality), start=1):
            overlays.append(out / f"sc-{number:04d}.dcm")
            sc.save_as(overlays[-1], enforce_file_format=True)
    volumes = {s.name: round(s.volume_ml, 2) for s in stats}
    record_path = result.record_path
    record = json.loads(record_path.read_text())
    record["timings_s"]["encode"] = round(time.perf_counter() - start, 4)
    record["outputs"] = {"seg": {"file": SEG_FILE, "sop_instance_uid": seg.SOPInstanceUID, "type": seg_type},
                         "sr": {"file": SR_FILE, "sop_instance_uid": sr.SOPInstanceUID}, "volumes_ml": volumes,
                         "secondary_capture": [f.name for f in overlays]}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return Encoded(out / SEG_FILE, out / SR_FILE, seg.SOPInstanceUID, sr.SOPInstanceUID, volumes, overlays)

