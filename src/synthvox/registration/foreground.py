"""The object in an image of any modality: the foreground that initialisation and the solver's
weights start from (Otsu's threshold of a smoothed copy)."""

from __future__ import annotations

import torch

from synthvox.errors import InputError
from synthvox.registration.convex import box3


def otsu_threshold(values: torch.Tensor, bins: int = 128) -> float:
    """Otsu's threshold of a 1D tensor of values."""
    v = values.float().reshape(-1)
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    hist = torch.histc(v, bins=bins, min=lo, max=hi).double()
    centres = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)[:-1] + (hi - lo) / bins / 2
    w0 = hist.cumsum(0)
    w1 = hist.sum() - w0
    m0 = (hist * centres).cumsum(0) / w0.clamp_min(1e-12)
    m1 = ((hist * centres).sum() - (hist * centres).cumsum(0)) / w1.clamp_min(1e-12)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(between.argmax())])


def foreground(image: torch.Tensor) -> torch.Tensor:
    """Boolean ``(X, Y, Z)`` foreground of a ``(1, X, Y, Z)`` image (any modality).

    Raises:
        InputError: the image is constant.
    """
    x = image[0].float()
    if float(x.max() - x.min()) <= 0:
        raise InputError("an input image is constant: there is nothing to register")
    smooth = box3(x[None], passes=2)[0]
    flat = smooth.reshape(-1)
    if flat.numel() > 1_000_000:
        flat = flat[:: flat.numel() // 1_000_000 + 1]
    lo, hi = torch.quantile(flat, torch.tensor([0.001, 0.999], device=flat.device))
    t = otsu_threshold(flat.clamp(float(lo), float(hi)))
    mask = smooth > t
    if not bool(mask.any()):
        mask = smooth >= smooth.max()
    return mask
