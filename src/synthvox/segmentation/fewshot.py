"""Few-shot segmentation: finetune the (pretrained) UNet plus a 1x1x1 head on one to a few labelled volumes.

The training volumes are brought to one frame (closest canonical orientation, a common spacing: the
median of the inputs unless given), intensities are normalised, and label ids are mapped to
contiguous class indices (kept in the model directory and mapped back by ``segment``). Each step draws
patches, two thirds of them centred on a random voxel of a random foreground class, augments them
strongly (random affine + elastic deformation and the data engine's appearance steps), and minimises
MONAI's Dice + cross-entropy with AdamW under a cosine schedule. Step ``i`` of seed ``s`` draws the same
patches in every run, so a resumed run continues exactly where the checkpoint left off.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from synthvox.errors import InputError
from synthvox.segmentation.augment import AugmentConfig, augment_batch
from synthvox.segmentation.infer import check_image, resolve_normalisation, sliding_window_probabilities
from synthvox.segmentation.modeldir import (
    SegmentationMeta,
    SegmentationNet,
    is_model_dir,
    save_model_dir,
    write_json,
)
from synthvox.volume import Volume, resample_to_spacing, same_grid, to_canonical

TRAIN_MODES = ("all", "decoder", "head")
CHECKPOINT_DIR = "checkpoints"
LOG_NAME = "log.csv"
LOG_FIELDS = ["step", "loss", "lr", "val_dice", "seconds"]


@dataclass
class FinetuneConfig:
    """Resolved finetuning settings (all JSON-serialisable; recorded in the model directory).

    Attributes:
        init: ``"default"`` (shipped pretrained weights), ``"random"`` or a path to a model directory
            (pretrained weights from ``synthvox pretrain`` or another finetuned model).
        variant: network variant when ``init="random"``.
        steps: optimisation steps.
        patch_size: training patch (and inference window) size in voxels.
        batch_size: patches per step.
        lr: peak learning rate (AdamW); decays to zero along a cosine after a short linear warm-up.
        weight_decay: AdamW weight decay.
        warmup: warm-up steps (default: 3% of ``steps``, at most 100).
        train: which parameters learn: ``"all"``, ``"decoder"`` (the encoder is frozen) or ``"head"``.
        spacing: training spacing in mm per canonical axis (default: the median of the inputs).
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
    weight_decay: float = 1e-4
    warmup: int | None = None
    train: str = "all"
    spacing: list[float] | None = None
    modality: str = "auto"
    foreground_fraction: float = 2.0 / 3.0
    val_every: int | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> FinetuneConfig:
        """A copy with the automatic values filled in and the inputs checked."""
        c = dataclasses.replace(self)
        if c.train not in TRAIN_MODES:
            raise InputError(f"--train must be one of {', '.join(TRAIN_MODES)}, got {c.train!r}")
        if c.steps < 1:
            raise InputError(f"--steps must be at least 1, got {c.steps}")
        if c.batch_size < 1:
            raise InputError(f"--batch must be at least 1, got {c.batch_size}")
        if not (c.lr > 0 and math.isfinite(c.lr)):
            raise InputError(f"--lr must be a positive number, got {c.lr}")
        ps = [c.patch_size] * 3 if isinstance(c.patch_size, int) else list(c.patch_size)
        if len(ps) != 3 or min(ps) < 8:
            raise InputError(f"--patch must be at least 8 voxels along each axis, got {c.patch_size}")
        c.patch_size = [int(p) for p in ps]
        if c.modality not in ("auto", "mr", "ct"):
            raise InputError(f"--modality must be auto, mr or ct, got {c.modality!r}")
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


# ----------------------------------------------------------------------------------------------------
# Data: one frame, contiguous classes


@dataclass
class Subject:
    """A training (or validation) volume in the model's frame."""

    image: torch.Tensor  # (1, X, Y, Z) float32, normalised
    classes: torch.Tensor  # (1, X, Y, Z) int64 contiguous class indices
    affine: np.ndarray
    #: flat voxel indices of each foreground class present (class index -> indices)
    foreground: dict[int, torch.Tensor] = field(default_factory=dict)


