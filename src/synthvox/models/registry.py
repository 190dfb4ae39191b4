"""Named UNet variants, each a set of constructor arguments."""

from __future__ import annotations

from typing import Any

import torch

from synthvox.models.unet import UNet

#: Variant name -> :class:`UNet` constructor arguments.
VARIANTS: dict[str, dict[str, Any]] = {
    # For tests and the CPU: same shape as the default, 1/4 of the channels (~0.37 M parameters).
    "tiny": {"base_channels": 4, "levels": 4, "out_channels": 16},
    # Half the channels (~1.5 M parameters): about a third of the default's cost per step on a CPU.
    "small": {"base_channels": 8, "levels": 4, "out_channels": 16},
    # The method's reference size: 16 -> 256 channels, 16 output features (~5.9 M parameters).
    "default": {"base_channels": 16, "levels": 4, "out_channels": 16},
    # Twice the channels (~23.6 M parameters).
    "large": {"base_channels": 32, "levels": 4, "out_channels": 16},
}


def variant_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """Constructor arguments of a named variant, with ``overrides`` (``None`` values ignored).

    Raises:
        ValueError: unknown variant name.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown model variant {name!r}: use one of {', '.join(VARIANTS)}")
    kw = dict(VARIANTS[name])
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return kw


def build_model(name: str = "default", seed: int | None = 0, **overrides: Any) -> UNet:
    """Build a named variant with weights initialised from ``seed`` (global RNG state untouched).

    Args:
        name: a key of :data:`VARIANTS`.
        seed: initialisation seed; ``None`` uses the global generator.
        **overrides: constructor arguments replacing the variant's (e.g. ``norm="batch"``).
    """
    kw = variant_kwargs(name, **overrides)
    if seed is None:
        return UNet(**kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return UNet(**kw)
