"""Registration's descriptors: MIND-SSC, the network's features, or both, on a common scale.

Every feature set is scaled so that its total variance (summed over channels) is one on the fixed
image, which is about the scale of raw MIND-SSC; the same factor is applied to the moving image's
features so that the two stay comparable. The solver's weights (coupling, diffusion) are tuned for
that scale and need no change between feature kinds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from synthvox.errors import InputError
from synthvox.registration.mind import mind_ssc

FEATURE_KINDS = ("mind", "net", "both")


def robust_unit_range(image: torch.Tensor) -> torch.Tensor:
    """Scale an image to about [0, 1] by its 0.5th and 99.5th percentiles (MIND needs no more)."""
    x = image.float()
    flat = x.reshape(-1)
    if flat.numel() > 250_000:  # an even subsample: percentiles to a fraction of a percent, sorted fast
        flat = flat[:: flat.numel() // 250_000 + 1]
    lo, hi = torch.quantile(flat, torch.tensor([0.005, 0.995], device=flat.device))
    if float(hi - lo) <= 0:
        hi = flat.max()
        lo = flat.min()
    scale = float(hi - lo) if float(hi - lo) > 0 else 1.0
    return ((x - lo) / scale).clamp(-0.5, 1.5)


@dataclass
class FeatureExtractor:
    """Computes features of single-channel images on one device.

    Attributes:
        kind: ``"mind"``, ``"net"`` or ``"both"``.
        model: the UNet (needed for ``"net"`` and ``"both"``).
        device: where to compute.
        modality_fixed: ``"auto"``, ``"mr"`` or ``"ct"``: the intensity normalisation for the network.
        modality_moving: the same for the moving image.
        ct_window: optional ``(low, high)`` HU window for CT.
        mind_radius: MIND patch radius.
        mind_dilation: MIND neighbourhood distance.
        patch: sliding-window patch size for the network.
        net_zoom: the network sees each image resampled by this factor, one or one per axis (the
            images' spacing over the spacing the network works at, see
            :func:`synthvox.models.card.network_spacing`); its features are resampled back onto the
            image's grid.
        intensity_scaling: the network's MR intensity scaling (``percentile`` or ``foreground``, see
            :func:`synthvox.models.extract.normalise_intensity`); ``None``: what the model's card names.
    """

    kind: str = "mind"
    model: Any = None
    device: torch.device = torch.device("cpu")
    modality_fixed: str = "auto"
    modality_moving: str = "auto"
    ct_window: tuple[float, float] | None = None
    mind_radius: int = 1
    mind_dilation: int = 2
    patch: int = 128
    net_zoom: float | tuple[float, float, float] = 1.0
    intensity_scaling: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in FEATURE_KINDS:
            raise InputError(f"unknown feature kind {self.kind!r}: use one of {', '.join(FEATURE_KINDS)}")
        if self.kind in ("net", "both") and self.model is None:
            raise InputError(f"--features {self.kind} needs network weights")
        zoom = (self.net_zoom,) * 3 if isinstance(self.net_zoom, (int, float)) else tuple(self.net_zoom)
        if len(zoom) != 3 or not all(z > 0 and math.isfinite(z) for z in zoom):
            raise InputError(f"the network's zoom must be one or three positive numbers, got {self.net_zoom}")
        self.net_zoom = tuple(float(z) for z in zoom)

    def _mind(self, image: torch.Tensor) -> torch.Tensor:
        x = robust_unit_range(image.to(self.device))
        return mind_ssc(x, radius=self.mind_radius, dilation=self.mind_dilation)

    def _net(self, image: torch.Tensor, modality: str) -> torch.Tensor:
        from synthvox.models.extract import card_scaling, extract_features, normalise_intensity

        x = normalise_intensity(image.float().cpu(), modality=modality, ct_window=self.ct_window,
                                scaling=self.intensity_scaling or card_scaling(self.model))
        shape = list(x.shape[1:])
        # the same end points; an axis that is not zoomed keeps its size, however small
        size = [n if z == 1.0 else max(8, round((n - 1) * z) + 1) for n, z in zip(shape, self.net_zoom)]
        if size != shape:
            x = F.interpolate(x[None], size=size, mode="trilinear", align_corners=True)[0]
        with torch.no_grad():
            f = extract_features(self.model, x, self.device, patch=self.patch, overlap=0.25)
            if size != shape:
                f = F.interpolate(f[None], size=shape, mode="trilinear", align_corners=True)[0]
        return f.to(self.device).float()

    def raw(self, image: torch.Tensor, which: str, only: str | None = None) -> dict[str, torch.Tensor]:
        """Unscaled feature sets of a ``(1, X, Y, Z)`` image; ``which`` is ``"fixed"`` or ``"moving"``;
        ``only``: just that set (``"mind"`` or ``"net"``)."""
        modality = self.modality_fixed if which == "fixed" else self.modality_moving
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            if self.kind in ("mind", "both") and only in (None, "mind"):
                out["mind"] = self._mind(image)
            if self.kind in ("net", "both") and only in (None, "net"):
                out["net"] = self._net(image, modality)
        return out


def total_std(features: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Square root of the summed per-channel variance of ``(C, X, Y, Z)`` features (inside ``mask``)."""
    f = features.reshape(features.shape[0], -1)
    if mask is not None:
        f = f[:, mask.reshape(-1).bool()]
    if f.shape[1] < 2:
        return 1.0
    v = float(f.var(dim=1).sum())
    return v**0.5 if v > 0 else 1.0


def combine(sets: dict[str, torch.Tensor], scales: dict[str, float],
            shares: dict[str, float] | None = None) -> torch.Tensor:
    """Concatenate feature sets, each divided by its scale and weighted so the sum has unit variance.

    ``shares``: each set's share of that variance (summing to one); equal shares when None.
    """
    parts = [sets[k] * set_weight(k, scales, shares) for k in sorted(sets)]
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=0)


def set_weight(name: str, scales: dict[str, float], shares: dict[str, float] | None = None) -> float:
    """The factor :func:`combine` gives the feature set ``name`` among the sets of ``scales``: its
    share's square root (equal shares when None) over its scale."""
    share = shares[name] if shares else 1.0 / len(scales)
    return share**0.5 / scales[name]


def feature_scales(sets: dict[str, torch.Tensor], mask: torch.Tensor | None = None) -> dict[str, float]:
    """The scale of each feature set, measured on the fixed image."""
    return {k: total_std(v, mask) for k, v in sets.items()}