def _check_pair(image: Volume, labels: Volume, what: str) -> None:
    check_image(image, f"{what} image")
    if not isinstance(labels, Volume):
        raise InputError(f"{what} label map must be a synthvox Volume, got {type(labels).__name__}")
    if labels.data.shape[0] != 1:
        raise InputError(f"{what} label map must be a single-channel 3D volume, got {labels.data.shape[0]} channels")
    if not same_grid(image, labels):
        raise InputError(
            f"{what} label map does not match its image's grid (shapes {labels.shape} and {image.shape}, "
            "or different affines): resample it onto the image first"
        )
    lab = labels.data
    if torch.is_floating_point(lab) and not torch.allclose(lab, lab.round(), atol=1e-3):
        raise InputError(f"{what} label map has non-integer values")
    if (lab < 0).any():
        raise InputError(f"{what} label map has negative label ids")


def label_ids_of(labels: Sequence[Volume]) -> list[int]:
    """The sorted union of label ids; each map must hold at least two (background and a structure)."""
    ids: set[int] = set()
    for i, lab in enumerate(labels):
        present = torch.unique(lab.data.round().long()).tolist()
        if len(present) < 2:
            raise InputError(
                f"training label map {i + 1} has only one label (id {present[0] if present else 'none'}): "
                "it needs background and at least one structure"
            )
        ids.update(int(v) for v in present)
    return sorted(ids)


def common_spacing(images: Sequence[Volume]) -> list[float]:
    """Median spacing per axis of the canonical (RAS) arrays."""
    sp = np.stack([to_canonical(Volume(im.data[:1, :1, :1, :1], im.affine)).spacing for im in images])
    return [float(s) for s in np.median(sp, axis=0)]


def to_classes(labels: torch.Tensor, label_ids: Sequence[int], what: str = "label map") -> torch.Tensor:
    """Map label ids to contiguous class indices (``label_ids[i] -> i``)."""
    ids = torch.as_tensor(list(label_ids), dtype=torch.int64, device=labels.device)
    idx = torch.searchsorted(ids, labels.long()).clamp_(max=len(ids) - 1)
    bad = ids[idx] != labels
    if bad.any():
        unknown = sorted(set(torch.unique(labels[bad]).tolist()))[:10]
        raise InputError(f"{what} has label ids that are not in the training labels: {unknown}")
    return idx


def prepare_subject(
    image: Volume,
    labels: Volume,
    label_ids: Sequence[int],
    spacing: Sequence[float],
    normalisation: dict[str, Any],
    what: str = "training",
) -> Subject:
    """Bring an image and its label map to the model frame (canonical, ``spacing``, normalised)."""
    from synthvox.segmentation.infer import normalise

    _check_pair(image, labels, what)
    im = to_canonical(image)
    lab = to_canonical(labels)
    im = Volume(normalise(im.data, normalisation), im.affine)
    sp = tuple(float(s) for s in spacing)
    if not np.allclose(im.spacing, sp, rtol=1e-4, atol=1e-5):
        im = resample_to_spacing(im, sp, mode="linear")
        lab = resample_to_spacing(lab, sp, mode="nearest")
    classes = to_classes(lab.data.round().long(), label_ids, f"{what} label map")
    flat = classes.reshape(-1)
    fg = {}
    for c in torch.unique(flat).tolist():
        if c != 0 or label_ids[0] != 0:
            fg[int(c)] = torch.nonzero(flat == c).reshape(-1)
    return Subject(im.data.float().contiguous(), classes.contiguous(), im.affine, fg)


def flipped(subject: Subject, axis: int = 0) -> Subject:
    """A copy mirrored along ``axis`` (left-right for canonical arrays): the default held-out check."""
    return Subject(subject.image.flip(axis + 1), subject.classes.flip(axis + 1), subject.affine, {})


