"""Import an nnU-Net v2 trained-model folder as an ordinary segnode model folder.

Reads the format as nnU-Net 2.x writes it (model_sharing/model_export.py, plans_handler.py,
get_network_from_plans.py, label_handling.py): `dataset.json`, `plans.json`,
`fold_<k>/checkpoint_final.pth`. The checkpoints are unpickled here, once, with torch's restricted
loader (tensors, numbers and the few numpy scalar types nnU-Net's logs hold); serving loads only the
safetensors written here. nnunetv2 itself is not needed.
"""

from __future__ import annotations

import colorsys
import csv
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from segnode.errors import ConfigurationError
from segnode.models.manifest import (ANATOMICAL_STRUCTURE, Code, Label, Manifest, Network, NnUNet,
                                     NnUNetNormalization, NnUNetResampling, check_codes)
from segnode.models.registry import write_model_folder
from segnode.nets import NNUNET_ARCHITECTURE
from segnode.nets.nnunet import FoldEnsemble, NnUNetNetworkError, build_nnunet_network

log = logging.getLogger(__name__)

SUPPORTED_CONFIGURATIONS = "2d, 3d_fullres, 3d_lowres or a configuration inheriting from one of them"
_RESAMPLING_FN = "resample_data_or_seg_to_shape"
_ANISO_THRESHOLD = 3.0  # nnunetv2.configuration.ANISO_THRESHOLD


class NnUNetImportError(ConfigurationError):
    """The folder is not an nnU-Net v2 model segnode can run; the message says what and why."""


@dataclass(kw_only=True)
class ImportOptions:
    """What `segnode models import nnunet` was asked for.

    Attributes:
        folder: The trained-model folder (Trainer__Plans__configuration) or the dataset folder above it.
        orientation: Axis codes of the arrays the model was trained on (segnode.imaging.orientation),
            e.g. "SPL" for axial DICOM stacks, "SAR" for RAS-canonical NIfTI read by SimpleITK.
        configuration: Which configuration, when `folder` holds several.
        folds: Fold names ("0".."4", "all" for nnU-Net's fold_all), or None for nnU-Net's default: every
            numbered fold with a checkpoint.
        name: The segnode model name; default from the dataset and configuration.
        checkpoint: "checkpoint_final.pth" (nnU-Net's default) or "checkpoint_best.pth".
        modality: DICOM Modality it segments; default from dataset.json's channel name.
        version: The model version recorded in the manifest.
    """

    folder: Path
    orientation: str
    configuration: str | None = None
    folds: list[str] | None = None
    name: str | None = None
    checkpoint: str = "checkpoint_final.pth"
    modality: str | None = None
    version: str = "1.0.0"


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise NnUNetImportError(f"{path.name} is missing in {path.parent}: not an nnU-Net trained-model folder") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NnUNetImportError(f"{path} is not valid JSON: {_one_line(exc)}") from exc
    except OSError as exc:
        raise NnUNetImportError(f"{path} cannot be read: {_one_line(exc)}") from exc
    if not isinstance(data, dict):
        raise NnUNetImportError(f"{path} is not a JSON object")
    return data


def find_model_folder(folder: Path, configuration: str | None) -> Path:
    """The Trainer__Plans__configuration folder: `folder` itself, or the one below it for `configuration`.

    Raises:
        NnUNetImportError: no such folder, or several and no way to choose (the message lists them).
    """
    if not folder.is_dir():
        raise NnUNetImportError(f"{folder} is not a folder")
    if (folder / "plans.json").exists():
        return folder
    candidates = sorted(p for p in folder.iterdir() if (p / "plans.json").exists() and p.name.count("__") == 2)
    if configuration:
        candidates = [p for p in candidates if p.name.split("__")[2] == configuration]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        datasets = sorted(p.name for p in folder.glob("Dataset*") if p.is_dir())
        hint = f"; it holds {', '.join(datasets[:5])}: pass one of those" if datasets else ""
        raise NnUNetImportError(f"{folder} holds no nnU-Net trained-model folder (Trainer__Plans__configuration "
                                f"with plans.json){f' for configuration {configuration}' if configuration else ''}"
                                f"{hint}")
    raise NnUNetImportError(f"{folder} holds several models ({', '.join(p.name for p in candidates)}): "
                            f"name one, or pass --configuration")


