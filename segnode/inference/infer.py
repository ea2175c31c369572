"""One series through one model: read, segment, write the label map and what produced it."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from segnode import __version__
from segnode.imaging.nifti import write_labels
from segnode.imaging.volume import TiltPolicy, read_series
from segnode.flow import SegmentedSeries
from segnode.inference.engine import EngineOptions, engine_for
from segnode.datadir import LABELS_FILE, RECORD_FILE

log = logging.getLogger(__name__)


def infer_series(model_folder: Path, files: Sequence[Path], out: Path, options: EngineOptions | None = None,
                 tilt: TiltPolicy = "resample", assumed_spacing: float | None = None,
                 on_stage: Callable[[str], None] | None = None) -> SegmentedSeries:
    """Segment the series made of `files`; write OUT/labels.nii.gz and OUT/segmentation.json.

    Args:
        model_folder: The model folder; its engine is loaded once per process and kept warm.
        files: The series' Part 10 files, any order.
        out: Output folder, created if needed.
        options: Engine options; defaults to EngineOptions().
        tilt: What to do with a gantry-tilted stack ("resample" or "refuse").
        assumed_spacing: mm for images that state no pixel spacing (a rule's explicit assumption);
            recorded in segmentation.json as `assumed_pixel_spacing_mm`. None: such images are refused.
        on_stage: told what starts (reading, loading the model, segmenting, writing), e.g. segnode.progress.

    Returns:
        The volume, the segmentation (uint8 (slices, rows, cols) in the volume's geometry) and the
        paths of the label map (NIfTI, RAS affine) and the record (model, options, voxel counts,
        notes, timings in s).

    Raises:
        SeriesError: the series cannot be one volume (the message names it and says why).
        ModelError: the model folder cannot be used.
    """
    say = on_stage or (lambda _: None)
    say(f"reading the series ({len(files)} files)")
    start = time.perf_counter()
    volume = read_series(files, tilt=tilt, assumed_spacing=assumed_spacing)
    read = time.perf_counter() - start
    say(f"loading model {model_folder.name}")
    engine = engine_for(model_folder, options)
    say(f"segmenting {'x'.join(map(str, volume.array.shape))} voxels on {engine.device}")
    seg = engine.segment(volume)
    seg.timings.read = read
    say("writing the label map and its record")
    out.mkdir(parents=True, exist_ok=True)
    labels_path, record_path = out / LABELS_FILE, out / RECORD_FILE
    write_labels(labels_path, seg.labels, volume.affine)
    m = engine.manifest
    counts = np.bincount(seg.labels.ravel(), minlength=256)  # one pass over the labels, not one per label
    record = {
        "series_instance_uid": volume.series_uid,
        "model": {"name": m.name, "version": m.version, "weights_sha256": m.weights_sha256},
        "software": {"name": "segnode", "version": __version__},
        "device": str(engine.device),
        "options": engine.recorded_options(),
        "shape": list(seg.labels.shape),
        "labels": {str(label.value): label.name for label in m.labels},
        "voxels": {label.name: int(counts[label.value]) for label in m.labels},
        "notes": seg.notes,
        "assumed_pixel_spacing_mm": assumed_spacing if volume.assumed_spacing else None,
        "timings_s": seg.timings.as_dict(),
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    log.info("segmented series with %s %s: %s", m.name, m.version, seg.timings)
    return SegmentedSeries(volume=volume, segmentation=seg, labels_path=labels_path, record_path=record_path)
