"""The held-out check of finetuning: what it scores, and the Dice it reports."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from synthvox.segmentation.config import FinetuneConfig
from synthvox.segmentation.data import Subject
from synthvox.segmentation.infer import sliding_window_probabilities


def flipped(subject: Subject, axis: int = 0) -> Subject:
    """A copy mirrored along ``axis`` (left-right for canonical arrays): the default held-out check."""
    return Subject(subject.image.flip(axis + 1), subject.classes.flip(axis + 1), subject.affine, {})


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
