"""Finetuning settings: :class:`FinetuneConfig` and its resolution (automatic values filled in, inputs checked)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from synthvox.config import check_names
from synthvox.errors import InputError
from synthvox.segmentation.augment import AugmentConfig

TRAIN_MODES = ("all", "decoder", "head")
#: How the new head starts: a linear probe on the pretrained features (:mod:`synthvox.segmentation.head`) or random weights.
HEAD_INITS = ("probe", "random")

#: What suits a device when the user gives no budget (``synthvox finetune`` without ``--steps`` or
#: ``--minutes``): on a GPU the method's 2000 steps of two 96³ patches at the inputs' spacing; on a CPU
#: a 30-minute budget of two 48³ patches at 3 mm or coarser (one step about 1-2 s on two cores, so
#: about a thousand steps; benchmarks/README.md has what that reaches) at a higher peak learning rate
#: (3e-3: at 150 steps on nichart, 0.28 held-out Dice against 0.23 with 1e-3).
DEVICE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cuda": {"steps": 2000, "minutes": None, "patch_size": 96, "min_spacing": None, "lr": 1e-3},
    "cpu": {"steps": 100_000, "minutes": 30.0, "patch_size": 48, "min_spacing": 3.0, "lr": 3e-3},
}


#: The most steps a minutes budget may plan when the caller gives no step count.
MINUTES_STEP_CAP = 1_000_000


def device_defaults(device: str) -> dict[str, Any]:
    """:data:`DEVICE_DEFAULTS` for a device (``"cuda:1"`` is a GPU, anything else a CPU-like device)."""
    return dict(DEVICE_DEFAULTS["cuda" if str(device).startswith("cuda") else "cpu"])


def _whole(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"finetuning setting {name} must be a whole number, got {value!r}")
    return int(value)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"finetuning setting {name} must be a number, got {value!r}")
    return float(value)


@dataclass
class FinetuneConfig:
    """Resolved finetuning settings (all JSON-serialisable; recorded in the model directory).

    Attributes:
        init: ``"default"`` (shipped pretrained weights), ``"random"`` or a path to a model directory
            (pretrained weights from ``synthvox pretrain`` or another finetuned model).
        variant: network variant when ``init="random"``.
        steps: optimisation steps (with ``minutes``: the most steps the budget may give).
        minutes: a wall-clock budget instead of a step count: before training, a few timed steps and
            one timed check on a copy of the network fix ``steps`` (and the check interval) so the
            run, its checks included, fits the budget; a run that still overruns it by 10% stops
            there with its model written. The CPU default of ``synthvox finetune``.
        patch_size: training patch (and inference window) size in voxels.
        batch_size: patches per step.
        lr: peak learning rate (AdamW); decays to zero along a cosine after a short linear warm-up
            (:func:`synthvox.train.schedule.warmup_decay`, as in pretraining).
        head_init: how the new 1x1x1 head starts: ``"probe"``, a linear probe on the starting network's
            features of the training volumes (:mod:`synthvox.segmentation.head`: linear probing, then
            finetuning), or ``"random"`` weights.
        head_lr_factor: the new 1x1x1 head learns this many times faster than the pretrained network
            (it starts from random weights; with the same rate the network sat near the
            all-background solution for the first hundred steps).
        dice_background: whether the Dice part of the loss includes the background class (MONAI's
            ``include_background``; off, as in the method's reference finetuning: background is
            most voxels and its Dice drowns the small structures').
        weight_decay: AdamW weight decay.
        warmup: warm-up steps (default: 3% of ``steps``, at most 100).
        train: which parameters learn: ``"all"``, ``"decoder"`` (the encoder is frozen) or ``"head"``.
        spacing: training spacing in mm per canonical axis (default: the median of the inputs).
        min_spacing: with the default ``spacing``, train no finer than this many mm (a CPU budget).
        modality: intensity normalisation preset, ``"auto"``, ``"mr"`` or ``"ct"``.
        foreground_fraction: fraction of patches centred on a foreground voxel.
        val_every: steps between held-out checks (default: ``steps // 10``, at least 25).
        checkpoint_every: steps between checkpoints (default: ``val_every``).
        keep_checkpoints: how many checkpoints to keep.
        seed: base seed; step ``i`` of seed ``s`` draws the same patches everywhere.
        augment: augmentation settings.
        model_overrides: UNet constructor arguments replacing the variant's (``init="random"`` only).
    """

    init: str = "default"
    variant: str = "default"
    steps: int = 2000
    patch_size: list[int] = field(default_factory=lambda: [96, 96, 96])
    batch_size: int = 2
    lr: float = 1e-3
    head_init: str = "probe"
    head_lr_factor: float = 10.0
    dice_background: bool = False
    minutes: float | None = None
    weight_decay: float = 1e-4
    warmup: int | None = None
    train: str = "all"
    spacing: list[float] | None = None
    min_spacing: float | None = None
    modality: str = "auto"
    foreground_fraction: float = 2.0 / 3.0
    val_every: int | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model_overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_device(cls, device: Any, **settings: Any) -> FinetuneConfig:
        """The settings that suit ``device`` (:data:`DEVICE_DEFAULTS`), with ``settings`` on top
        (:meth:`with_settings`: a step count without ``minutes`` replaces a CPU's 30-minute budget).

        Raises:
            InputError: a setting that is not a :class:`FinetuneConfig` field.
        """
        d = device_defaults(str(device))
        return cls(steps=d["steps"], minutes=d["minutes"], patch_size=d["patch_size"], min_spacing=d["min_spacing"],
                   lr=d["lr"]).with_settings(**settings)

    def with_settings(self, **settings: Any) -> FinetuneConfig:
        """A copy with ``settings`` (field names) replacing these fields.

        ``steps`` and ``minutes`` are the budget and go together: a step count without ``minutes``
        drops a minutes budget (a fixed number of steps), ``minutes`` without a step count lets the
        budget alone fix the steps; ``None`` for either means not given (what the CLI passes for an
        option left out). Any other ``None`` is a value (``min_spacing=None``: no floor).

        Raises:
            InputError: a setting that is not a :class:`FinetuneConfig` field (one line).
        """
        check_names(settings, [f.name for f in dataclasses.fields(self)], "finetuning setting")
        given = {k: v for k, v in settings.items() if k not in ("steps", "minutes") or v is not None}
        if "steps" in given or "minutes" in given:  # what the caller says replaces the budget
            given = {"steps": MINUTES_STEP_CAP, "minutes": None, **given}
        return dataclasses.replace(self, **given)

    def checked(self) -> FinetuneConfig:
        """A copy with the inputs checked and their types made plain (``patch_size=64`` -> three ints,
        ``spacing=2`` -> three floats); the automatic values stay ``None``.

        Raises:
            InputError: a value out of its range or of the wrong type.
        """
        c = dataclasses.replace(self)
        if c.train not in TRAIN_MODES:
            raise InputError(f"--train must be one of {', '.join(TRAIN_MODES)}, got {c.train!r}")
        if c.head_init not in HEAD_INITS:
            raise InputError(f"head_init must be one of {', '.join(HEAD_INITS)}, got {c.head_init!r}")
        for name in ("steps", "batch_size", "seed", "keep_checkpoints", "warmup", "val_every", "checkpoint_every"):
            v = getattr(c, name)
            if v is not None or name in ("steps", "batch_size", "seed", "keep_checkpoints"):
                setattr(c, name, _whole(name, v))
        for name in ("lr", "head_lr_factor", "weight_decay", "foreground_fraction", "minutes", "min_spacing"):
            v = getattr(c, name)
            if v is not None or name not in ("minutes", "min_spacing"):
                setattr(c, name, _number(name, v))
        if c.steps < 1:
            raise InputError(f"--steps must be at least 1, got {c.steps}")
        if c.batch_size < 1:
            raise InputError(f"--batch must be at least 1, got {c.batch_size}")
        if not (c.lr > 0 and math.isfinite(c.lr)):
            raise InputError(f"--lr must be a positive number, got {c.lr}")
        if not (c.head_lr_factor > 0 and math.isfinite(c.head_lr_factor)):
            raise InputError(f"head_lr_factor must be a positive number, got {c.head_lr_factor}")
        if c.minutes is not None and not (c.minutes > 0 and math.isfinite(c.minutes)):
            raise InputError(f"--minutes must be a positive number, got {c.minutes}")
        ps = [c.patch_size] * 3 if isinstance(c.patch_size, numbers.Integral) else list(c.patch_size or [])
        if len(ps) != 3 or not all(isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in ps) or min(ps) < 8:
            raise InputError(f"--patch must be at least 8 voxels along each axis, got {c.patch_size}")
        c.patch_size = [int(p) for p in ps]
        if isinstance(c.spacing, numbers.Real):
            c.spacing = [float(c.spacing)] * 3
        elif c.spacing is not None:
            c.spacing = [float(v) for v in c.spacing]
        c.init = str(c.init)
        c.model_overrides = dict(c.model_overrides or {})
        c.augment = c.augment if c.augment is not None else AugmentConfig()
        if c.modality not in ("auto", "mr", "ct"):
            raise InputError(f"--modality must be auto, mr or ct, got {c.modality!r}")
        return c

    def resolved(self) -> FinetuneConfig:
        """A :meth:`checked` copy with the automatic values (warm-up, check and checkpoint intervals) filled in."""
        c = self.checked()
        if c.warmup is None:
            c.warmup = min(100, int(0.03 * c.steps))
        if c.val_every is None:
            c.val_every = max(25, c.steps // 10)
        if c.checkpoint_every is None:
            c.checkpoint_every = c.val_every
        c.val_every = max(1, int(c.val_every))
        c.checkpoint_every = max(1, int(c.checkpoint_every))
        return c

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
