"""The 3D UNet that turns a one-channel volume into dense voxel features.

The default matches the reference network of the method (Dey et al. 2024): a 3x3x3 stem convolution,
four encoder levels of two 3x3x3 convolutions each (16, 32, 64, 128 channels) with max-pooling between
them, a 256-channel bottleneck, four decoder levels (nearest-neighbour upsampling, concatenation of the
encoder features, two convolutions) and a final 3x3x3 convolution to 16 feature channels: about 5.9 M
parameters.

Inputs of any spatial size are padded (edge replication) to a multiple of ``2**levels`` (and to at
least twice that, so that the bottleneck is never a single voxel) inside, and the output is cropped back, so ``forward`` maps ``(B, 1, X, Y, Z)`` to ``(B, out_channels, X, Y, Z)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from synthvox.models.blocks import ACTIVATIONS, NORMS, ConvBlock, DoubleConv


class UNet(nn.Module):
    """A 3D UNet feature extractor.

    Args:
        in_channels: input channels (1 for a grey-level volume).
        out_channels: feature channels of the output.
        base_channels: channels of the first level; level ``i`` has ``base_channels * 2**i`` and the
            bottleneck ``base_channels * 2**levels``.
        levels: number of downsamplings.
        norm: ``instance``, ``batch``, ``group``, ``layer`` (over the channels of each voxel) or ``none``.
        activation: ``relu``, ``leaky`` or ``gelu``.
        padding_mode: padding of the convolutions (``zeros`` is fastest; ``reflect`` as in the
            reference code).

    Named intermediate layers (see :meth:`layer_names`) can be returned with :meth:`forward_layers`:
    ``enc{i}`` (encoder level ``i``, at ``1/2**i`` resolution), ``bottleneck``, ``dec{i}`` (decoder level
    ``i``) and ``out`` (the output features).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 16,
        base_channels: int = 16,
        levels: int = 4,
        norm: str = "instance",
        activation: str = "relu",
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown normalisation {norm!r}: use one of {', '.join(NORMS)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}: use one of {', '.join(ACTIVATIONS)}")
        if padding_mode not in ("zeros", "reflect", "replicate"):
            raise ValueError(f"unknown padding_mode {padding_mode!r}: use zeros, reflect or replicate")
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("base_channels", base_channels), ("levels", levels)):
            if int(v) < 1:
                raise ValueError(f"{name} must be a positive integer, got {v}")
        self._config: dict[str, Any] = {
            "in_channels": int(in_channels),
            "out_channels": int(out_channels),
            "base_channels": int(base_channels),
            "levels": int(levels),
            "norm": norm,
            "activation": activation,
            "padding_mode": padding_mode,
        }
        self.levels = int(levels)
        self.out_channels = int(out_channels)
        chans = [base_channels * 2**i for i in range(levels)]
        args = (norm, activation, padding_mode)
        self.stem = ConvBlock(in_channels, base_channels, *args)
        self.encoders = nn.ModuleList()
        prev = base_channels
        for c in chans:
            self.encoders.append(DoubleConv(prev, c, *args))
            prev = c
        self.bottleneck = DoubleConv(prev, base_channels * 2**levels, *args)
        prev = base_channels * 2**levels
        self.decoders = nn.ModuleList()
        for c in reversed(chans):
            self.decoders.append(DoubleConv(prev + c, c, *args))
            prev = c
        self.head = nn.Conv3d(prev, out_channels, kernel_size=3, padding=1, padding_mode=padding_mode)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv3d) and m is not self.head:
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def multiple(self) -> int:
        """Inputs are padded to a multiple of this along each axis."""
        return 2**self.levels

    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this network (``UNet(**net.config())``)."""
        return dict(self._config)

    def layer_names(self) -> list[str]:
        """Names accepted by :meth:`forward_layers`."""
        return [f"enc{i}" for i in range(self.levels)] + ["bottleneck"] + [f"dec{i}" for i in range(self.levels)] + ["out"]

    def layer_channels(self) -> dict[str, int]:
        """Channels of each named layer."""
        b = self._config["base_channels"]
        d = {f"enc{i}": b * 2**i for i in range(self.levels)}
        d["bottleneck"] = b * 2**self.levels
        d.update({f"dec{i}": b * 2**i for i in range(self.levels)})
        d["out"] = self.out_channels
        return d

    def layer_scale(self, name: str) -> int:
        """Downsampling factor of a named layer relative to the (padded) input."""
        if name == "out":
            return 1
        if name == "bottleneck":
            return 2**self.levels
        return 2 ** int(name[3:])

    def padded_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial shape after padding ``shape`` to a multiple of :attr:`multiple` (at least ``2 * multiple``)."""
        m = self.multiple
        return tuple(max(-(-int(s) // m) * m, 2 * m) for s in shape)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape[2:])
        target = self.padded_shape(shape)
        if target == shape:
            return x
        pads: list[int] = []
        for s, t in zip(reversed(shape), reversed(target)):
            pads += [0, t - s]
        return F.pad(x, pads, mode="replicate")

    @staticmethod
    def _level(block: nn.Module, h: torch.Tensor, name: str, wanted: frozenset[str], prenorm: bool,
               taps: dict[str, torch.Tensor]) -> torch.Tensor:
        """One UNet level; records its output (or, with ``prenorm``, its last convolution's output
        before normalisation and activation) as ``taps[name]`` when wanted."""
        if not (prenorm and name in wanted):
            h = block(h)
            if name in wanted:
                taps[name] = h
            return h
        *first, last = block  # ConvBlocks: convolution, normalisation, activation
        for b in first:
            h = b(h)
        conv, norm, act = last
        pre = conv(h)
        taps[name] = pre
        h = norm(pre)
        return act(h.clone() if h is pre else h)  # an in-place activation must not change the tap

    def _run(self, x: torch.Tensor, wanted: frozenset[str],
             prenorm: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        taps: dict[str, torch.Tensor] = {}
        h = self.stem(x)
        skips = []
        for i, enc in enumerate(self.encoders):
            h = self._level(enc, h, f"enc{i}", wanted, prenorm, taps)
            skips.append(h)
            h = F.max_pool3d(h, 2)
        h = self._level(self.bottleneck, h, "bottleneck", wanted, prenorm, taps)
        for j, dec in enumerate(self.decoders):
            i = self.levels - 1 - j
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = self._level(dec, torch.cat([skips[i], h], dim=1), f"dec{i}", wanted, prenorm, taps)
        out = self.head(h)
        if "out" in wanted:
            taps["out"] = out
        return out, taps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, X, Y, Z)`` -> ``(B, out_channels, X, Y, Z)`` features, for any X, Y, Z."""
        if x.ndim != 5:
            raise ValueError(f"UNet expects a (B, C, X, Y, Z) tensor, got shape {tuple(x.shape)}")
        shape = x.shape[2:]
        out, _ = self._run(self._pad(x), frozenset())
        return out[:, :, : shape[0], : shape[1], : shape[2]]

    def forward_layers(self, x: torch.Tensor, names: Sequence[str], prenorm: bool = False) -> dict[str, torch.Tensor]:
        """Run the network and return the named intermediate layers.

        The layers are computed on the padded input (see :meth:`padded_shape`): layer ``name`` has
        spatial shape ``padded_shape(x) // layer_scale(name)`` and is not cropped. ``prenorm``: each
        level's last convolution before its normalisation and activation (where the reference code
        puts its loss) instead of the level's output; ``out`` is a plain convolution either way.

        Raises:
            ValueError: an unknown layer name.
        """
        unknown = [n for n in names if n not in self.layer_names()]
        if unknown:
            raise ValueError(f"unknown UNet layer(s) {unknown}: choose from {self.layer_names()}")
        _, taps = self._run(self._pad(x), frozenset(names), prenorm)
        return {n: taps[n] for n in names}


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
