"""A job's result files: the label map (NIfTI), the DICOM-SEG and the TID 1500 SR, side by side."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pydicom import dcmread

from node.inference.infer import Result
from node.models.manifest import Manifest
from node.outputs.seg import Provenance, SegType, build_seg
from node.outputs.sr import build_sr, segment_stats

log = logging.getLogger(__name__)
SEG_FILE, SR_FILE = "seg.dcm", "sr.dcm"


@dataclass
class Encoded:
    seg: Path
    sr: Path
    seg_uid: str
    sr_uid: str
    volumes_ml: dict[str, float]


def encode_results(result: Result, files: Sequence[Path], manifest: Manifest, job_key: str, out: Path,
                   seg_type: SegType = "BINARY") -> Encoded:
    """Write OUT/seg.dcm and OUT/sr.dcm for the segmentation in `result` of the series `files`."""
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
    volumes = {s.name: round(s.volume_ml, 2) for s in stats}
    record_path = result.record_path
    record = json.loads(record_path.read_text())
    record["timings_s"]["encode"] = round(time.perf_counter() - start, 4)
    record["outputs"] = {"seg": {"file": SEG_FILE, "sop_instance_uid": seg.SOPInstanceUID, "type": seg_type},
                         "sr": {"file": SR_FILE, "sop_instance_uid": sr.SOPInstanceUID}, "volumes_ml": volumes}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return Encoded(out / SEG_FILE, out / SR_FILE, seg.SOPInstanceUID, sr.SOPInstanceUID, volumes)
