"""Imported nnU-Net models: segnode against nnU-Net's own predictor, same inputs, one run.

    python bench/nnunet.py [--folders DIR] [--device cpu|cuda]

Builds real nnU-Net v2 results folders with nnU-Net's planner and trainer (tests/nnunet_folders.py: a 2d
and a 3d_fullres model trained briefly, a randomly initialised 3-fold 3d_fullres ensemble, a region-based
one), imports each, and runs every case through `nnUNetPredictor` (its defaults: step 0.5, Gaussian,
mirroring) and through segnode. Cases: CT phantoms at the resolution the models were trained on
(32x32 pixels, 4 mm slices) and at a clinical one (192x192 pixels of 2 mm, 2 mm slices), where
resampling the logits back dominates nnU-Net's CPU time.

Each side runs in a child process of its own (its peak resident memory is that process's), after one
untimed warm-up call; nnU-Net's time includes its preprocessing and export (predict_single_npy_array).
Per model: voxel agreement, agreement where nnU-Net's winner leads by >= 0.01 and the share of such
near-ties (a random network is nearly uniform), per-label Dice between the two, seconds per case each and
segnode/nnU-Net, peak memory each. Goals: agreement >= 99.9 % (trained; decided voxels for random models),
time ratio <= 0.5. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASES = {  # name -> (seed, matrix, slice spacing mm)
    "trained-resolution": (100, 32, 4.0),
    "clinical-resolution": (101, 192, 2.0),
}


def _case_volume(name: str, folder: Path) -> Any:
    from segnode.imaging.volume import read_series
    from segnode.phantom.ct import write_phantom
    from tests.nnunet_folders import phantom_case

    seed, matrix, slice_mm = CASES[name]
    target = folder / name
    if not target.exists():
        write_phantom(phantom_case(seed, slice_mm=slice_mm, matrix=matrix), target)
    return read_series(sorted(target.glob("*.dcm")))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(side: str, model: str, source: str, cases_dir: Path, out: Path, device: str) -> None:
    """One side over every case: labels (and nnU-Net's leads) to `out`, timings and peak memory as JSON."""
    import torch

    from segnode.imaging.orientation import reorient_volume
    from segnode.inference.engine import EngineOptions, engine_for
    from segnode.models.registry import read_manifest

    torch.set_num_threads(os.cpu_count() or 1)
    manifest = read_manifest(Path(model))
    assert manifest.nnunet is not None and manifest.orientation
    volumes = {name: _case_volume(name, cases_dir) for name in CASES}
    if side == "segnode":
        engine = engine_for(Path(model), EngineOptions(device=device, precision="fp32" if device == "cpu" else "fp16"))
        run = lambda v: engine.segment(v).labels  # noqa: E731
    else:
        from tests.nnunet_folders import reference_labels, reference_predictor

        predictor = reference_predictor(Path(source), manifest.nnunet.folds)
        predictor.device = torch.device(device)
        predictor.perform_everything_on_device = device != "cpu"

        def run(v: Any) -> np.ndarray:
            spl, _ = reorient_volume(v, manifest.orientation or "")
            return np.asarray(predictor.predict_single_npy_array(spl.array[None].astype(np.float32),
                                                                 {"spacing": list(spl.spacing)}))
    run(volumes["trained-resolution"])  # warm-up, untimed
    report: dict[str, Any] = {"seconds": {}}
    for name, volume in volumes.items():
        start = time.perf_counter()
        labels = run(volume)
        report["seconds"][name] = time.perf_counter() - start
        if side == "segnode":
            spl, turn = reorient_volume(volume, manifest.orientation)
            labels = turn.apply(labels) if not turn.identity else labels
        np.save(out / f"{side}-{name}.npy", labels)
        if side == "nnunet":  # the leads, untimed: probabilities cost nnU-Net extra work
            spl, _ = reorient_volume(volume, manifest.orientation)
            np.save(out / f"lead-{name}.npy", reference_labels(predictor, spl.array, spl.spacing)[1])
    report["peak_rss_mb"] = _peak_mb()
    print(json.dumps(report))


def _dice(a: np.ndarray, b: np.ndarray, values: list[int]) -> dict[str, float]:
    out = {}
    for v in values:
        x, y = a == v, b == v
        total = x.sum() + y.sum()
        out[str(v)] = round(float(2 * (x & y).sum() / total), 5) if total else 1.0
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folders", type=Path, help="the folders an earlier run built (default: build them)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, model, source, cases_dir, out = args.child
        child(side, model, source, Path(cases_dir), Path(out), args.device)
        return 0
    from segnode.models.nnunet_import import ImportOptions, import_nnunet
    from segnode.models.registry import read_manifest

    work = Path(tempfile.mkdtemp(prefix="bench-nnunet-"))
    if args.folders is None:
        start = time.perf_counter()
        run = subprocess.run([sys.executable, str(REPO / "tests" / "nnunet_folders.py"), str(work / "folders")],
                             capture_output=True, text=True, check=True)
        folders = json.loads(run.stdout.strip().splitlines()[-1])
        (work / "folders" / "folders.json").write_text(json.dumps(folders))
        print(f"built nnU-Net folders with nnU-Net's tools in {time.perf_counter() - start:.0f} s "
              f"({work / 'folders'})", flush=True)
    else:
        folders = json.loads((args.folders / "folders.json").read_text())
    results: dict[str, Any] = {}
    for key, source in folders.items():
        model, _, _ = import_nnunet(ImportOptions(folder=Path(source), orientation="SPL", name=key.replace("_", "-")),
                                    work / "models")
        manifest = read_manifest(model)
        out = work / "out" / key
        out.mkdir(parents=True)
        sides = {}
        for side in ("nnunet", "segnode"):
            run = subprocess.run([sys.executable, __file__, "--device", args.device, "--child", side, str(model),
                                  str(source), str(work / "cases"), str(out)], capture_output=True, text=True)
            if run.returncode != 0:
                raise SystemExit(f"{side} on {key} failed:\n{run.stderr[-3000:]}")
            sides[side] = json.loads(run.stdout.strip().splitlines()[-1])
        values = [label.value for label in manifest.labels]
        per_case = {}
        for name in CASES:
            ours, theirs = np.load(out / f"segnode-{name}.npy"), np.load(out / f"nnunet-{name}.npy")
            decided = np.load(out / f"lead-{name}.npy") >= 0.01
            same = ours == theirs
            t_ours, t_theirs = sides["segnode"]["seconds"][name], sides["nnunet"]["seconds"][name]
            per_case[name] = {
                "shape": list(ours.shape), "agreement": round(float(same.mean()), 6),
                "agreement_decided": round(float(same[decided].mean()), 6),
                "near_tie_share": round(float(1 - decided.mean()), 4), "dice": _dice(ours, theirs, values),
                "seconds_segnode": round(t_ours, 3), "seconds_nnunet": round(t_theirs, 3),
                "time_ratio": round(t_ours / t_theirs, 3)}
            print(f"{key:20s} {name:20s} agreement {same.mean():.5f} (decided {same[decided].mean():.5f}, near-ties "
                  f"{1 - decided.mean():.3f})  segnode {t_ours:6.2f} s  nnU-Net {t_theirs:6.2f} s  ratio "
                  f"{t_ours / t_theirs:.2f}", flush=True)
        results[key] = {"folds": manifest.nnunet.folds if manifest.nnunet else [], "cases": per_case,
                        "peak_rss_mb_segnode": round(sides["segnode"]["peak_rss_mb"]),
                        "peak_rss_mb_nnunet": round(sides["nnunet"]["peak_rss_mb"])}
        print(f"{key:20s} peak memory: segnode {sides['segnode']['peak_rss_mb']:.0f} MB, nnU-Net "
              f"{sides['nnunet']['peak_rss_mb']:.0f} MB", flush=True)
    ratios = [c["time_ratio"] for r in results.values() for c in r["cases"].values()]
    summary = {"device": args.device, "cpu_threads": os.cpu_count(), "models": results,
               "time_ratio_max": max(ratios), "time_ratio_min": min(ratios),
               "gpu": "not measured here" if args.device == "cpu" else "this run"}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
