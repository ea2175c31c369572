"""Find, verify and load model folders; write them (training does)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from segnode.errors import ConfigurationError
from segnode.models.manifest import Manifest
from segnode.nets import NetworkError, build_network, divisor

MANIFEST, WEIGHTS, CARD = "model.json", "weights.safetensors", "MODEL_CARD.md"


class ModelError(ConfigurationError):
    """A model folder that cannot be used; the message says what is wrong."""


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks.

    Raises:
        OSError: the file cannot be read.
    """
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_manifest(folder: Path) -> Manifest:
    """The folder's model.json, validated (weights are not touched).

    Args:
        folder: A model folder.

    Returns:
        The manifest.

    Raises:
        ModelError: model.json is missing, not JSON, or invalid (every problem named with its field).
    """
    path = folder / MANIFEST
    try:
        return Manifest.model_validate(json.loads(path.read_text()))
    except FileNotFoundError as exc:
        raise ModelError(f"{path} is missing") from exc
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}") from exc
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ModelError(f"{path}: {problems}") from exc


def list_models(root: Path) -> list[Path]:
    """The model folders (those with a model.json) directly under `root`, sorted; [] if it is no folder."""
    return sorted(p.parent for p in root.glob(f"*/{MANIFEST}")) if root.is_dir() else []


def build(manifest: Manifest) -> torch.nn.Module:
    """The manifest's network with fresh (random) weights: for an imported nnU-Net model one network per
    fold, averaged (segnode.nets.nnunet.FoldEnsemble).

    Raises:
        ModelError: the network description cannot be built (see segnode.nets.build_network).
    """
    if manifest.nnunet is not None:
        from segnode.nets.nnunet import FoldEnsemble, NnUNetNetworkError, build_nnunet_network

        try:
            return FoldEnsemble({fold: build_nnunet_network(manifest.network.args, manifest.input_channels,
                                                            manifest.out_channels) for fold in manifest.nnunet.folds})
        except NnUNetNetworkError as exc:
            raise ModelError(str(exc)) from exc
    try:
        return build_network(manifest.network.architecture, manifest.spatial_dims, manifest.input_channels,
                             manifest.out_channels, manifest.network.args)
    except NetworkError as exc:
        raise ModelError(str(exc)) from exc


def load_model(folder: Path, device: str | torch.device = "cpu") -> tuple[Manifest, torch.nn.Module]:
    """Manifest + network with its weights, after checking the weights' hash. No pickles: weights
    are safetensors, so a model folder cannot run code.

    Args:
        folder: A model folder (model.json, weights.safetensors).
        device: Where to put the network.

    Returns:
        (manifest, network in eval mode on `device`).

    Raises:
        ModelError: model.json missing or invalid, weights missing, their SHA-256 not the manifest's,
            the network cannot be built, or the weights do not fit it.
    """
    from safetensors.torch import load_model as load_weights

    manifest = read_manifest(folder)
    weights = folder / WEIGHTS
    if not weights.exists():
        raise ModelError(f"{weights} is missing")
    actual = sha256_file(weights)
    if actual != manifest.weights_sha256:
        raise ModelError(f"{weights} does not match model.json: sha256 {actual}, expected {manifest.weights_sha256}")
    net = build(manifest)
    try:
        load_weights(net, str(weights), strict=True, device="cpu")
    except RuntimeError as exc:
        raise ModelError(f"the weights do not fit the network described in model.json: {exc}") from exc
    return manifest, net.to(device).eval()


def probe_size(manifest: Manifest) -> list[int]:
    """A small input the network accepts: the patch size capped at 64 and rounded down to the
    network's divisor, at least 2 divisors per axis.

    Returns:
        Spatial size in voxels, one per axis of the patch.
    """
    step = divisor(manifest.network.architecture, manifest.network.args)
    return [max(step * 2, (min(p, 64) // step) * step) for p in manifest.patch_size]


@dataclass
class Check:
    """One step of check_model: its name, whether it passed and what was found."""

    name: str
    ok: bool
    detail: str = ""


def check_model(folder: Path) -> list[Check]:
    """Manifest valid, weights present and matching their hash, network builds and runs forward on
    zeros of probe_size with finite output of the expected shape.

    Args:
        folder: A model folder.

    Returns:
        The checks passed, then a failed "load" check (a ModelError is reported, not raised) or
        a "forward" check that may have failed.

    Raises:
        RuntimeError: the forward pass itself raises (e.g. the network rejects the probe size).
    """
    checks: list[Check] = []
    try:
        manifest = read_manifest(folder)
        checks.append(Check("manifest", True, f"{manifest.name} {manifest.version}, {manifest.network.architecture} "
                                              f"{manifest.spatial_dims}D, {len(manifest.labels)} labels"))
        _, net = load_model(folder)
        checks.append(Check("weights", True, f"sha256 {manifest.weights_sha256[:16]}..., "
                                             f"{sum(p.numel() for p in net.parameters()):,} parameters"))
        size = probe_size(manifest)
        with torch.inference_mode():
            out = net(torch.zeros(1, manifest.input_channels, *size))
        expected = (1, manifest.out_channels, *size)
        ok = tuple(out.shape) == expected and bool(torch.isfinite(out).all())
        checks.append(Check("forward", ok, f"input {tuple(size)} -> output {tuple(out.shape)}"
                                           + ("" if ok else f", expected {expected} and finite values")))
    except ModelError as exc:
        checks.append(Check("load", False, str(exc)))
    return checks


def _unaliased(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tensor once (modules sharing a tensor list it under several names: DynUNet,
    nnU-Net's networks), under the alphabetically first of its names; safetensors' load_model restores the rest."""
    groups: dict[tuple[object, ...], list[str]] = {}
    state = net.state_dict()
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
        groups.setdefault(key, []).append(name)
    return {min(names): state[min(names)].contiguous() for names in groups.values()}


def write_model_folder(folder: Path, manifest: Manifest, net: torch.nn.Module,
                       card: str | Callable[[Manifest], str]) -> Manifest:
    """Write weights, then the manifest with their hash, then the model card (the folder is created).

    The weights file is the same bytes for the same tensors (no alias map in its metadata: safetensors writes
    metadata in a different order each time), so re-importing or re-writing a model keeps its hash.

    Args:
        folder: Where the model folder goes; existing files are overwritten.
        manifest: The manifest; its weights_sha256 is replaced.
        net: The trained network (its state dict is written as safetensors).
        card: MODEL_CARD.md text, or a function of the manifest as written (with the weights' hash).

    Returns:
        The manifest as written, with the weights' hash.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(_unaliased(net), str(folder / WEIGHTS))
    manifest = manifest.model_copy(update={"weights_sha256": sha256_file(folder / WEIGHTS)})
    (folder / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
    shutil.copymode(folder / MANIFEST, folder / WEIGHTS)  # safetensors writes 0600; readable like the rest
    (folder / CARD).write_text(card(manifest) if callable(card) else card)
    return manifest
