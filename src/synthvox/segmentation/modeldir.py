"""The self-describing model directory written by ``synthvox finetune`` and read by ``synthvox segment``.

Layout of ``MODEL/``::

    segmentation.json      # label ids, spacing, orientation, normalisation, patch size, training config
    head.safetensors       # the 1x1x1 convolution head (contiguous class index -> label_ids[index])
    backbone/              # the UNet, written by synthvox.models.save_model (model.safetensors + config.json)
    finetune.json          # the resolved finetuning configuration, written when training starts
    log.csv                # training log (step, loss, lr, validation Dice)
    checkpoints/           # resumable training state, the newest two (safetensors + JSON metadata)
    pseudo/                # with distillation (synthvox.segmentation.distill): per unlabelled scan NAME its
                           # fused atlas labels NAME_labels.nii.gz, NAME_confidence.nii.gz and NAME.json

Nothing here is pickled: weights are safetensors, everything else is JSON. ``segmentation.json`` is
written last, so a directory that has it is complete.
"""

from __future__ import annotations

import json
import math
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
#: The pseudo-labels a distilled model was trained on (:mod:`synthvox.segmentation.distill`).
PSEUDO_DIR = "pseudo"


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
        label_volumes_ml: the mean volume (mL) of each foreground label over the training label maps,
            keyed by the label id as text; the quality figure compares a segmentation's volumes with
            them (empty for models written before it was recorded: the figure is then the entropy's alone).
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
    label_volumes_ml: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d = {"format": FORMAT, "version": FORMAT_VERSION, **d}
        return d

    @classmethod
    def from_json(cls, d: Any, where: str = "") -> SegmentationMeta:
        """Parse ``segmentation.json``, checking the type and range of every field.

        Raises:
            InputError: a foreign or newer format, or a field of the wrong JSON type or value.
        """
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise InputError(f"not a synthvox segmentation model (wrong format tag in {where})")
        version = d.get("version")
        if not _is_int(version) or version < 1:
            raise InputError(f"segmentation model description {where} has an invalid format version {version!r}")
        if version > FORMAT_VERSION:
            raise InputError(f"segmentation model {where} was written by a newer synthvox (format version {version})")

        def bad(key: str, expected: str) -> InputError:
            return InputError(f"segmentation model description {where}: {key!r} must be {expected}, got {d.get(key)!r:.80}")

        if "label_ids" not in d or "spacing" not in d or "patch_size" not in d:
            missing = [k for k in ("label_ids", "spacing", "patch_size") if k not in d]
            raise InputError(f"segmentation model description {where} is incomplete (no {', '.join(missing)})")
        ids = d["label_ids"]
        if not isinstance(ids, list) or len(ids) < 2 or not all(_is_int(i) and 0 <= i <= 2**63 - 1 for i in ids) \
                or ids != sorted(set(ids)):
            raise bad("label_ids", "a sorted list of at least two distinct non-negative integers")
        spacing = d["spacing"]
        if not isinstance(spacing, list) or len(spacing) != 3 or not all(_is_number(v) and 0 < v <= 100 for v in spacing):
            raise bad("spacing", "three finite voxel sizes in mm")
        patch = d["patch_size"]
        if not isinstance(patch, list) or len(patch) != 3 or not all(_is_int(v) and 8 <= v <= 1024 for v in patch):
            raise bad("patch_size", "three integers from 8 to 1024")
        if d.get("orientation", "RAS") != "RAS":
            raise bad("orientation", '"RAS"')
        channels = d.get("feature_channels", 16)
        if not _is_int(channels) or not 1 <= channels <= 4096:
            raise bad("feature_channels", "an integer from 1 to 4096")
        for key in ("normalisation", "train", "history"):
            if not isinstance(d.get(key, {}), dict):
                raise bad(key, "a JSON object")
        if not isinstance(d.get("flip_augmented", False), bool):
            raise bad("flip_augmented", "true or false")
        volumes = d.get("label_volumes_ml", {})
        if not isinstance(volumes, dict) or not all(
                isinstance(k, str) and k.isdigit() and int(k) in ids and _is_number(v) and v >= 0 for k, v in volumes.items()):
            raise bad("label_volumes_ml", "an object from training label ids (as text) to volumes in mL")
        return cls(
            label_ids=[int(i) for i in ids],
            spacing=[float(v) for v in spacing],
            orientation="RAS",
            normalisation=_check_normalisation(dict(d.get("normalisation", {})), where),
            patch_size=[int(v) for v in patch],
            feature_channels=int(channels),
            train=dict(d.get("train", {})),
            history=dict(d.get("history", {})),
            flip_augmented=bool(d.get("flip_augmented", False)),
            label_volumes_ml={k: float(v) for k, v in volumes.items()},
        )


def _is_int(v: Any) -> bool:
    """A JSON integer (not a boolean, not a float)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    """A finite JSON number (not a boolean)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_normalisation(n: dict[str, Any], where: str) -> dict[str, Any]:
    """Refuse a normalisation record that :func:`synthvox.segmentation.infer.normalise` cannot apply."""
    def bad(what: str) -> InputError:
        return InputError(f"segmentation model description {where}: normalisation {what}")

    if n.get("method", "percentile") != "percentile":
        raise bad(f"method must be \"percentile\", got {n.get('method')!r:.40}")
    if n.get("modality", "auto") not in ("auto", "mr", "ct"):
        raise bad(f"modality must be auto, mr or ct, got {n.get('modality')!r:.40}")
    pct = n.get("percentiles", [0.5, 99.5])
    if not isinstance(pct, list) or len(pct) != 2 or not all(_is_number(v) and 0 <= v <= 100 for v in pct) \
            or not pct[0] < pct[1]:
        raise bad(f"percentiles must be two numbers 0 <= low < high <= 100, got {pct!r:.40}")
    window = n.get("ct_window")
    if window is not None and (not isinstance(window, list) or len(window) != 2
                               or not all(_is_number(v) for v in window) or not window[0] < window[1]):
        raise bad(f"ct_window must be two finite numbers low < high, got {window!r:.40}")
    return n


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
        d = json.loads((p / META_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {p / META_NAME}: {' '.join(str(exc).split())}") from None
    return SegmentationMeta.from_json(d, str(p / META_NAME))


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically."""
    from synthvox.files import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_model_dir(net: SegmentationNet, meta: SegmentationMeta, path: str | os.PathLike) -> Path:
    """Write ``net`` and ``meta`` as a model directory (each file atomically, the description last)."""
    from safetensors.torch import save_file

    from synthvox.files import atomic_path
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
    if getattr(backbone, "out_channels", meta.feature_channels) != meta.feature_channels:
        raise InputError(
            f"segmentation model {p} does not fit together: its backbone gives {backbone.out_channels} feature "
            f"channels, its {META_NAME} says {meta.feature_channels}"
        )
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
