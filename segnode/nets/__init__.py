"""Network builders: the U-Net family from MONAI, every hyperparameter from the model manifest.

| architecture     | MONAI class        | the paper                      |
| unet             | UNet               | Ronneberger 2015 (2D) / Çiçek 2016 (3D) |
| basic_unet       | BasicUNet          | the same, fixed depth, simpler |
| attention_unet   | AttentionUnet      | Oktay 2018                     |
| unet_plus_plus   | BasicUNetPlusPlus  | Zhou 2018                      |
| vnet             | VNet               | Milletari 2016                 |
| dynunet          | DynUNet            | nnU-Net (Isensee 2021)         |

and `dynamic_network_architectures`: nnU-Net's own U-Nets, for imported nnU-Net models (segnode.nets.nnunet).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from segnode.errors import ConfigurationError

NNUNET_ARCHITECTURE = "dynamic_network_architectures"
ARCHITECTURES = ("unet", "basic_unet", "attention_unet", "unet_plus_plus", "vnet", "dynunet", NNUNET_ARCHITECTURE)


class NetworkError(ConfigurationError, ValueError):
    """The manifest's network description cannot be built."""


def _monai_class(architecture: str) -> type[nn.Module]:
    from monai.networks import nets

    classes = {"unet": nets.UNet, "basic_unet": nets.BasicUNet, "attention_unet": nets.AttentionUnet,
               "unet_plus_plus": nets.BasicUNetPlusPlus, "vnet": nets.VNet, "dynunet": nets.DynUNet}
    if architecture not in classes:
        raise NetworkError(f"unknown architecture {architecture!r}; one of {', '.join(ARCHITECTURES)}")
    return classes[architecture]


class Segmenter(nn.Module):
    """One logits tensor out, whatever the network returns (U-Net++ returns a list, one output per
    nested depth: the last, deepest is kept), so engine and trainer need not know the architecture.

    Args:
        net: The MONAI network.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_channels, *spatial] -> logits [B, out_channels, *spatial]."""
        out = self.net(x)
        if isinstance(out, (list, tuple)):
            out = out[-1]
        return out


def build_network(architecture: str, spatial_dims: int, in_channels: int, out_channels: int,
                  args: dict[str, Any] | None = None) -> Segmenter:
    """Build from the manifest's fields; unknown or missing arguments are named in the error.

    Args:
        architecture: One of ARCHITECTURES.
        spatial_dims: 2 or 3.
        in_channels: Input channels (1 for one image).
        out_channels: Classes including background.
        args: Further constructor arguments of the MONAI class (not the three above).

    Returns:
        The network, wrapped to return one tensor, with random weights on the CPU.

    Raises:
        NetworkError: unknown architecture, spatial_dims not 2 or 3, an argument the class does not
            take or one of the three fixed ones in args, or the class rejecting the arguments.
    """
    if spatial_dims not in (2, 3):
        raise NetworkError(f"spatial_dims must be 2 or 3, not {spatial_dims}")
    if architecture == NNUNET_ARCHITECTURE:
        from segnode.nets.nnunet import NnUNetNetworkError, build_nnunet_network

        try:
            return Segmenter(build_nnunet_network(args or {}, in_channels, out_channels))
        except NnUNetNetworkError as exc:
            raise NetworkError(str(exc)) from exc
    cls = _monai_class(architecture)
    params = inspect.signature(cls.__init__).parameters
    args = dict(args or {})
    unknown = sorted(set(args) - set(params))
    if unknown:
        raise NetworkError(f"{architecture}: unknown argument(s) {', '.join(unknown)}; "
                           f"accepted: {', '.join(p for p in params if p != 'self')}")
    fixed = {"spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": out_channels}
    for key in fixed:
        if key in args:
            raise NetworkError(f"{architecture}: {key} comes from the manifest's top level, not from args")
    try:
        net = cls(**fixed, **args)
    except (TypeError, ValueError, AssertionError) as exc:
        raise NetworkError(f"{architecture}: {exc}") from exc
    return Segmenter(net)


def divisor(architecture: str, args: dict[str, Any] | None) -> int:
    """What each spatial input size must be a multiple of for this network: the product of its
    strides for unet, attention_unet and dynunet (the largest per level when strides differ by
    axis), 16 for the others (four poolings).

    Args:
        architecture: One of ARCHITECTURES.
        args: The manifest's network args (strides are read from them).

    Returns:
        The divisor in voxels.
    """
    args = args or {}
    if architecture == NNUNET_ARCHITECTURE:
        from segnode.nets.nnunet import nnunet_divisor

        return nnunet_divisor(args)
    if architecture == "vnet":
        return 16
    if architecture == "dynunet":
        strides = args.get("strides", [])
        factor = 1
        for s in strides:
            factor *= s if isinstance(s, int) else max(s)
        return factor
    if architecture in ("unet", "attention_unet"):
        factor = 1
        for s in args.get("strides", [2, 2, 2, 2]):
            factor *= s
        return factor
    return 16  # basic_unet and unet_plus_plus: four poolings (and instance norm needs >1 element: use >= 32)
