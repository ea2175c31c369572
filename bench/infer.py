"""segnode's sliding window against MONAI's, on the same network, input and device, in one run.

    python bench/infer.py [--repeats 3] [--skip-e2e]

On a GPU (the issue's setting): an nnU-Net-sized DynUNet (filters 32..320, 6 levels, 128^3 windows,
overlap 0.5, Gaussian, 4 classes, random weights) over a 300x512x512 volume; MONAI's
sliding_window_inference runs with bf16 autocast and sw_batch_size 8. On the CPU the same comparison
runs at a small size (5 levels, 16..256 filters, 64^3 windows, 96x128x128): the ratio is the figure
to read there, not the seconds.

Prints both times, their ratio (goal <= 0.35), the argmax agreement of segnode's output with a strict
fp32 reference (TF32 off; goal >= 99.9 %) beside MONAI's own agreement in fp16 (its anchor: random
weights leave near-ties that any half precision flips), the time to resample the logits back to a
finer source grid and take the argmax (goal <= 0.2 s on an H100), and `segnode infer` with the shipped 3D model on a 300-slice
phantom, end to end. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segnode.inference.engine import Engine, EngineOptions, Grid  # noqa: E402
from segnode.models.manifest import Manifest  # noqa: E402
from segnode.nets import build_network  # noqa: E402
from segnode.phantom.ct import CTOptions, generate_ct, write_phantom  # noqa: E402

log = logging.getLogger("bench.infer")

GPU_SETUP = {"filters": [32, 64, 128, 256, 320, 320], "window": 128, "volume": (300, 512, 512), "source": (300, 640, 640)}
CPU_SETUP = {"filters": [16, 32, 64, 128, 256], "window": 64, "volume": (96, 128, 128), "source": (96, 160, 160)}


def _manifest(window: int, classes: int) -> Manifest:
    code = {"value": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"}
    return Manifest.model_validate({
        "name": "bench", "version": "0", "modality": "CT", "spatial_dims": 3,
        "network": {"architecture": "dynunet", "args": {}}, "target_spacing": [1, 1, 1], "patch_size": [window] * 3,
        "normalization": {"method": "zscore"},
        "labels": [{"value": v, "name": f"c{v}", "category": code, "type": code, "color": [0, 0, 0]}
                   for v in range(1, classes)],
        "weights_sha256": "0" * 64})


def _network(filters: list[int], classes: int) -> torch.nn.Module:
    levels = len(filters)
    return build_network("dynunet", 3, 1, classes, {
        "kernel_size": [[3, 3, 3]] * levels, "strides": [[1, 1, 1]] + [[2, 2, 2]] * (levels - 1),
        "upsample_kernel_size": [[2, 2, 2]] * (levels - 1), "filters": filters, "norm_name": "instance"})


def _timed(fn: Callable[[], torch.Tensor], repeats: int, device: torch.device) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up: cuDNN autotuning, allocator
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def sliding_window(setup: dict, repeats: int, device: torch.device, compile_net: bool) -> dict:
    from monai.inferers import sliding_window_inference

    classes = 4
    torch.manual_seed(0)
    net = _network(setup["filters"], classes).eval().to(device)
    manifest = _manifest(setup["window"], classes)
    engine = Engine(manifest, net, EngineOptions(device=str(device), precision="fp16", batch_size=8,
                                                 compile=compile_net))
    x = torch.randn(1, 1, *setup["volume"], device=device)
    roi = [setup["window"]] * 3
    cuda = device.type == "cuda"

    def monai() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            return sliding_window_inference(x, roi, 8, net, overlap=0.5, mode="gaussian")[0]

    def ours() -> torch.Tensor:
        with torch.inference_mode():
            return engine.logits(x)

    log.info("volume %s, windows %s, filters %s, device %s", setup["volume"], roi, setup["filters"], device)
    t_monai, _ = _timed(monai, repeats, device)
    t_ours, logits = _timed(ours, repeats, device)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # a true fp32 reference: cuDNN's default TF32 rounds like fp16
    with torch.inference_mode():
        reference = sliding_window_inference(x, roi, 8, net, overlap=0.5, mode="gaussian")[0]
    torch.backends.cudnn.allow_tf32 = tf32
    with torch.inference_mode():
        agreement = float((logits.argmax(0) == reference.argmax(0)).float().mean())
        # the anchor: MONAI's own window in fp16 against the same reference (random weights leave many
        # near-ties between classes, which any half precision flips)
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            monai_fp16 = sliding_window_inference(x, roi, 8, net, overlap=0.5, mode="gaussian")[0]
        monai_agreement = float((monai_fp16.argmax(0) == reference.argmax(0)).float().mean())
    del reference, monai_fp16
    # back to a finer source grid (as from a 1.0 mm model grid to a 0.8 mm CT) and argmax
    shape = setup["source"]
    to_source = np.diag([s / d for s, d in zip(setup["volume"], shape)] + [1.0])
    to_source[:3, 3] = 0.5 * np.diag(to_source)[:3] - 0.5
    grid = Grid(tuple(setup["volume"]), np.linalg.inv(to_source))  # model index -> source index

    def back() -> torch.Tensor:
        with torch.inference_mode():
            return torch.from_numpy(engine.labels_in_source(logits, grid, shape))

    t_back, labels = _timed(back, repeats, device)
    result = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "volume": list(setup["volume"]),
              "window": setup["window"], "filters": setup["filters"], "monai_s": round(t_monai, 3),
              "segnode_s": round(t_ours, 3), "ratio": round(t_ours / t_monai, 3), "compiled": compile_net,
              "argmax_agreement": round(agreement, 5), "monai_fp16_agreement": round(monai_agreement, 5), "resample_back_s": round(t_back, 3),
              "resample_back_to": list(shape), "labels_found": int(labels.max()) + 1}
    log.info("MONAI sliding_window_inference (bf16 autocast on GPU, sw_batch 8): %.3f s", t_monai)
    log.info("segnode engine (fp16 on GPU):                                   %.3f s", t_ours)
    log.info("ratio %.3f (goal <= 0.35); argmax agreement with fp32 %.4f %% (goal >= 99.9 %%; MONAI in fp16: %.4f %%)",
             t_ours / t_monai, 100 * agreement, 100 * monai_agreement)
    log.info("resample back to %s + argmax: %.3f s (goal <= 0.2 s on an H100)", shape, t_back)
    return result


def end_to_end(matrix: int, slices: int) -> dict:
    """`segnode infer` with the shipped 3D model on a phantom of `slices` slices."""
    with tempfile.TemporaryDirectory(prefix="segnode-bench-") as tmp:
        folder = Path(tmp) / "ct"
        extent = 300.0
        write_phantom(generate_ct(300_000, CTOptions(matrix=matrix, slice_spacing=extent / slices,
                                                     z_extent_mm=extent - extent / slices / 2)), folder)
        n = len(list(folder.glob("ct*.dcm")))
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "segnode", "infer", "--model", "ct-abdomen-phantom-3d", str(folder),
                              "--out", str(Path(tmp) / "out")], capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if run.returncode != 0:
            raise RuntimeError(run.stderr)
        record = json.loads((Path(tmp) / "out" / "segmentation.json").read_text())
    log.info("segnode infer, shipped 3D model, %d slices %dx%d: %.2f s wall (process start included); %s",
             n, matrix, matrix, seconds, ", ".join(f"{k} {v:.2f} s" for k, v in record["timings_s"].items()))
    return {"slices": n, "matrix": matrix, "wall_s": round(seconds, 2), "stages_s": record["timings_s"],
            "device": record["device"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-e2e", action="store_true", help="only the sliding-window comparison")
    parser.add_argument("--no-compile", action="store_true", help="GPU: run segnode's network without torch.compile")
    parser.add_argument("--e2e-matrix", type=int, help="phantom matrix (default 512 on a GPU, 256 on the CPU)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    setup = GPU_SETUP if device.type == "cuda" else CPU_SETUP
    compile_net = device.type == "cuda" and not args.no_compile  # compiling on the CPU costs more than it saves
    results: dict = {"sliding_window": sliding_window(setup, args.repeats, device, compile_net)}
    if not args.skip_e2e:
        results["segnode_infer"] = end_to_end(args.e2e_matrix or (512 if device.type == "cuda" else 256), 300)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