def resolve_configuration(plans: dict[str, Any], name: str) -> dict[str, Any]:
    """The configuration with `inherits_from` resolved (plans_handler._internal_resolve_configuration_inheritance).

    Raises:
        NnUNetImportError: unknown configuration, a cycle, or a cascade stage.
    """
    configurations = plans.get("configurations", {})
    resolved: dict[str, Any] = {}
    chain: list[str] = []
    current: str | None = name
    while current is not None:
        if current not in configurations:
            raise NnUNetImportError(f"configuration {current!r} is not in plans.json; it has "
                                    f"{', '.join(configurations) or 'none'}")
        if current in chain:
            raise NnUNetImportError(f"plans.json: circular inherits_from {' -> '.join(chain + [current])}")
        chain.append(current)
        resolved = {**configurations[current], **resolved}
        current = configurations[current].get("inherits_from")
    resolved.pop("inherits_from", None)
    if resolved.get("previous_stage") or "cascade" in name:
        raise NnUNetImportError(f"configuration {name!r} is a cascade stage: it takes the segmentation of "
                                f"{resolved.get('previous_stage') or 'a low-resolution stage'} as a second input, "
                                f"which segnode does not run; import {SUPPORTED_CONFIGURATIONS} instead")
    return resolved


def architecture_block(configuration: dict[str, Any]) -> dict[str, Any]:
    """The `architecture` block, converted from the plans layout before nnU-Net 2.3.1 where needed
    (as ConfigurationManager.__init__ does: features min(base * 2**i, max), InstanceNorm eps 1e-5 affine,
    LeakyReLU, conv bias).

    Raises:
        NnUNetImportError: an old layout naming another network class, or neither layout.
    """
    if "architecture" in configuration:
        return dict(configuration["architecture"])
    try:
        unet = configuration["UNet_class_name"]
        if unet not in ("PlainConvUNet", "ResidualEncoderUNet"):
            raise NnUNetImportError(f"plans.json (layout before nnU-Net 2.3.1) names UNet_class_name {unet!r}; "
                                    f"only PlainConvUNet and ResidualEncoderUNet can be converted")
        stages = len(configuration["n_conv_per_stage_encoder"])
        dim = len(configuration["patch_size"])
        blocks = "n_conv_per_stage" if unet == "PlainConvUNet" else "n_blocks_per_stage"
        kwargs = {
            "n_stages": stages,
            "features_per_stage": [min(configuration["UNet_base_num_features"] * 2 ** i,
                                       configuration["unet_max_num_features"]) for i in range(stages)],
            "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
            "kernel_sizes": configuration["conv_kernel_sizes"],
            "strides": configuration["pool_op_kernel_sizes"],
            blocks: configuration["n_conv_per_stage_encoder"],
            "n_conv_per_stage_decoder": configuration["n_conv_per_stage_decoder"],
            "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
        }
    except KeyError as exc:
        raise NnUNetImportError(f"plans.json: the configuration has neither an architecture block nor the "
                                f"older layout's {exc}") from exc
    return {"network_class_name": f"dynamic_network_architectures.architectures.unet.{unet}", "arch_kwargs": kwargs,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint unpickled with torch's restricted loader (weights_only), allowing only numpy's scalar
    and dtype types besides what torch allows (nnU-Net's training log holds numpy floats).

    Raises:
        NnUNetImportError: missing, or holding anything else (nothing of it is executed).
    """
    if path.exists() and not path.is_file():
        raise NnUNetImportError(f"{path} is not a regular file")
    if not path.exists():
        raise NnUNetImportError(f"{path} is missing: that fold was not trained or not copied "
                                f"(folds present: {', '.join(sorted(p.name for p in path.parent.parent.glob('fold_*'))) or 'none'})")
    safe: list[Any] = [np.dtype, type(np.dtype(np.float32)), type(np.dtype(np.float64)), type(np.dtype(np.int64))]
    try:
        safe.append(np.core.multiarray.scalar)  # type: ignore[attr-defined]
    except AttributeError:  # numpy >= 2.x without the np.core alias
        pass
    try:
        from numpy._core.multiarray import scalar

        safe.append(scalar)
    except ImportError:
        pass
    try:
        with torch.serialization.safe_globals(safe), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's advice to load with weights_only=False is not taken
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever the restricted unpickler makes of it, nothing of it ran
        blocked = re.search(r"GLOBAL ([\w.]+)", str(exc))
        why = f"it names {blocked.group(1)}, which is not a tensor or number" if blocked else _one_line(exc)
        raise NnUNetImportError(f"{path}: not a checkpoint segnode can read safely ({why})") from exc
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise NnUNetImportError(f"{path}: no network_weights in it (not an nnU-Net v2 checkpoint)")
    return checkpoint


def _state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """network_weights without the prefixes torch.compile and DDP add (nnU-Net strips them too)."""
    out = {}
    for key, value in checkpoint["network_weights"].items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise NnUNetImportError(f"network_weights holds {key!r}: {type(value).__name__} "
                                    f"{getattr(value, 'dtype', '')}, not a floating-point tensor")
        if not bool(torch.isfinite(value).all()):
            raise NnUNetImportError(f"network_weights {key!r} holds NaN or infinite values: the model cannot give labels")
        for prefix in ("_orig_mod.", "module."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


# -- labels ----------------------------------------------------------------------------------------
def _code_table() -> dict[str, dict[str, str]]:
    """Class name -> codes and colour: TotalSegmentator's SNOMED CT mapping (the installed package's, else the
    copy shipped with segnode, totalsegmentator 2.18.0, Apache-2.0)."""
    try:
        text = (resources.files("totalsegmentator") / "resources" / "totalsegmentator_snomed_mapping.csv").read_text()
    except (ModuleNotFoundError, FileNotFoundError, OSError):
        text = (resources.files("segnode.models") / "codes" / "totalsegmentator_snomed_mapping.csv").read_text()
    return {row["Structure"]: row for row in csv.DictReader(text.splitlines())}


def _code(row: dict[str, str], field: str) -> Code | None:
    value = row.get(f"{field}.CodeValue", "")
    if not value:
        return None
    return Code(value=value, scheme=row[f"{field}.CodingSchemeDesignator"], meaning=row[f"{field}.CodeMeaning"])


def _palette(n: int) -> list[tuple[int, int, int]]:
    """n distinct colours (golden-ratio hues), for classes the code table gives none."""
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65, 0.9)
        out.append((round(r * 255), round(g * 255), round(b * 255)))
    return out


def labels_from_dataset(dataset: dict[str, Any]) -> tuple[list[Label], list[list[int]] | None, list[int] | None,
                                                          list[str]]:
    """Labels with codes from dataset.json (label_handling.LabelManager's rules).

    Returns:
        (labels 1..K, regions or None, regions_class_order or None, names without a specific code).

    Raises:
        NnUNetImportError: no background 0, values that are not 1..K, or regions without a class order.
    """
    raw = {k: v for k, v in dict(dataset.get("labels", {})).items() if k != "ignore"}
    if raw.get("background") != 0:
        raise NnUNetImportError("dataset.json: labels must declare background as 0")
    raw = {k: (v[0] if isinstance(v, list) and len(v) == 1 else v) for k, v in raw.items()}  # [3] is label 3
    for name, v in raw.items():
        if not all(type(x) is int for x in (v if isinstance(v, list) else [v])):
            raise NnUNetImportError(f"dataset.json: label {name!r} is {v!r}; label values are integers")
        if not name or len(name) > 64 or any(c in name for c in "\\") or not name.isprintable():
            raise NnUNetImportError(f"dataset.json: label name {name[:80]!r} cannot be a DICOM segment label "
                                    f"(1-64 printable characters, no backslash)")
    regions_based = any(isinstance(v, list) and len(v) > 1 for v in raw.values())
    named: list[tuple[int, str]] = []
    regions: list[list[int]] | None = None
    order: list[int] | None = None
    if regions_based:
        order = [int(v) for v in dataset.get("regions_class_order") or []]
        regions = [[int(x) for x in (v if isinstance(v, list) else [v])] for k, v in raw.items()
                   if k != "background" and (v if isinstance(v, list) else [v]) != [0]]
        if len(order) != len(regions):
            raise NnUNetImportError(f"dataset.json: {len(regions)} regions but regions_class_order has {len(order)} "
                                    f"entries")
        names = [k for k, v in raw.items() if k != "background" and (v if isinstance(v, list) else [v]) != [0]]
        # nnU-Net paints region after region: a value holds its region minus the later regions painted inside it
        # (BraTS: "whole tumor" minus "tumor core" is the edema), and is named so, never as the whole region
        for i in range(len(names)):
            inside = [names[j] for j in range(i + 1, len(names)) if set(regions[j]) < set(regions[i])]
            if inside:
                names[i] = f"{names[i]} excluding {' and '.join(inside)}"
        named = list(zip(order, names))
    else:
        named = [(int(v), k) for k, v in raw.items() if k != "background"]
    values = sorted(v for v, _ in named)
    if values != list(range(1, len(values) + 1)):
        raise NnUNetImportError(f"dataset.json: label values {values} are not 1..K; segnode's SEG numbers segments "
                                f"by label value")
    table = _code_table()
    colours = _palette(len(named))
    labels: list[Label] = []
    uncoded: list[str] = []
    for i, (value, name) in enumerate(sorted(named)):
        row = table.get(name)
        category = _code(row, "SegmentedPropertyCategoryCodeSequence") if row else None
        type_ = _code(row, "SegmentedPropertyTypeCodeSequence") if row else None
        if type_ is None or category is None:
            uncoded.append(name)
            category, type_ = Code(**ANATOMICAL_STRUCTURE), Code(**ANATOMICAL_STRUCTURE)
        colour = tuple(int(c) for c in row["DicomRGBColor"].split(",")) if row and row.get("DicomRGBColor") \
            else colours[i]
        used = {label.color for label in labels}
        if colour in used:  # distinct, so a viewer tells the segments apart
            colour = next(c for c in _palette(2 * len(named) + 1) if c not in used)
        labels.append(Label(value=value, name=name, category=category, type=type_,
                            modifier=_code(row, "SegmentedPropertyTypeModifierCodeSequence") if row else None,
                            color=colour))  # type: ignore[arg-type]
    return labels, regions, order, uncoded


# -- the import ------------------------------------------------------------------------------------
def _normalization(configuration: dict[str, Any], plans: dict[str, Any], channels: int) -> list[NnUNetNormalization]:
    schemes = configuration.get("normalization_schemes", [])
    masks = configuration.get("use_mask_for_norm", [False] * len(schemes))
    if len(schemes) != channels:
        raise NnUNetImportError(f"plans.json: {len(schemes)} normalization schemes for {channels} channel(s)")
    props = plans.get("foreground_intensity_properties_per_channel", {})
    out = []
    for c, scheme in enumerate(schemes):
        try:
            out.append(NnUNetNormalization(scheme=scheme, use_mask_for_norm=bool(masks[c]),
                                           intensity_properties={k: float(v) for k, v in props.get(str(c), {}).items()}))
        except ValidationError as exc:
            raise NnUNetImportError(f"plans.json: channel {c} normalization {scheme!r} (segnode reproduces "
                                    f"CTNormalization, ZScoreNormalization, NoNormalization, "
                                    f"RescaleTo01Normalization): {_one_line(exc)}") from exc
    return out


def _resampling(configuration: dict[str, Any], which: str) -> NnUNetResampling:
    fn = configuration.get(f"resampling_fn_{which}")
    if fn != _RESAMPLING_FN:
        raise NnUNetImportError(f"plans.json: resampling_fn_{which} is {fn!r}; segnode reproduces nnU-Net's default "
                                f"{_RESAMPLING_FN} only")
    kwargs = configuration.get(f"resampling_fn_{which}_kwargs", {})
    if which == "probabilities" and int(kwargs.get("order", 1)) != 1:  # segnode.inference.nnunet.export is linear
        raise NnUNetImportError(f"plans.json: the logits are resampled with order {kwargs.get('order')}; segnode "
                                f"reproduces nnU-Net's default order 1 only")
    return NnUNetResampling(order=int(kwargs.get("order", 3 if which == "data" else 1)),
                            order_z=int(kwargs.get("order_z", 0)), force_separate_z=kwargs.get("force_separate_z"))


def _modality(dataset: dict[str, Any]) -> str:
    channel = str(next(iter(dataset.get("channel_names", dataset.get("modality", {})).values()), ""))
    known = {"CT": "CT", "MR": "MR", "MRI": "MR", "T1": "MR", "T2": "MR", "FLAIR": "MR", "ADC": "MR", "PET": "PT"}
    for key, modality in known.items():
        if channel.upper().startswith(key):
            return modality
    raise NnUNetImportError(f"dataset.json: channel {channel!r} does not say which DICOM Modality the model takes; "
                            f"pass --modality")


def _folds(model: Path, options: ImportOptions) -> list[str]:
    """The folds to average: as asked, else nnU-Net's default (auto_detect_available_folds: every numbered fold
    with the checkpoint, not fold_all), else fold_all when it is the only one."""
    present = sorted((p.name[len("fold_"):] for p in model.glob("fold_*") if (p / options.checkpoint).exists()),
                     key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0))
    if options.folds is None:
        chosen = [f for f in present if f.isdigit()] or present
        if not chosen:
            raise NnUNetImportError(f"{model}: no fold_*/{options.checkpoint}")
        return chosen
    missing = [f for f in options.folds if f not in present]
    if missing:
        raise NnUNetImportError(f"{model}: fold {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} has no "
                                f"{options.checkpoint} (folds present: {', '.join(present[:10]) or 'none'}"
                                f"{' ...' if len(present) > 10 else ''})")
    return list(dict.fromkeys(options.folds))


def _validated(cls: Any, where: str, **fields: Any) -> Any:
    """cls(**fields), its validation errors as one NnUNetImportError line naming `where`."""
    try:
        return cls(**fields)
    except ValidationError as exc:
        raise NnUNetImportError(f"{where}: {_one_line(exc)}") from exc


def _check_patch(configuration: dict[str, Any], arch: dict[str, Any]) -> None:
    """The patch must pass through the network's poolings: divisible by the strides' product per axis."""
    patch = [int(p) for p in configuration["patch_size"]]
    factor = [1] * len(patch)
    for stride in arch.get("arch_kwargs", {}).get("strides", []):
        stride = stride if isinstance(stride, (list, tuple)) else [stride] * len(patch)
        factor = [f * int(s) for f, s in zip(factor, stride)]
    if any(p < 1 or f < 1 or p % f for p, f in zip(patch, factor)):
        raise NnUNetImportError(f"plans.json: patch_size {patch} does not pass the network's poolings (multiples of "
                                f"{factor} per axis)")


def _mirror_axes(axes: Any, dims: int, fold: str) -> list[int] | None:
    """The checkpoint's inference_allowed_mirroring_axes, checked: distinct integer axes of the patch, or None."""
    if axes is None:
        return None
    if not isinstance(axes, (list, tuple)) or any(type(a) is not int or not 0 <= a < dims for a in axes) \
            or len(set(axes)) != len(axes):
        raise NnUNetImportError(f"fold {fold}: inference_allowed_mirroring_axes {axes!r} are not distinct axes "
                                f"0..{dims - 1} of the patch")
    return list(axes)


def _default_name(dataset_name: str, configuration: str) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", f"{dataset_name}-{configuration}".lower()).strip("-")
    return base[:63] or "nnunet-model"


def _one_line(exc: Exception) -> str:
    """An exception as one readable line: pydantic's first error with its field, others' first line."""
    if isinstance(exc, ValidationError):
        e = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        return f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}{more}"
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def import_nnunet(options: ImportOptions, models_root: Path) -> tuple[Path, Manifest, list[str]]:
    """Import an nnU-Net v2 trained model into `models_root/<name>/` (model.json, weights.safetensors,
    MODEL_CARD.md).

    Args:
        options: The folder and choices (ImportOptions).
        models_root: Where segnode's models live; the model folder must not exist yet.

    Returns:
        (model folder, manifest, warnings for the operator: labels without a specific code, no mirroring).

    Raises:
        NnUNetImportError: the folder is not a model segnode can run (missing file or fold, cascade, unknown
            network class or layer, unsupported normalization or resampling, several input channels,
            weights that do not fit the plans' network); one line saying which.
    """
    try:
        return _import(options, models_root)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:  # a value of the wrong kind
        where = options.folder.name or str(options.folder)
        raise NnUNetImportError(f"{where}: plans.json, dataset.json or a checkpoint holds something nnU-Net does not "
                                f"write: {type(exc).__name__}: {_one_line(exc)}") from exc


