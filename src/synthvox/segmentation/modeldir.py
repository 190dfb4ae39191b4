"""The self-describing model directory written by ``synthvox finetune`` and read by ``synthvox segment``.

Layout of ``MODEL/``::

    segmentation.json      # label ids, spacing, orientation, normalisation, patch size, training config
    head.safetensors       # the 1x1x1 convolution head (contiguous class index -> label_ids[index])
    backbone/              # the UNet, written by synthvox.models.save_model (model.safetensors + config.json)
    finetune.json          # the resolved finetuning configuration, written when training starts
    log.csv                # training log (step, loss, lr, validation Dice)
    checkpoints/           # resumable training state, the newest two (safetensors + JSON metadata)

Nothing here is pickled: weights are safetensors, everything else is JSON. ``segmentation.json`` is
written last, so a directory that has it is complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from synthvox.errors import InputError

FORMAT = "synthvox-segmentation"
FORMAT_VERSION = 1
META_NAME = "segmentation.json"
HEAD_NAME = "head.safetensors"
BACKBONE_DIR = "backbone"


@dataclass
class SegmentationMeta:
    """Everything needed to apply a finetuned model to a new image.

    Attributes:
        label_ids: the label ids of the training labels, sorted; the head's output channel ``i``
            predicts ``label_ids[i]``.
        spacing: voxel size (mm) the model was trained at, per axis of the canonical (RAS) array.
        orientation: axis codes of the arrays the model saw (always ``"RAS"``: closest canonical).
        normalisation: how intensities were normalised (``{"method": ..., "modality": ...}``).
        patch_size: training patch size, also the sliding-window size at inference.
        feature_channels: channels of the backbone's output (the head's input).
        train: the resolved finetuning configuration (JSON-serialisable).
        history: summary of the run (steps done, last and best validation Dice, ...).
        flip_augmented: whether training used random flips (test-time flips assume it did).
    """

    label_ids: list[int]
    spacing: list[float]
    orientation: str = "RAS"
    normalisation: dict[str, Any] = field(default_factory=lambda: {"method": "percentile", "modality": "auto"})
    patch_size: list[int] = field(default_factory=lambda: [96, 96, 96])
    feature_channels: int = 16
    train: dict[str, Any] = field(default_factory=dict)
    history: dict[str, Any] = field(default_factory=dict)
    flip_augmented: bool = False

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d = {"format": FORMAT, "version": FORMAT_VERSION, **d}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "") -> SegmentationMeta:
        if d.get("format") != FORMAT:
            raise InputError(f"not a synthvox segmentation model (wrong format tag in {where})")
        if int(d.get("version", 0)) > FORMAT_VERSION:
            raise InputError(f"segmentation model {where} was written by a newer synthvox (format version {d.get('version')})")
        try:
            return cls(
                label_ids=[int(i) for i in d["label_ids"]],
                spacing=[float(s) for s in d["spacing"]],
                orientation=str(d.get("orientation", "RAS")),
                normalisation=dict(d.get("normalisation", {})),
                patch_size=[int(p) for p in d["patch_size"]],
                feature_channels=int(d.get("feature_channels", 16)),
                train=dict(d.get("train", {})),
                history=dict(d.get("history", {})),
                flip_augmented=bool(d.get("flip_augmented", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"segmentation model description {where} is incomplete or invalid: {exc!r}") from None


class SegmentationNet(nn.Module):
    """A feature backbone (the UNet) followed by a 1x1x1 convolution to class logits."""

    def __init__(self, backbone: nn.Module, feature_channels: int, n_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Conv3d(feature_channels, n_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, X, Y, Z)`` normalised image -> ``(B, n_classes, X, Y, Z)`` logits."""
        return self.head(self.backbone(x))


def is_model_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a complete segmentation model directory."""
    p = Path(path)
    return p.is_dir() and (p / META_NAME).is_file()


def read_meta(path: str | os.PathLike) -> SegmentationMeta:
    """Read ``segmentation.json`` of a model directory.

    Raises:
        InputError: the directory does not exist or is not a segmentation model directory.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"model directory not found: {p}")
    if not is_model_dir(p):
        raise InputError(f"not a synthvox segmentation model directory (no {META_NAME}): {p}")
    try:
        d = json.loads((p / META_NAME).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {p / META_NAME}: {exc}") from None
    return SegmentationMeta.from_json(d, str(p / META_NAME))


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically."""
    from synthvox.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_model_dir(net: SegmentationNet, meta: SegmentationMeta, path: str | os.PathLike) -> Path:
    """Write ``net`` and ``meta`` as a model directory (each file atomically, the description last)."""
    from safetensors.torch import save_file

    from synthvox.io import atomic_path
    from synthvox.models import save_model

    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    save_model(net.backbone, p / BACKBONE_DIR, extra={"role": "segmentation backbone"})
    head = {k: v.detach().float().cpu().contiguous() for k, v in net.head.state_dict().items()}
    with atomic_path(p / HEAD_NAME) as tmp:
        save_file(head, str(tmp), metadata={"format": FORMAT, "n_classes": str(len(meta.label_ids))})
    write_json(p / META_NAME, meta.to_json())
    return p


def load_model_dir(
    path: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[SegmentationNet, SegmentationMeta]:
    """Load a model directory written by :func:`save_model_dir` (no unpickling).

    Returns:
        The network in eval mode on ``device`` and its description.

    Raises:
        InputError: not a model directory, or its files are missing or do not fit together.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from synthvox.models import load_model

    p = Path(path)
    meta = read_meta(p)
    if not (p / HEAD_NAME).is_file() or not (p / BACKBONE_DIR).is_dir():
        raise InputError(f"segmentation model {p} is incomplete (needs {HEAD_NAME} and {BACKBONE_DIR}/)")
    backbone = load_model(p / BACKBONE_DIR, device)
    net = SegmentationNet(backbone, meta.feature_channels, len(meta.label_ids))
    try:
        head = load_file(str(p / HEAD_NAME))
    except (SafetensorError, OSError) as exc:
        raise InputError(f"cannot read {p / HEAD_NAME}: {exc}") from None
    try:
        net.head.load_state_dict(head)
    except RuntimeError as exc:
        raise InputError(f"head weights in {p} do not match its {META_NAME}: {str(exc).splitlines()[0]}") from None
    return net.to(device).eval(), meta
