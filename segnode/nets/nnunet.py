"""nnU-Net's networks, built with nnU-Net's own `dynamic-network-architectures` from a plans' architecture block.

nnU-Net resolves the dotted names in its plans with `pydoc.locate`, which imports whatever a plans file
names. Here only the classes nnU-Net's planners write (and the torch.nn layers they take) are resolved,
so a model folder cannot make the node import arbitrary code.

`dynamic-network-architectures` is installed by scripts/setup.sh with `--no-deps`: its declared dependency
timm drags in torchvision (and with it a CUDA build of torch); the U-Nets need only torch.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from segnode.errors import ConfigurationError

DNA = "dynamic_network_architectures"
# class name -> module, for the U-Nets nnU-Net's planners write (older plans name `residual_unet`, since moved)
NETWORK_CLASSES = {
    "PlainConvUNet": f"{DNA}.architectures.unet",
    "ResidualEncoderUNet": f"{DNA}.architectures.unet",
    "ResidualUNet": f"{DNA}.architectures.unet",
}
_NETWORK_MODULES = {f"{DNA}.architectures.unet", f"{DNA}.architectures.residual_unet"}
_LAYERS = {  # the layer classes plans may name (by torch.nn's public name)
    **{f"Conv{d}d": "conv" for d in (1, 2, 3)},
    **{f"InstanceNorm{d}d": "instancenorm" for d in (1, 2, 3)},
    **{f"BatchNorm{d}d": "batchnorm" for d in (1, 2, 3)},
    **{name: "dropout" for name in ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d")},
    **{name: "activation" for name in ("LeakyReLU", "ReLU", "PReLU", "ELU", "GELU", "SiLU")},
}
_BLOCKS = {f"{DNA}.building_blocks.residual.BasicBlockD", f"{DNA}.building_blocks.residual.BottleneckD"}


class NnUNetNetworkError(ConfigurationError, ValueError):
    """A plans' network cannot be built: unknown or disallowed class, or arguments the class rejects."""


def _network_class(dotted: str) -> type[nn.Module]:
    module, _, name = dotted.rpartition(".")
    if name not in NETWORK_CLASSES or (module and module not in _NETWORK_MODULES):
        raise NnUNetNetworkError(f"network class {dotted!r} is not one segnode builds; supported: "
                                 f"{', '.join(sorted(NETWORK_CLASSES))} from {DNA}.architectures")
    try:
        return getattr(importlib.import_module(NETWORK_CLASSES[name]), name)
    except ImportError as exc:
        raise NnUNetNetworkError(f"{DNA} is not installed ({exc}); install it with "
                                 f"`pip install --no-deps dynamic-network-architectures`") from exc


def _layer(dotted: str) -> type:
    """A torch.nn layer or residual block named in a plans file, from the allow-list only."""
    if dotted in _BLOCKS:
        module, _, name = dotted.rpartition(".")
        return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]
    module, _, name = dotted.rpartition(".")
    if name in _LAYERS and (module in ("torch.nn", "torch.nn.modules") or module.startswith("torch.nn.modules.")):
        return getattr(nn, name)  # type: ignore[no-any-return]
    raise NnUNetNetworkError(f"plans name {dotted!r} as a layer; segnode builds only torch.nn "
                             f"{', '.join(sorted(_LAYERS))} and {DNA}'s residual blocks")


def build_nnunet_network(args: dict[str, Any], input_channels: int, num_heads: int) -> nn.Module:
    """The network of a plans' `architecture` block, without deep supervision (inference uses the last head).

    Args:
        args: {"network_class_name": dotted class, "arch_kwargs": {...}, "_kw_requires_import": [names of
            arch_kwargs that are dotted layer names]}, as nnU-Net's plans (>= 2.3.1) write it.
        input_channels: Input channels (dataset.json's channel_names).
        num_heads: Output channels: labels including background, or regions.

    Returns:
        The network on the CPU, with nnU-Net's initialisation (weights are loaded over it).

    Raises:
        NnUNetNetworkError: the class or a layer is not allowed, or the class rejects the arguments.
    """
    try:
        cls = _network_class(str(args["network_class_name"]))
        kwargs = dict(args["arch_kwargs"])
        for key in args["_kw_requires_import"]:
            if kwargs.get(key) is not None:
                kwargs[key] = _layer(str(kwargs[key]))
    except KeyError as exc:
        raise NnUNetNetworkError(f"architecture block without {exc}") from exc
    try:
        net = cls(input_channels=input_channels, num_classes=num_heads, deep_supervision=False, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError, IndexError) as exc:  # RuntimeError: absurd sizes
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise NnUNetNetworkError(f"{cls.__name__}: {first}") from exc
    return net


def nnunet_divisor(args: dict[str, Any]) -> int:
    """What each input size must be a multiple of: the product of the stages' strides (largest per stage)."""
    factor = 1
    for stride in args.get("arch_kwargs", {}).get("strides", []):
        factor *= max(stride) if isinstance(stride, (list, tuple)) else int(stride)
    return factor


class FoldEnsemble(nn.Module):
    """The folds of a cross-validation, run as one network: the mean of their logits.

    nnU-Net sums each fold's sliding-window logits and divides by the number of folds; every step between
    network and sum (Gaussian weighting, mirroring, normalization by the weights) is linear, so averaging
    per window gives the same logits with one pass over the windows.

    Args:
        folds: Fold name ("0".."4", "all") -> its network, each [B, C_in, *S] -> [B, heads, *S].
    """

    def __init__(self, folds: dict[str, nn.Module]) -> None:
        super().__init__()
        self.folds = nn.ModuleDict({f"fold_{name}": net for name, net in folds.items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, *S] -> mean logits [B, heads, *S]."""
        out: torch.Tensor | None = None
        for net in self.folds.values():
            y = net(x)
            out = y if out is None else out + y
        assert out is not None
        return out / len(self.folds) if len(self.folds) > 1 else out