# ----------------------------------------------------------------------------------------------------
# Patches


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of step ``step`` for base ``seed`` (independent of any earlier step)."""
    from synthvox.seeding import FINETUNE_STEPS, generator

    return generator(seed, FINETUNE_STEPS, step)


def sample_centres(
    subjects: Sequence[Subject], n: int, foreground_fraction: float, generator: torch.Generator
) -> list[tuple[int, torch.Tensor]]:
    """``n`` (subject index, centre voxel) pairs; a ``foreground_fraction`` of them on a random
    voxel of a random foreground class, the others anywhere in the volume."""
    out = []
    for _ in range(n):
        s = int(torch.randint(len(subjects), (1,), generator=generator))
        sub = subjects[s]
        shape = torch.tensor(sub.image.shape[1:])
        on_fg = bool(torch.rand((), generator=generator) < foreground_fraction) and len(sub.foreground) > 0
        if on_fg:
            keys = sorted(sub.foreground)
            cls = keys[int(torch.randint(len(keys), (1,), generator=generator))]
            pool = sub.foreground[cls]
            flat = int(pool[int(torch.randint(len(pool), (1,), generator=generator))])
            yz = int(shape[1] * shape[2])
            centre = torch.tensor([flat // yz, (flat // int(shape[2])) % int(shape[1]), flat % int(shape[2])])
        else:
            centre = (torch.rand(3, generator=generator) * (shape - 1)).round().long()
        out.append((s, centre.float()))
    return out


def draw_batch(
    subjects: Sequence[Subject], cfg: FinetuneConfig, step: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The augmented batch of step ``step``: images ``(B, 1, *patch)`` and classes ``(B, 1, *patch)``."""
    g = step_generator(cfg.seed, step)
    centres = sample_centres(subjects, cfg.batch_size, cfg.foreground_fraction, g)
    return augment_batch(
        [subjects[s].image for s, _ in centres],
        [subjects[s].classes for s, _ in centres],
        [c for _, c in centres],
        cfg.patch_size,
        cfg.augment,
        g,
        device,
    )


# ----------------------------------------------------------------------------------------------------
# Network


def _build_backbone(
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
        from synthvox.segmentation.modeldir import BACKBONE_DIR

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


def lr_at(step: int, cfg: FinetuneConfig) -> float:
    """Linear warm-up to ``cfg.lr``, then cosine decay to zero at ``cfg.steps``."""
    warm = int(cfg.warmup or 0)
    if step < warm:
        return cfg.lr * (step + 1) / (warm + 1)
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


# ----------------------------------------------------------------------------------------------------
# Checkpoints (safetensors + JSON metadata; no pickles)


def _ckpt_path(out_dir: Path, step: int) -> Path:
    return out_dir / CHECKPOINT_DIR / f"step_{step:07d}.safetensors"


def _compat_key(cfg: FinetuneConfig, label_ids: Sequence[int], spacing: Sequence[float]) -> dict[str, Any]:
    return {
        "label_ids": list(label_ids),
        "spacing": [round(float(s), 6) for s in spacing],
        "train": cfg.train,
        "patch_size": list(cfg.patch_size),
        "batch_size": cfg.batch_size,
        "init": cfg.init,
        "variant": cfg.variant if cfg.init == "random" else None,
        "model_overrides": cfg.model_overrides,
    }


def save_checkpoint(
    out_dir: Path,
    step: int,
    net: nn.Module,
    opt: torch.optim.Optimizer,
    info: dict[str, Any],
    keep: int,
) -> Path:
    """Write the full training state atomically; keep the newest ``keep`` checkpoints."""
    from safetensors.torch import save_file

    from synthvox.io import atomic_path

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    state = opt.state_dict()
    for idx, st in state["state"].items():
        for k, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"optim.{idx}.{k}"] = t.detach().cpu().contiguous()
    meta = {"step": step, **info}
    path = _ckpt_path(out_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"synthvox": json.dumps(meta)})
    old = sorted(path.parent.glob("step_*.safetensors"))
    for p in old[: max(0, len(old) - max(1, keep))]:
        p.unlink(missing_ok=True)
    return path


def latest_checkpoint(out_dir: Path) -> Path | None:
    """Newest checkpoint in ``out_dir/checkpoints`` (or ``None``)."""
    found = sorted((out_dir / CHECKPOINT_DIR).glob("step_*.safetensors"))
    return found[-1] if found else None


