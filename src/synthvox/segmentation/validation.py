"""The check that finetuning reports: what it scores, and the Dice it gets there.

What is scored depends on what the user gave, and is said in the log and the model's metadata:

* a validation pair (``val=``): held out, scored at every check;
* several training volumes: each check scores one of them, in turn, that the patch draws have left
  out for the steps before it ("training subject 2, left out of the draws since step 150"). Check
  ``j`` (after step ``(j + 1) * val_every``, or the last step) scores subject ``j % n``, left out of
  the last ``window = min(val_every, steps // n)`` steps before it (the cap keeps a short run from
  never training on a subject). Which subject step ``i`` leaves out is a function of the step, so a
  resumed run draws the same patches;
* one training volume whose labels have no sides: a left-right mirrored copy of it;
* one training volume whose labels have sides (:func:`sided_labels`; a mirrored copy would put the
  left structures where the right ones belong and score near 0): an augmented copy of the training
  volume (random affine, elastic and appearance changes, never a mirror), reported as a training-fit
  check, not a held-out one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from synthvox.segmentation.augment import extract_patch, sample_patch_augment
from synthvox.segmentation.config import FinetuneConfig
from synthvox.segmentation.data import Subject
from synthvox.segmentation.infer import sliding_window_probabilities

#: Seed key of the augmented copy scored by the training-fit check (apart from the step streams).
FIT_CHECK = 0xF17C


def sided_labels(classes: torch.Tensor, has_background: bool = True, min_voxels: int = 8, overlap: float = 0.5) -> dict[int, int]:
    """The classes of a canonical (RAS) class map that tell left from right.

    The mid-plane is the left-right centre of the foreground. A class is sided when its mirror image
    about that plane covers less than ``overlap`` of it and its centre lies off the plane by more
    than a quarter of its own left-right extent (a structure on one side, not a midline one or a
    pair that shares a label). Classes of fewer than ``min_voxels`` voxels are not judged.

    Args:
        classes: ``(1, X, Y, Z)`` contiguous class indices, axis 0 left to right.
        has_background: whether class 0 is background (left out of the foreground and of the result).

    Returns:
        ``{sided class: the class its mirror image lands on most}`` (a left/right partner, or 0).
    """
    cls = classes[0]
    fg = cls != 0 if has_background else torch.ones_like(cls, dtype=torch.bool)
    if not fg.any():
        return {}
    nx = cls.shape[0]
    xs = torch.arange(nx, dtype=torch.float64, device=cls.device)
    per_x = fg.sum(dim=(1, 2)).to(torch.float64)
    mid = float((xs * per_x).sum() / per_x.sum())
    out: dict[int, int] = {}
    for c in torch.unique(cls[fg]).tolist():
        idx = torch.nonzero(cls == c)
        if len(idx) < min_voxels:
            continue
        x = idx[:, 0].to(torch.float64)
        centre_off = abs(float(x.mean()) - mid)
        extent = float(x.max() - x.min()) + 1.0
        mx = torch.round(2 * mid - x).long()
        inside = (mx >= 0) & (mx < nx)
        landed = torch.zeros(len(idx), dtype=torch.int64, device=cls.device)
        landed[inside] = cls[mx[inside], idx[inside, 1], idx[inside, 2]]
        self_overlap = float((landed == c).double().mean())
        if self_overlap < overlap and centre_off > 0.25 * extent:
            others = landed[(landed != c) & inside]
            out[int(c)] = int(torch.mode(others).values) if len(others) else 0
    return out


def flipped(subject: Subject, axis: int = 0) -> Subject:
    """A copy mirrored along ``axis`` (left-right for canonical arrays)."""
    return Subject(subject.image.flip(axis + 1), subject.classes.flip(axis + 1), subject.affine, {})


def augmented_copy(subject: Subject, cfg: FinetuneConfig, device: torch.device) -> Subject:
    """The whole of ``subject`` under one random affine, elastic and appearance change (no flips), from ``cfg.seed``."""
    from synthvox.seeding import generator

    aug_cfg = dataclasses.replace(cfg.augment, flip=False, p_affine=1.0, p_elastic=1.0)
    aug = sample_patch_augment(generator(cfg.seed, FIT_CHECK), aug_cfg)
    shape = subject.image.shape[1:]
    centre = torch.tensor([(s - 1) / 2 for s in shape])
    x, y = extract_patch(subject.image, subject.classes, centre, shape, aug, device)
    return Subject(x.contiguous(), y.contiguous(), subject.affine, {})


@dataclass
class ValidationPlan:
    """What each check scores and which training subject the draws leave out (see the module docstring).

    Attributes:
        kind: ``"validation pair"``, ``"left out in turn"``, ``"mirrored copy"`` or ``"training fit"``.
        summary: one line for the model's metadata on what the checks score.
        short: what one check scores, for the log and the progress output (rotating plans name the
            subject and step at each check instead, :meth:`at`).
        subjects: what can be scored (the validation subject, or the training subjects, or one copy).
        val_every: steps between checks.
        steps: the run's steps (the last check comes after the last step).
        window: how many steps before each check leave its subject out of the draws.
    """

    kind: str
    summary: str
    short: str
    subjects: list[Subject]
    val_every: int
    steps: int = 0
    window: int = 0

    @property
    def held_out(self) -> bool:
        """Whether the checks score something the network was not trained on at the time."""
        return self.kind in ("validation pair", "left out in turn")

    @property
    def dice_name(self) -> str:
        """How to name the Dice the checks give (``"held-out Dice"``, ``"training-fit Dice"``, ...)."""
        return {"validation pair": "held-out", "left out in turn": "left-out", "mirrored copy": "mirrored-copy",
                "training fit": "training-fit"}[self.kind] + " Dice"

    def left_out(self, step: int) -> int | None:
        """The training subject the draws of step ``step`` (0-based) leave out, if any."""
        if self.kind != "left out in turn":
            return None
        j = step // self.val_every
        end = min((j + 1) * self.val_every, self.steps)
        return j % len(self.subjects) if max(j * self.val_every, end - self.window) <= step < end else None

    def at(self, steps_done: int) -> tuple[Subject, str]:
        """What the check after ``steps_done`` steps scores, and a description of it."""
        if self.kind != "left out in turn":
            return self.subjects[0], self.short
        j = (steps_done - 1) // self.val_every
        since = max(j * self.val_every, steps_done - self.window)
        s = j % len(self.subjects)
        return self.subjects[s], f"training subject {s + 1}, left out of the draws since step {since}"


def plan_validation(
    subjects: Sequence[Subject],
    val: Subject | None,
    cfg: FinetuneConfig,
    label_ids: Sequence[int],
    device: torch.device,
) -> ValidationPlan:
    """Choose what the checks of a finetuning run score (see the module docstring)."""
    every = int(cfg.val_every or 1)
    if val is not None:
        return ValidationPlan("validation pair", "validation pair", "validation pair", [val], every)
    if len(subjects) > 1:
        n = len(subjects)
        window = max(1, min(every, cfg.steps // n))
        return ValidationPlan(
            "left out in turn",
            f"training subjects in turn: check j (every {every} steps) scores subject j mod {n} + 1, which the patch "
            f"draws left out for the {window} steps before it",
            "", list(subjects), every, cfg.steps, window,
        )
    sided = sided_labels(subjects[0].classes, has_background=label_ids[0] == 0)
    if not sided:
        return ValidationPlan("mirrored copy", "mirrored copy of training volume 1 (its labels have no left/right sides)",
                              "mirrored copy of training volume 1", [flipped(subjects[0])], every)
    ids = [label_ids[c] for c in sided]
    names = ", ".join(str(i) for i in ids[:8]) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
    pairs = [f"{label_ids[c]}/{label_ids[p]}" for c, p in sided.items() if p and c < p and sided.get(p) == c]
    pair_text = f"; left/right pairs {', '.join(pairs[:6])}" if pairs else ""
    return ValidationPlan(
        "training fit",
        f"training fit, not held out: an augmented copy of training volume 1 (sided labels {names}{pair_text}: a "
        "mirrored copy would swap them; give --val-image/--val-label or more volumes for a held-out check)",
        "training fit, not held out: augmented copy of training volume 1",
        [augmented_copy(subjects[0], cfg, device)], every,
    )


def validate(net: nn.Module, subject: Subject, cfg: FinetuneConfig, device: torch.device, n_classes: int, has_background: bool) -> float:
    """Mean foreground Dice of ``net`` on ``subject`` (sliding window in the model frame), over the
    classes present in the subject's reference (:func:`synthvox.metrics.dice_per_label`)."""
    from synthvox.metrics import dice_per_label

    prob = sliding_window_probabilities(net, subject.image.to(device), cfg.patch_size, device, overlap=0.25, sw_batch_size=cfg.batch_size)
    ref = subject.classes.cpu()
    present = [c for c in torch.unique(ref).tolist() if c != 0 or not has_background]
    if not present:
        return float("nan")
    return float(np.mean(list(dice_per_label(prob.argmax(0).cpu(), ref, present).values())))