def _import(options: ImportOptions, models_root: Path) -> tuple[Path, Manifest, list[str]]:
    if options.name is not None and not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", options.name):
        raise NnUNetImportError(f"--name {options.name!r}: lowercase letters, digits and hyphens, at most 63, starting "
                                f"with a letter or digit (it names the model's folder)")
    model = find_model_folder(options.folder, options.configuration)
    trainer, plans_name, configuration_name = model.name.split("__") if model.name.count("__") == 2 else \
        ("unknown", "unknown", options.configuration or "")
    plans, dataset = _json(model / "plans.json"), _json(model / "dataset.json")
    if options.configuration and configuration_name and options.configuration != configuration_name:
        raise NnUNetImportError(f"{model.name} is configuration {configuration_name}, not {options.configuration}")
    configuration_name = configuration_name or options.configuration or ""
    if not configuration_name:
        raise NnUNetImportError(f"{model.name} is not named Trainer__Plans__configuration as nnU-Net names its results: "
                                f"pass --configuration")
    configuration = resolve_configuration(plans, configuration_name)
    if configuration.get("preprocessor_name", "DefaultPreprocessor") != "DefaultPreprocessor":
        raise NnUNetImportError(f"plans.json: preprocessor {configuration['preprocessor_name']!r}; segnode reproduces "
                                f"nnU-Net's DefaultPreprocessor only")
    channels = len(dataset.get("channel_names", dataset.get("modality", {})))
    if channels != 1:
        raise NnUNetImportError(f"dataset.json: {channels} input channels; segnode feeds one series to a model, "
                                f"so only single-channel nnU-Net models can be imported")
    try:
        orientation = check_codes(options.orientation, 3)
    except ValueError as exc:
        raise NnUNetImportError(f"--orientation: {exc}") from exc
    if plans.get("image_reader_writer") == "NibabelIOWithReorient" and orientation != "SAR":
        # nibabel_reader_writer.NibabelIOWithReorient: as_reoriented(io_orientation(affine)), then (k, j, i)
        raise NnUNetImportError(f"--orientation {orientation}: the model was trained through NibabelIOWithReorient, "
                                f"which turns every image to RAS and reads it as (k, j, i): its arrays are SAR")
    dataset_name = str(plans.get("dataset_name", model.parent.name))
    name = options.name or _default_name(dataset_name, configuration_name)
    folder = models_root / name
    if os.path.lexists(folder):  # before any checkpoint is read
        raise NnUNetImportError(f"{folder} exists already: choose another --name or remove it")
    labels, regions, order, uncoded = labels_from_dataset(dataset)
    heads = len(regions) if regions is not None else len(labels) + 1
    arch = architecture_block(configuration)
    _check_patch(configuration, arch)
    spatial_dims = len(configuration["patch_size"])
    folds = _folds(model, options)
    nets: dict[str, torch.nn.Module] = {}
    mirror_axes: list[int] | None = None
    checkpoint_trainer = trainer
    for index, fold in enumerate(folds):
        checkpoint = load_checkpoint(model / f"fold_{fold}" / options.checkpoint)
        try:
            net = build_nnunet_network(arch, channels, heads)
        except NnUNetNetworkError as exc:
            raise NnUNetImportError(f"plans.json: {exc}") from exc
        try:
            net.load_state_dict(_state_dict(checkpoint), strict=True)
        except RuntimeError as exc:
            raise NnUNetImportError(f"fold {fold}: the checkpoint's weights do not fit the network plans.json "
                                    f"describes ({str(exc).splitlines()[0][:200]}); was it trained with a custom "
                                    f"network?") from exc
        nets[fold] = net.eval()
        axes = _mirror_axes(checkpoint.get("inference_allowed_mirroring_axes"), spatial_dims, fold)
        if index == 0:  # as nnUNetPredictor: mirroring axes and trainer from the first fold's checkpoint
            mirror_axes, checkpoint_trainer = axes, str(checkpoint.get("trainer_name", trainer))
    transpose_forward = [int(i) for i in plans.get("transpose_forward", [0, 1, 2])]
    nnunet = _validated(
        NnUNet, "plans.json",
        source=f"{model.parent.name}/{model.name}", configuration=configuration_name, trainer=checkpoint_trainer,
        plans_name=str(plans.get("plans_name", plans_name)), folds=folds, checkpoint=options.checkpoint,
        transpose_forward=transpose_forward, transpose_backward=[int(i) for i in plans["transpose_backward"]]
        if "transpose_backward" in plans else [int(i) for i in np.argsort(transpose_forward)],
        normalization=_normalization(configuration, plans, channels),
        resampling_data=_resampling(configuration, "data"),
        resampling_probabilities=_resampling(configuration, "probabilities"),
        anisotropy_threshold=_ANISO_THRESHOLD, use_mirroring=mirror_axes is not None,
        regions=regions, regions_class_order=order)
    try:
        manifest = Manifest(
            name=name, version=options.version, modality=options.modality or _modality(dataset),
            description=f"nnU-Net v2 {configuration_name} model {dataset_name}, imported from {model.name}",
            spatial_dims=spatial_dims, input_channels=channels,
            network=Network(architecture=NNUNET_ARCHITECTURE, args=arch),
            target_spacing=[float(s) for s in configuration["spacing"]],
            patch_size=[int(p) for p in configuration["patch_size"]],
            labels=labels, orientation=orientation, mirror_axes=mirror_axes or [], weights_sha256="0" * 64,
            training={"imported_from": str(model.resolve()), "trainer": checkpoint_trainer, "plans": plans_name,
                      "dataset": dataset_name, "folds": folds, "checkpoint": options.checkpoint,
                      "imported_at": datetime.now(timezone.utc).isoformat(timespec="seconds")},
            nnunet=nnunet)
    except ValueError as exc:
        raise NnUNetImportError(f"cannot describe {model.name} as a segnode model: {_one_line(exc)}") from exc
    warnings = []
    if uncoded:
        warnings.append(f"no SNOMED CT code known for label(s) {', '.join(uncoded)}: typed 'Anatomical Structure' in "
                        f"SEG and SR; give each its code in {folder / 'model.json'} (labels[].type)")
    if manifest.modality != "CT" and any(n.scheme == "CTNormalization" for n in nnunet.normalization):
        warnings.append(f"--modality {manifest.modality} for a model normalized as CT (CTNormalization, Hounsfield "
                        f"statistics): it will misread other images")
    if mirror_axes is None:
        warnings.append("the checkpoint allows no mirroring (inference_allowed_mirroring_axes is None): "
                        "like nnU-Net, segnode will not mirror")
    manifest = write_model_folder(folder, manifest, FoldEnsemble(nets), lambda m: model_card(m, model, uncoded))
    return folder, manifest, warnings


