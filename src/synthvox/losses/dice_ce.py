"""Dice + cross-entropy with a weight per voxel: finetuning on labels of uneven trust (pseudo-labels).

With every weight one it is MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True, batch=True)``
(the loss plain finetuning uses). A voxel's weight ``w`` scales its share of every sum, in both parts::

    dice = mean_c [ 1 - (2 sum w p_c g_c + s) / (sum w p_c + sum w g_c + s) ]      (over batch and space)
    ce   = sum w (-log p_y) / sum w

(``p`` the softmax, ``g`` the one-hot target, ``s = 1e-5`` MONAI's smoothing), so a voxel of weight
zero changes neither the loss nor its gradient, and a batch of uniformly scaled weights gives the
loss of unit weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: MONAI's ``smooth_nr`` and ``smooth_dr``.
SMOOTH = 1e-5


class WeightedDiceCELoss(nn.Module):
    """Dice + cross-entropy over the batch with per-voxel weights (see the module docs).

    Args:
        include_background: whether the Dice part counts class 0 (the cross-entropy always does).
    """

    def __init__(self, include_background: bool = False) -> None:
        super().__init__()
        self.include_background = include_background

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``logits`` ``(B, C, ...)``, ``target`` ``(B, 1, ...)`` class indices, ``weight`` ``(B, 1, ...)``
        non-negative (``None``: all one); returns the scalar loss."""
        n_classes = logits.shape[1]
        if weight is None:
            weight = torch.ones_like(target, dtype=logits.dtype)
        w = weight.to(logits.dtype)
        log_p = F.log_softmax(logits, dim=1)
        p = log_p.exp()
        y = target.long()
        onehot = F.one_hot(y[:, 0], n_classes).movedim(-1, 1).to(logits.dtype)
        if not self.include_background and n_classes > 1:
            p_d, g_d = p[:, 1:], onehot[:, 1:]
        else:
            p_d, g_d = p, onehot
        dims = [0, *range(2, logits.dim())]
        inter = (w * p_d * g_d).sum(dims)
        denom = (w * p_d).sum(dims) + (w * g_d).sum(dims)
        dice = (1.0 - (2.0 * inter + SMOOTH) / (denom + SMOOTH)).mean()
        nll = -log_p.gather(1, y)
        ce = (w * nll).sum() / w.sum().clamp_min(torch.finfo(logits.dtype).tiny)
        return dice + ce
