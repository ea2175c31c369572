"""The training loop: patches with foreground oversampling, augmentation, Dice+CE (or the plan's
loss), poly learning rate, validation by sliding window, best weights into a model folder."""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segnode.imaging.preprocess import normalize, resample_to_spacing
from segnode.models.manifest import Manifest, Network
from segnode.models.registry import build, write_model_folder
from segnode.training.data import Case
from segnode.training.losses import make_loss
from segnode.training.metrics import label_metrics
from segnode.training.plan import Plan, coded_labels

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    name: str
    image: np.ndarray  # normalized, at the target spacing
    labels: np.ndarray
    fg_index: dict[int, np.ndarray] = field(default_factory=dict)  # flat indices per label


@dataclass
class TrainResult:
    manifest: Manifest
    epoch_losses: list[float]
    validation: dict[str, dict[str, float]]  # label -> {dice, iou, hd95}, means over validation cases
    seconds: float


def prepare(case: Case, plan: Plan) -> Prepared:
    """A case at the plan's spacing (image linear, labels nearest) and normalized, with the same
    functions the inference engine applies, on the CPU."""
    with torch.inference_mode():
        image_t = torch.from_numpy(np.ascontiguousarray(case.image, dtype=np.float32))
        image = normalize(resample_to_spacing(image_t, case.spacing, plan.target_spacing), plan.normalization).numpy()
        labels_t = torch.from_numpy(np.ascontiguousarray(case.labels, dtype=np.uint8))
        labels = resample_to_spacing(labels_t, case.spacing, plan.target_spacing, mode="nearest").numpy().copy()
    flat = labels.ravel()
    return Prepared(case.name, image, labels,
                    {k: np.flatnonzero(flat == k) for k in range(1, len(plan.labels) + 1) if (flat == k).any()})