def load_checkpoint(path: Path, net: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore network and optimizer state in place; return the checkpoint's metadata."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["synthvox"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as exc:
        raise InputError(f"checkpoint {path} is unreadable or truncated ({type(exc).__name__}): delete it to resume from an older one") from None
    step = meta.get("step") if isinstance(meta, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0 or not isinstance(meta.get("compat", {}), dict) \
            or not all(isinstance(meta.get(k, 0.0), (int, float)) for k in ("best_val_dice", "last_val_dice")):
        raise InputError(f"checkpoint {path} has metadata of the wrong type: delete it to resume from an older one")
    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        net.load_state_dict(model_sd)
    except RuntimeError as exc:
        raise InputError(f"checkpoint {path} does not fit this model: {str(exc).splitlines()[0]}") from None
    opt_sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            parts = k.split(".", 2)
            if len(parts) != 3 or not parts[1].isdigit():
                raise InputError(f"checkpoint {path} has an unknown entry {k!r}: delete it to resume from an older one")
            state.setdefault(int(parts[1]), {})[parts[2]] = v
    opt_sd["state"] = state
    try:
        opt.load_state_dict(opt_sd)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise InputError(f"checkpoint {path} has optimizer state that does not fit: {' '.join(str(exc).split())[:160]}") from None
    return meta


# ----------------------------------------------------------------------------------------------------
# Validation


def validate(net: nn.Module, subject: Subject, cfg: FinetuneConfig, device: torch.device, n_classes: int, has_background: bool) -> float:
    """Mean foreground Dice of ``net`` on a held-out subject (sliding window in the model frame), over
    the classes present in the subject's reference (:func:`synthvox.metrics.dice_per_label`)."""
    from synthvox.metrics import dice_per_label

    prob = sliding_window_probabilities(net, subject.image.to(device), cfg.patch_size, device, overlap=0.25, sw_batch_size=cfg.batch_size)
    ref = subject.classes.cpu()
    present = [c for c in torch.unique(ref).tolist() if c != 0 or not has_background]
    if not present:
        return float("nan")
    return float(np.mean(list(dice_per_label(prob.argmax(0).cpu(), ref, present).values())))


# ----------------------------------------------------------------------------------------------------
# The training loop


def _read_log(path: Path, upto: int) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if int(r["step"]) <= upto]


def _write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    from synthvox.io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        w.writeheader()
        w.writerows(rows)


def finetune(
    images: Sequence[Volume],
    labels: Sequence[Volume],
    *,
    out_dir: str | os.PathLike,
    init: str = "default",
    variant: str = "default",
    steps: int = 2000,
    patch_size: int | Sequence[int] = 96,
    batch_size: int = 2,
    lr: float = 1e-3,
    train: str = "all",
    val: tuple[Volume, Volume] | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    resume: bool = False,
    spacing: float | Sequence[float] | None = None,
    modality: str = "auto",
    val_every: int | None = None,
    checkpoint_every: int | None = None,
    augment: AugmentConfig | None = None,
    model_overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Finetune a segmentation network on one to a few labelled volumes and write a model directory.

    Args:
        images: training images (single-channel 3D volumes of any grid and orientation).
        labels: one label map per image, on its image's grid; ids are kept (e.g. 0, 7, 42).
        out_dir: the model directory to write (checkpoints and log live inside it).
        init: ``"default"`` (shipped pretrained weights), ``"random"`` or a model directory.
        variant: network variant for ``init="random"`` (``"tiny"``, ``"default"``, ``"large"``).
        steps: optimisation steps (2000 suits a GPU; a few dozen run on a CPU).
        patch_size: training patch size (an int or three ints).
        batch_size: patches per step.
        lr: peak learning rate (AdamW, linear warm-up then cosine decay).
        train: ``"all"``, ``"decoder"`` (freeze the encoder) or ``"head"`` (only the 1x1x1 head).
        val: an optional held-out ``(image, label map)``; without it, a left-right mirrored copy of
            the first training volume is the held-out check (which assumes the labels do not
            distinguish left from right).
        device: where training runs; bf16 autocast on CUDA.
        seed: base seed (step ``i`` of seed ``s`` draws the same patches in every run).
        resume: continue from the newest checkpoint in ``out_dir/checkpoints``.
        spacing: training spacing in mm (default: median of the inputs).
        modality: intensity normalisation preset (``"auto"``, ``"mr"``, ``"ct"``).
        val_every: steps between held-out checks (default ``steps // 10``, at least 25).
        checkpoint_every: steps between checkpoints (default ``val_every``).
        augment: augmentation settings (default :class:`AugmentConfig()`).
        model_overrides: UNet constructor arguments replacing the variant's, for ``init="random"``
            (e.g. ``{"activation": "leaky"}``).
        progress: show a progress bar.

    Returns:
        The model directory (see :mod:`synthvox.segmentation.modeldir`).

    Raises:
        InputError: unequal numbers of images and label maps, a label map off its image's grid or
            with one class only, an image that is not a single-channel 3D volume, unknown settings,
            or (with ``resume``) a checkpoint from incompatible settings.
    """
    images, labels = list(images), list(labels)
    if len(images) == 0:
        raise InputError("finetuning needs at least one image with its label map")
    if len(images) != len(labels):
        raise InputError(f"got {len(images)} images but {len(labels)} label maps: give one label map per image")
    device = torch.device(device)
    if isinstance(spacing, (int, float)):
        spacing = [float(spacing)] * 3
    cfg = FinetuneConfig(
        init=str(init), variant=variant, steps=int(steps),
        patch_size=[patch_size] * 3 if isinstance(patch_size, int) else list(patch_size),
        batch_size=int(batch_size), lr=float(lr), train=train,
        spacing=None if spacing is None else [float(s) for s in spacing], modality=modality,
        val_every=val_every, checkpoint_every=checkpoint_every, seed=int(seed),
        augment=augment or AugmentConfig(), model_overrides=dict(model_overrides or {}),
    ).resolved()
    if cfg.model_overrides and cfg.init != "random":
        raise InputError("model overrides apply only to --init random (pretrained weights fix the architecture)")

    for i, (im, lab) in enumerate(zip(images, labels)):
        _check_pair(im, lab, f"training pair {i + 1}:")
    label_ids = label_ids_of(labels)
    train_spacing = cfg.spacing or common_spacing(images)
    if len(train_spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in train_spacing):
        raise InputError(f"--spacing must be a positive, finite number of mm, got {train_spacing}")
    normalisation = resolve_normalisation(images[0].data, cfg.modality)
    subjects = [
        prepare_subject(im, lab, label_ids, train_spacing, normalisation, f"training pair {i + 1}:")
        for i, (im, lab) in enumerate(zip(images, labels))
    ]
    if val is not None:
        val_subject = prepare_subject(val[0], val[1], label_ids, train_spacing, normalisation, "validation")
        val_source = "validation pair"
    else:
        val_subject = flipped(subjects[0])
        val_source = "mirrored copy of training volume 1"
    for sub in [*subjects, val_subject]:  # volumes live on the device; patches are cut there
        sub.image, sub.classes = sub.image.to(device), sub.classes.to(device)
    backbone, source = _build_backbone(cfg.init, cfg.variant, device, cfg.seed, cfg.model_overrides)
    backbone = backbone.to(device)
    smallest = 2 * int(getattr(backbone, "multiple", 1))
    if min(cfg.patch_size) < smallest:
        raise InputError(f"--patch must be at least {smallest} voxels for this network (its coarsest level needs 2 voxels)")

    out = Path(out_dir)
    ckpt = latest_checkpoint(out) if resume else None
    if resume and ckpt is None and (out / LOG_NAME).exists():
        raise InputError(f"--resume: no checkpoint found in {out / CHECKPOINT_DIR}")
    from synthvox.io import cleanup_on_failure

    # A run that fails (out of memory, a bad value, Ctrl-C) before its first checkpoint leaves
    # nothing behind: what it wrote is removed, and so is the folder when this call made it.
    with cleanup_on_failure(out, keep=lambda: latest_checkpoint(out) is not None):
        out.mkdir(parents=True, exist_ok=True)
        return _finetune_into(
            out, cfg, ckpt, backbone, source, subjects, val_subject, val_source, label_ids, train_spacing,
            normalisation, device, progress,
        )


def _finetune_into(
    out: Path,
    cfg: FinetuneConfig,
    ckpt: Path | None,
    backbone: nn.Module,
    source: str,
    subjects: list[Subject],
    val_subject: Subject,
    val_source: str,
    label_ids: list[int],
    train_spacing: Sequence[float],
    normalisation: dict[str, Any],
    device: torch.device,
    progress: bool,
) -> Path:
    """The training loop of :func:`finetune`, writing into the existing folder ``out``."""
    from monai.losses import DiceCELoss
    from tqdm.auto import tqdm

    has_background = label_ids[0] == 0
    n_classes = len(label_ids)

    c_feat = feature_channels(backbone, device)
    with torch.random.fork_rng(devices=[]):  # the head's initialisation from the seed, global RNG untouched
        torch.manual_seed(cfg.seed)
        net = SegmentationNet(backbone, c_feat, n_classes).to(device)
    params = trainable_parameters(net, cfg.train)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)

    compat = _compat_key(cfg, label_ids, train_spacing)
    start, best, last_val = 0, float("nan"), float("nan")
    log_rows: list[dict[str, Any]] = []
    if ckpt is not None:
        info = load_checkpoint(ckpt, net, opt)
        if info.get("compat") != compat:
            raise InputError(
                f"--resume: the checkpoint in {out} was made with different settings or data "
                f"({_diff(info.get('compat', {}), compat)}); use another --out or drop --resume"
            )
        start = int(info["step"])
        best = float(info.get("best_val_dice", float("nan")))
        last_val = float(info.get("last_val_dice", float("nan")))
        log_rows = _read_log(out / LOG_NAME, start)
    _write_log(out / LOG_NAME, log_rows)

    meta = SegmentationMeta(
        label_ids=label_ids,
        spacing=[float(s) for s in train_spacing],
        orientation="RAS",
        normalisation=normalisation,
        patch_size=list(cfg.patch_size),
        feature_channels=c_feat,
        train={**cfg.to_json(), "init_source": source, "n_train": len(subjects), "val_source": val_source},
        flip_augmented=bool(cfg.augment.flip),
    )
    write_json(out / "finetune.json", {"finetune": cfg.to_json(), "label_ids": label_ids, "spacing": meta.spacing})

    frozen_backbone = cfg.train == "head"
    net.train()
    if frozen_backbone:
        net.backbone.eval()
    use_amp = device.type == "cuda"
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc="finetune", dynamic_ncols=True)
    step = start
    last_loss = float("nan")

    def checkpoint(at: int) -> None:
        save_checkpoint(
            out, at, net, opt,
            {"compat": compat, "best_val_dice": best, "last_val_dice": last_val, "config": cfg.to_json()},
            cfg.keep_checkpoints,
        )

    try:
        while step < cfg.steps:
            x, y = draw_batch(subjects, cfg, step, device)
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
                if frozen_backbone:
                    with torch.no_grad():
                        feats = net.backbone(x)
                    logits = net.head(feats)
                else:
                    logits = net(x)
            loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            if torch.isfinite(loss):
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 12.0)
                opt.step()
            last_loss = float(loss.detach())
            step += 1
            bar.update(1)
            row: dict[str, Any] = {"step": step, "loss": f"{last_loss:.5f}", "lr": f"{lr:.3e}", "val_dice": "",
                                   "seconds": f"{time.perf_counter() - t0:.2f}"}
            if step % cfg.val_every == 0 or step == cfg.steps:
                last_val = validate(net, val_subject, cfg, device, n_classes, has_background)
                net.train()
                if frozen_backbone:
                    net.backbone.eval()
                best = last_val if not (best >= last_val) else best
                row["val_dice"] = f"{last_val:.4f}"
                bar.write(f"step {step}: loss {last_loss:.4f}, held-out Dice ({val_source}) {last_val:.4f}")
            bar.set_postfix(loss=f"{last_loss:.3f}", dice=f"{last_val:.3f}")
            log_rows.append(row)
            with open(out / LOG_NAME, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=LOG_FIELDS).writerow(row)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint(step)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (see io.cleanup_on_failure)
        if step > start:
            checkpoint(step)
        bar.close()
        raise
    bar.close()

    meta.history = {
        "steps": step,
        "final_loss": last_loss,
        "last_val_dice": last_val,
        "best_val_dice": best,
        "val_source": val_source,
        "seconds_this_run": round(time.perf_counter() - t0, 2),
    }
    net.eval()
    save_model_dir(net, meta, out)
    return out


def _diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(f"{k}: {a.get(k)} vs {b.get(k)}" for k in keys[:3]) or "unknown"
