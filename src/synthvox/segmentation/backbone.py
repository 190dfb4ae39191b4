"""The network finetuning starts from: building or loading the UNet, its feature channels, and what stays frozen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from synthvox.errors import InputError
from synthvox.segmentation.modeldir import BACKBONE_DIR, SegmentationNet, is_model_dir


def build_backbone(
    init: str, variant: str, device: torch.device, seed: int = 0, overrides: dict[str, Any] | None = None
) -> tuple[nn.Module, str]:
    """The UNet to start from and a description of where it came from."""
    from synthvox.models import build_model, default_weights_path, load_model

    if init == "random":
        try:
            return build_model(variant, seed=seed, **(overrides or {})), f"random ({variant})"
        except (TypeError, ValueError) as exc:
            raise InputError(str(exc)) from None
    if init == "default":
        path = default_weights_path()
        if path is None:
            raise InputError(
                "no default pretrained weights ship with this version of synthvox yet: "
                "use --init random, or --init PATH with weights from `synthvox pretrain`"
            )
        return load_model(path, device), f"default ({path})"
    p = Path(init)
    if not p.exists():
        raise InputError(f"--init must be default, random or a model directory; not found: {p}")
    if is_model_dir(p):
        return load_model(p / BACKBONE_DIR, device), f"segmentation model {p}"
    return load_model(p, device), str(p)


def feature_channels(backbone: nn.Module, device: torch.device) -> int:
    """Output channels of the backbone (read from the model, else from a tiny forward pass)."""
    for name in ("out_channels", "feature_channels", "n_features"):
        v = getattr(backbone, name, None)
        if isinstance(v, int):
            return v
    cfg = getattr(backbone, "config", None)
    for name in ("out_channels", "feature_channels"):
        v = getattr(cfg, name, None)
        if isinstance(v, int):
            return v
    with torch.no_grad():
        return int(backbone(torch.zeros(1, 1, 16, 16, 16, device=device)).shape[1])


#: Submodules of :class:`synthvox.models.unet.UNet` that make up its encoder (bottleneck included).
ENCODER_PARTS = ("stem", "encoders", "bottleneck")


def encoder_modules(backbone: nn.Module) -> list[nn.Module]:
    """The encoder part of the UNet (frozen with ``train="decoder"``)."""
    found = [getattr(backbone, n) for n in ENCODER_PARTS if isinstance(getattr(backbone, n, None), nn.Module)]
    if not found:
        raise InputError(f"--train decoder: this network ({type(backbone).__name__}) has no recognisable encoder")
    return found


def trainable_parameters(net: SegmentationNet, train: str) -> list[nn.Parameter]:
    """Freeze what ``train`` says stays fixed; return the parameters that learn."""
    for p in net.parameters():
        p.requires_grad_(True)
    if train == "head":
        for p in net.backbone.parameters():
            p.requires_grad_(False)
    elif train == "decoder":
        for m in encoder_modules(net.backbone):
            for p in m.parameters():
                p.requires_grad_(False)
    return [p for p in net.parameters() if p.requires_grad]