def _patch(prep: Prepared, plan: Plan, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A patch; with probability foreground_fraction centred on a random voxel of a random label."""
    shape, size = prep.image.shape, plan.patch_size
    pad = [(max(0, (p - s + 1) // 2 + 1),) * 2 for s, p in zip(shape, size)]
    image = np.pad(prep.image, pad, mode="constant", constant_values=float(prep.image.min()))
    labels = np.pad(prep.labels, pad, mode="constant")
    if prep.fg_index and rng.random() < plan.foreground_fraction:
        label = rng.choice(sorted(prep.fg_index))
        center = np.array(np.unravel_index(rng.choice(prep.fg_index[label]), shape)) + [p[0] for p in pad]
        start = [int(np.clip(c - p // 2, 0, n - p)) for c, p, n in zip(center, size, image.shape)]
    else:
        start = [int(rng.integers(0, n - p + 1)) for p, n in zip(size, image.shape)]
    sl = tuple(slice(s, s + p) for s, p in zip(start, size))
    return image[sl], labels[sl]


def _orientation(cases: list[Case]) -> str | None:
    """The orientation every case was brought into, which the model then expects; None when the cases
    do not share one (radiographs without Patient Orientation): the model sees arrays as stored."""
    found = {case.orientation for case in cases}
    return found.pop() if len(found) == 1 else None


def _augmenter(plan: Plan) -> Any:
    from monai import transforms as T

    dims, keys = plan.spatial_dims, ["image", "label"]
    angle = math.radians(plan.rotate_degrees)
    rotate = (angle,) if dims == 2 else (angle, angle, angle)
    steps: list[Any] = [T.RandAffined(keys, prob=0.25, rotate_range=rotate, scale_range=(plan.scale_range,) * dims,
                                      mode=("bilinear", "nearest"), padding_mode="border")]
    if plan.elastic:  # Ronneberger: random displacements on a coarse grid, smoothly interpolated
        if dims == 2:  # displacements ~ N(0, magnitude^2) px on the control points, smoothly interpolated
            grid = (max(1.0, plan.patch_size[0] / (plan.elastic_grid - 1)),
                    max(1.0, plan.patch_size[1] / (plan.elastic_grid - 1)))
            steps.append(T.Rand2DElasticd(keys, spacing=grid, magnitude_range=plan.elastic_magnitude_px, prob=0.2,
                                          mode=("bilinear", "nearest"), padding_mode="border"))
        else:
            steps.append(T.Rand3DElasticd(keys, sigma_range=(5, 8), magnitude_range=(20, 60), prob=0.1,
                                          mode=("bilinear", "nearest"), padding_mode="border"))
    for axis in plan.mirror_axes:
        steps.append(T.RandFlipd(keys, prob=0.5, spatial_axis=axis))
    steps += [T.RandScaleIntensityd("image", factors=0.1, prob=0.2),
              T.RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.2),
              T.RandGaussianNoised("image", std=0.05, prob=0.15)]
    return T.Compose(steps)


def _validate(net: torch.nn.Module, preps: list[Prepared], plan: Plan, device: torch.device) -> dict[str, dict[str, float]]:
    from monai.inferers import sliding_window_inference

    net.eval()
    per_label: dict[str, list[dict[str, float]]] = {n: [] for n in plan.labels}
    with torch.inference_mode():
        for prep in preps:
            x = torch.from_numpy(prep.image)[None, None].to(device)
            logits = sliding_window_inference(x, plan.patch_size, 2, net, overlap=0.25, mode="gaussian")
            assert isinstance(logits, torch.Tensor)
            pred = logits.max(1).indices[0].cpu().numpy().astype(np.uint8)  # argmax, faster on the CPU
            metrics = label_metrics(pred, prep.labels, range(1, len(plan.labels) + 1), plan.target_spacing)
            for value, name in enumerate(plan.labels, start=1):
                per_label[name].append(metrics[value])
    net.train()
    return {name: {k: float(np.nanmean([m[k] for m in ms])) if ms else float("nan")
                   for k in ("dice", "iou", "hd95")} for name, ms in per_label.items()}


def train(plan: Plan, cases: list[Case], out: Path, device: str = "auto", command: str = "",
          progress: bool = True) -> TrainResult:
    """Train per the plan; the best validation weights go to `out` as a complete model folder."""
    from monai.utils import set_determinism
    from tqdm import tqdm

    started = time.time()
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    set_determinism(seed=plan.seed)
    rng = np.random.default_rng(plan.seed)
    n_val = min(plan.validation_cases, max(len(cases) - 1, 0))
    val_cases, train_cases = cases[:n_val], cases[n_val:]
    train_preps = [prepare(c, plan) for c in train_cases]
    val_preps = [prepare(c, plan) for c in val_cases]
    manifest = Manifest(name=plan.name, version=plan.version, modality=plan.modality, spatial_dims=plan.spatial_dims,
                        network=Network(architecture=plan.architecture, args=plan.network_args),
                        target_spacing=plan.target_spacing, patch_size=plan.patch_size,
                        normalization=plan.normalization, labels=coded_labels(plan.labels),
                        mirror_axes=list(plan.mirror_axes), orientation=_orientation(cases),
                        weights_sha256="0" * 64)
    net = build(manifest).to(dev)
    loss_fn = make_loss(plan.loss)
    opt = torch.optim.AdamW(net.parameters(), lr=plan.learning_rate, weight_decay=plan.weight_decay)
    total = plan.epochs * plan.steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: (1 - step / total) ** 0.9)  # nnU-Net's poly
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda")
    augment = _augmenter(plan)
    losses: list[float] = []
    best_dice, best_state, validation = -1.0, None, {}
    bar = tqdm(range(plan.epochs), desc=plan.name, disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for epoch in bar:
        running = []
        for _ in range(plan.steps_per_epoch):
            images, labels = [], []
            for _ in range(plan.batch_size):
                prep = train_preps[int(rng.integers(len(train_preps)))]
                image, label = _patch(prep, plan, rng)
                sample = augment({"image": image[None].copy(), "label": label[None].astype(np.float32)})
                images.append(torch.as_tensor(np.asarray(sample["image"]), dtype=torch.float32))
                labels.append(torch.as_tensor(np.asarray(sample["label"])).round().long())
            x, y = torch.stack(images).to(dev), torch.stack(labels).to(dev)
            with torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
                loss = loss_fn(net(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            running.append(loss.item())
        losses.append(float(np.mean(running)))
        last = epoch == plan.epochs - 1
        if val_preps and ((epoch + 1) % plan.validate_every == 0 or last):
            validation_now = _validate(net, val_preps, plan, dev)
            mean_dice = float(np.nanmean([m["dice"] for m in validation_now.values()]))
            if mean_dice > best_dice:
                best_dice, validation = mean_dice, validation_now
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            bar.set_postfix(loss=f"{losses[-1]:.3f}", val_dice=f"{mean_dice:.3f}", best=f"{best_dice:.3f}")
        else:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", best=f"{best_dice:.3f}")
        log.info("epoch %d/%d loss %.4f", epoch + 1, plan.epochs, losses[-1])
    if best_state is not None:
        net.load_state_dict(best_state)
    net = net.cpu().eval()
    seconds = time.time() - started
    manifest = manifest.model_copy(update={"training": {
        "command": command, "seed": plan.seed, "epochs": plan.epochs, "steps_per_epoch": plan.steps_per_epoch,
        "train_cases": [c.name for c in train_cases], "validation_cases": [c.name for c in val_cases],
        "data": _data_summary(cases),
        "validation": validation, "loss": plan.loss, "device": str(dev), "seconds": round(seconds),
        "final_loss": losses[-1] if losses else None}})
    manifest = write_model_folder(out, manifest, net, model_card(manifest, plan))
    plan.save(out / "plan.json")
    return TrainResult(manifest, losses, validation, seconds)


def _data_summary(cases: list[Case]) -> str:
    """Which generator, seeds and options made the data: one group per distinct set of options, so a
    mix (axial, oblique, tilted) reads as such."""
    origins = [c.origin for c in cases if c.origin]
    if len(origins) != len(cases):
        return f"{len(cases)} labelled cases"
    groups: dict[str, list[int]] = {}
    for o in origins:
        opts = {k: v for k, v in o["options"].items() if v not in (None, False, 0.0)}
        groups.setdefault(", ".join(f"{k} {v}" for k, v in sorted(opts.items())) or "defaults", []).append(o["seed"])
    parts = [f"seeds {min(seeds)}..{max(seeds)} ({len(seeds)}): {opts}" for opts, seeds in groups.items()]
    return f"segnode {origins[0]['generator'].upper()} phantoms, " + "; ".join(parts)


def model_card(manifest: Manifest, plan: Plan) -> str:
    t = manifest.training
    rows = "\n".join(f"| {name} | {m['dice']:.3f} | {m['iou']:.3f} | {m['hd95']:.1f} |"
                     for name, m in t.get("validation", {}).items())
    labels = ", ".join(f"{label.value} {label.name} (SCT {label.type.value})" for label in manifest.labels)
    return f"""# {manifest.name} {manifest.version}

**Synthetic-data model.** Trained only on segnode's generated phantoms. It is not a medical device,
has not been validated on patient images, and must not be used for diagnosis or treatment.

- Intended use: exercising segnode end to end (routing, inference, DICOM-SEG/SR delivery) and
  integration testing with a PACS; a template for models trained on real data.
- Modality: {manifest.modality}, {manifest.spatial_dims}D; labels: {labels}.
- Network: {manifest.network.architecture} ({plan.network_args.get('filters')} filters), patch
  {manifest.patch_size} at spacing {manifest.target_spacing} mm; normalization {plan.normalization.method}.
- Orientation: {manifest.orientation or 'none recorded: arrays as stored'} (every input is turned into it first).

## Training

- Data: {t.get('data')}; {len(t.get('train_cases', []))} for training, {len(t.get('validation_cases', []))}
  for validation ({', '.join(t.get('validation_cases', []))}).
- Command: `{t.get('command') or '(library call)'}`
- Seed {t.get('seed')}, {t.get('epochs')} epochs x {t.get('steps_per_epoch')} steps, loss {t.get('loss')},
  device {t.get('device')}, {t.get('seconds')} s.

## Validation (held-out phantoms, at the model's spacing)

| label | Dice | IoU | HD95 (mm) |
|---|---|---|---|
{rows}

## Limits

Phantom anatomy is simple (smoothly deformed ellipsoids with uniform texture); real organs have
vessels, lesions, neighbours of similar density and anatomical variation this model never saw.
Figures above come from phantoms drawn from the same generator as the training data.
"""
