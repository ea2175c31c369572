"""Evaluate the shipped models on held-out phantoms (seeds never used in training, unusual
geometries switched on) at the phantoms' own resolution: per-label Dice, IoU and HD95.

    python bench/eval_models.py [--cases 4]

The last line is one JSON object. Goal: Dice >= 0.90 for every label.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segnode.inference.evaluate import evaluate_case  # noqa: E402
from segnode.config import default_models_dir  # noqa: E402
from segnode.models.registry import load_model  # noqa: E402
from segnode.phantom.ct import CTOptions, generate_ct, write_phantom  # noqa: E402
from segnode.phantom.dx import DXOptions, generate_dx, write_dx  # noqa: E402
from segnode.training.data import load_case  # noqa: E402

log = logging.getLogger("bench.eval")
HELD_OUT = 100_000  # training seeds are small integers; these are never used for training

CT_GEOMETRIES = [
    ("axial", CTOptions(matrix=128)),
    ("reversed", CTOptions(matrix=128, reversed_order=True)),
    ("oblique 12 deg", CTOptions(matrix=128, oblique_deg=12.0)),
    ("tilt 15 deg", CTOptions(matrix=128, tilt_deg=15.0)),
    ("thin 0.8 mm", CTOptions(matrix=128, slice_spacing=0.8)),
    ("coarse: 2.85 mm pixels, 5 mm slices", CTOptions(matrix=128, slice_spacing=5.0)),
]


def evaluate(model: str, cases: list[tuple[str, Path]]) -> dict:
    manifest, net = load_model(default_models_dir() / model)
    per_label: dict[str, list[dict[str, float]]] = {label.name: [] for label in manifest.labels}
    seconds = []
    for what, folder in cases:
        case = load_case(folder)
        metrics, took = evaluate_case(net, manifest, case.image, case.labels, case.spacing,
                                      orientation=case.orientation)
        seconds.append(took)
        for label in manifest.labels:
            per_label[label.name].append(metrics[label.value])
        log.info("  %-22s %s", f"{folder.name} ({what})",
                 "  ".join(f"{label.name} {metrics[label.value]['dice']:.3f}" for label in manifest.labels))
    summary = {name: {**{k: round(float(np.nanmean([m[k] for m in ms])), 4) for k in ("dice", "iou", "hd95")},
                      "lowest_dice": round(float(min(m["dice"] for m in ms)), 4),
                      "lowest_case": cases[int(np.argmin([m["dice"] for m in ms]))][0]}
               for name, ms in per_label.items()}
    summary["min_dice"] = min(v["lowest_dice"] for v in summary.values())  # type: ignore[index]
    summary["seconds_per_case"] = round(float(np.mean(seconds)), 2)
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=6, help="held-out phantoms per model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = {}
    with tempfile.TemporaryDirectory(prefix="segnode-eval-") as tmp:
        root = Path(tmp)
        ct_cases = []
        for i in range(args.cases):
            what, opts = CT_GEOMETRIES[i % len(CT_GEOMETRIES)]
            seed = HELD_OUT + i
            write_phantom(generate_ct(seed, opts), root / f"ct-{seed}")
            ct_cases.append((what, root / f"ct-{seed}"))
        dx_cases = []
        for i in range(args.cases):
            seed = HELD_OUT + i
            write_dx(generate_dx(seed, DXOptions(matrix=(512, 384)[i % 2])), root / f"dx-{seed}")
            dx_cases.append((f"matrix {(512, 384)[i % 2]}", root / f"dx-{seed}"))
        for model, cases in (("ct-abdomen-phantom-3d", ct_cases), ("dx-chest-phantom-2d", dx_cases)):
            log.info("%s on %d held-out phantoms:", model, len(cases))
            results[model] = evaluate(model, cases)
            for name, m in results[model].items():
                if isinstance(m, dict):
                    log.info("  %-14s Dice %.3f (lowest %.3f, %s)  IoU %.3f  HD95 %5.1f mm", name, m["dice"],
                             m["lowest_dice"], m["lowest_case"], m["iou"], m["hd95"])
            log.info("  lowest Dice of any label in any case %.3f (goal >= 0.90), %.1f s per case on the CPU",
                     results[model]["min_dice"], results[model]["seconds_per_case"])
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
