"""Building blocks of the 3D UNet: convolution + normalisation + activation."""

from __future__ import annotations

import math

import torch
from torch import nn

NORMS = ("instance", "batch", "group", "layer", "none")


class VoxelNorm(nn.Module):
    """Normalisation over the channels of each voxel, with a learnable scale and shift per channel.

    LayerNorm over the channel axis (ConvNeXt's channels-first LayerNorm): no statistics are shared
    between voxels, so a voxel's features depend only on the image within its receptive field, never
    on the rest of the volume, and training and inference compute the same function. Its parameters
    are named as an affine instance normalisation's (``weight``, ``bias``, one per channel).
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=1, keepdim=True, correction=0)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)
ACTIVATIONS = ("relu", "leaky", "gelu")


def make_norm(kind: str, channels: int) -> nn.Module:
    """A normalisation layer for ``channels`` feature maps.

    Args:
        kind: ``instance`` (per-sample, learnable affine), ``batch``, ``group`` (up to 8 groups),
            ``layer`` (over the channels of each voxel, :class:`VoxelNorm`) or ``none``.
        channels: number of channels.
    """
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True, track_running_stats=False)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, 8), channels)
    if kind == "layer":
        return VoxelNorm(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalisation {kind!r}: use one of {', '.join(NORMS)}")


def has_batchnorm(net: nn.Module) -> bool:
    """Whether ``net`` has any batch-normalisation layer."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def make_activation(kind: str) -> nn.Module:
    """An activation: ``relu``, ``leaky`` (slope 0.2) or ``gelu``."""
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "leaky":
        return nn.LeakyReLU(0.2, inplace=True)
    if kind == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {kind!r}: use one of {', '.join(ACTIVATIONS)}")


class ConvBlock(nn.Sequential):
    """3x3x3 convolution, normalisation, activation (the convolution has a bias only without a norm)."""

    def __init__(
        self, in_channels: int, out_channels: int, norm: str, activation: str, padding_mode: str = "zeros"
    ) -> None:
        super().__init__(
            nn.Conv3d(
                in_channels,
                out_channels,
                kernel_size=3,
                padding=1,
                bias=norm == "none",
                padding_mode=padding_mode,
            ),
            make_norm(norm, out_channels),
            make_activation(activation),
        )


class DoubleConv(nn.Sequential):
    """Two :class:`ConvBlock` s: ``in -> out -> out`` channels (one UNet level)."""

    def __init__(
        self, in_channels: int, out_channels: int, norm: str, activation: str, padding_mode: str = "zeros"
    ) -> None:
        super().__init__(
            ConvBlock(in_channels, out_channels, norm, activation, padding_mode),
            ConvBlock(out_channels, out_channels, norm, activation, padding_mode),
        )