def model_card(manifest: Manifest, model: Path, uncoded: list[str]) -> str:
    """MODEL_CARD.md for an imported model: where it came from, what it expects, what segnode did to it."""
    nn = manifest.nnunet
    assert nn is not None
    labels = ", ".join(f"{label.value} {label.name}" for label in manifest.labels)
    return f"""# {manifest.name} {manifest.version}

Imported nnU-Net v2 model: **{nn.source}** (trainer {nn.trainer}, plans {nn.plans_name},
configuration {nn.configuration}), folds {', '.join(nn.folds)} from `{nn.checkpoint}`, imported from
`{model.resolve()}` on {manifest.training.get('imported_at')}. segnode did not train it and has not validated
it: its intended use, training data and performance are whatever its authors state; ask them.

- Input: one {manifest.modality} channel, arrays in orientation {manifest.orientation} (as the model's training
  images were stored; every series is brought into it first), {manifest.spatial_dims}D, patch
  {manifest.patch_size} at spacing {manifest.target_spacing} mm (nnU-Net's axis order, transpose
  {nn.transpose_forward}).
- Preprocessing and inference as nnU-Net's: crop to non-zero, {nn.normalization[0].scheme} before resampling
  (order {nn.resampling_data.order}), sliding window (step {nn.tile_step_size}, Gaussian), mirroring
  {'along axes ' + str(manifest.mirror_axes) if nn.use_mirroring and manifest.mirror_axes else 'off'}, fold
  average, logits resampled with order {nn.resampling_probabilities.order}, {'region sigmoid > 0.5' if nn.regions
  else 'argmax'}.
- Labels: {labels}.{' No specific code known for: ' + ', '.join(uncoded) + '.' if uncoded else ''}
- Weights: converted once to safetensors (sha256 {manifest.weights_sha256}); the checkpoint was read with
  torch's restricted unpickler and is not needed any more.
"""
