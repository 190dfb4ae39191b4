"""The appearance model: render a label map into a realistic image of random contrast.

Sample, then apply: :func:`sample_appearance` draws every random choice (Gaussian-mixture
intensities per label, texture, bias field, gamma, blur, sharpening, thick slices, k-space spikes,
Gibbs ringing, noise, including integer seeds for the random fields) into a frozen, JSON-serialisable
:class:`AppearanceParams`; :func:`render` / :func:`render_batch` apply them deterministically, on the
label map's device. The steps, in acquisition order:

1. tissue intensities: per-label Gaussian mixtures (means 25-255, std 5-20 in the method's units;
   the background optionally dark), per voxel;
2. texture: multi-scale smooth noise, multiplicative (or additive);
3. bias field: smooth multiplicative field on the scale of the field of view;
4. gamma;
5. point-spread function: Gaussian blur with one sigma per axis, or unsharp masking;
6. thick slices: partial-volume averaging along one axis, interpolated back;
7. k-space: spikes and Gibbs truncation, sharing one FFT;
8. thermal noise, Gaussian or Rician;
9. normalisation: clipping at robust percentiles, then min-max to ``[0, 1]``.

The step functions live in :mod:`synthvox.synth.fields` and :mod:`synthvox.synth.artefacts` and are
re-exported here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from synthvox.errors import InputError
from synthvox.synth.artefacts import (
    add_noise,
    gaussian_blur,
    gibbs_ringing,
    kspace_spikes,
    low_resolution,
    sharpen,
    spectrum_spikes_,
    spectrum_truncate_,
)
from synthvox.synth.fields import bias_field, perlin_noise

__all__ = [
    "AppearanceConfig",
    "AppearanceParams",
    "Bias",
    "Gibbs",
    "LowRes",
    "Noise",
    "Sharpen",
    "Spikes",
    "Texture",
    "add_noise",
    "apply_gamma",
    "bias_field",
    "gaussian_blur",
    "gibbs_ringing",
    "gmm_intensities",
    "kspace_spikes",
    "low_resolution",
    "normalise",
    "perlin_noise",
    "render",
    "render_batch",
    "sample_appearance",
    "sharpen",
]

_DIMS = (-3, -2, -1)


# ------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class AppearanceConfig:
    """Probabilities and ranges of the appearance model. Ranges are ``(low, high)``, uniform.

    Defaults follow the anatomix method where it has the step (means, stds, background, texture,
    bias, gamma, spikes, Gibbs and low-resolution probabilities); blur, noise and the
    thick-slice factor are wider than the method's, which blurs by at most a third of a voxel, adds
    no noise and reduces resolution isotropically by at most 2.
    """

    mean_range: tuple[float, float] = (25.0, 255.0)
    std_range: tuple[float, float] = (5.0, 20.0)
    max_components: int = 1  # Gaussians per label, drawn from 1..max_components (at most 3)
    background_dark_prob: float = 0.25  # label 0 black (1.0: always dark)
    texture_prob: float = 1.0
    texture_scales: tuple[float, ...] = (4.0, 8.0, 16.0, 32.0)  # lattice spacings in voxels
    texture_scale_prob: float = 0.75  # each scale is used with this probability (at least one)
    texture_max_std: float = 5.0  # each octave's std ~ U(0, max)
    texture_amplitude: float = 0.02
    texture_additive_prob: float = 0.25
    bias_prob: float = 0.98
    bias_strength: tuple[float, float] = (0.0, 0.3)  # std of the log field
    bias_nodes: tuple[int, int] = (2, 5)  # coarse lattice nodes per axis
    gamma_prob: float = 0.5
    gamma_range: tuple[float, float] = (0.5, 2.0)  # log-uniform
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.0, 1.0)  # voxels, per axis
    sharpen_prob: float = 0.25  # only when not blurred
    sharpen_sigma: tuple[float, float] = (0.5, 1.5)
    sharpen_amount: tuple[float, float] = (0.3, 1.5)
    lowres_prob: float = 0.333
    lowres_factor: tuple[float, float] = (2.0, 6.0)
    spikes_prob: float = 0.2
    spikes_count: tuple[int, int] = (1, 3)
    spikes_magnitude: tuple[float, float] = (0.02, 0.15)  # relative to the DC term
    spikes_radius: tuple[float, float] = (0.1, 1.0)  # fraction of Nyquist (max norm)
    gibbs_prob: float = 0.5
    gibbs_keep: tuple[float, float] = (0.35, 0.9)  # fraction of Nyquist kept
    noise_prob: float = 0.5
    noise_std: tuple[float, float] = (0.005, 0.05)  # relative to the image maximum
    rician_prob: float = 0.5

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):  # e.g. from YAML
                v = tuple(v)
                object.__setattr__(self, f.name, v)
            if f.name.endswith("_prob") and not 0.0 <= v <= 1.0:
                raise InputError(f"appearance {f.name} must be in [0, 1], got {v}")
            if isinstance(v, tuple) and len(v) == 2 and f.name != "texture_scales" and not v[0] <= v[1]:
                raise InputError(f"appearance {f.name} must be a (low, high) range, got {v}")
        if not 1 <= self.max_components <= 3:
            raise InputError(f"max_components must be 1, 2 or 3, got {self.max_components}")
        if not self.texture_scales or min(self.texture_scales) < 1:
            raise InputError(f"texture_scales must be >= 1 voxel, got {self.texture_scales}")
        if self.bias_nodes[0] < 2 or self.spikes_count[0] < 1 or self.lowres_factor[0] < 1:
            raise InputError("bias_nodes must be >= 2, spikes_count >= 1 and lowres_factor >= 1")
        if not (0 < self.gibbs_keep[0] and self.gibbs_keep[1] <= 1) or self.gamma_range[0] <= 0:
            raise InputError("gibbs_keep must lie in (0, 1] and gamma_range be positive")

    @classmethod
    def all_on(cls, **overrides: Any) -> AppearanceConfig:
        """Every step on (the worst case for speed and the strongest corruption).

        Sharpening is drawn only for unblurred views, so with blur always on it never happens.
        """
        probs = {f.name: 1.0 for f in dataclasses.fields(cls) if f.name.endswith("_prob")}
        probs.update(background_dark_prob=0.0, texture_additive_prob=0.0, rician_prob=1.0, texture_scale_prob=1.0)
        probs.update(overrides)
        return cls(**probs)

    @classmethod
    def all_off(cls, **overrides: Any) -> AppearanceConfig:
        """Tissue intensities only: every other step off."""
        probs = {f.name: 0.0 for f in dataclasses.fields(cls) if f.name.endswith("_prob")}
        probs.update(texture_scale_prob=1.0)
        probs.update(overrides)
        return cls(**probs)


# ------------------------------------------------------------------------------------ params


@dataclass(frozen=True)
class Texture:
    """Multi-scale smooth noise: octave lattice spacings (voxels), octave stds, amplitude, mode, seed."""

    scales: tuple[float, ...]
    stds: tuple[float, ...]
    amplitude: float
    additive: bool
    seed: int


@dataclass(frozen=True)
class Bias:
    """Smooth multiplicative field: lattice nodes per axis, std of the log field, seed."""

    coarse_shape: tuple[int, int, int]
    strength: float
    seed: int


@dataclass(frozen=True)
class Sharpen:
    """Unsharp masking: blur sigma (voxels) and amount."""

    sigma: float
    amount: float


@dataclass(frozen=True)
class LowRes:
    """Thick slices along ``axis``, ``factor`` voxels thick."""

    axis: int
    factor: float


@dataclass(frozen=True)
class Spikes:
    """k-space spikes: positions as fractions of Nyquist per axis, magnitudes (relative to DC), phases."""

    positions: tuple[tuple[float, float, float], ...]  # fractions of Nyquist per axis, in [-1, 1]
    magnitudes: tuple[float, ...]
    phases: tuple[float, ...]


@dataclass(frozen=True)
class Gibbs:
    """k-space truncation along ``axes`` to ``keep_fraction`` of Nyquist."""

    axes: tuple[int, ...]
    keep_fraction: float


@dataclass(frozen=True)
class Noise:
    """Thermal noise: ``gaussian`` or ``rician``, std relative to the image maximum, seed."""

    kind: str
    std: float  # relative to the image maximum
    seed: int


_STEPS: dict[str, Any] = {
    "texture": Texture,
    "bias": Bias,
    "sharpen": Sharpen,
    "low_res": LowRes,
    "spikes": Spikes,
    "gibbs": Gibbs,
    "noise": Noise,
}


def _tuples(v: Any) -> Any:
    return tuple(_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v


def _lists(v: Any) -> Any:
    return [_lists(x) for x in v] if isinstance(v, (list, tuple)) else v


@dataclass(frozen=True)
class AppearanceParams:
    """Every random choice of one rendering; ``None`` means the step is off.

    Intensities are per label ``l`` and component ``k``: ``means[l][k]``, ``stds[l][k]`` (the method's
    0-255 units) and mixture ``weights[l][k]``; ``seed`` drives the per-voxel draw.
    """

    means: tuple[tuple[float, ...], ...]
    stds: tuple[tuple[float, ...], ...]
    weights: tuple[tuple[float, ...], ...]
    seed: int
    texture: Texture | None = None
    bias: Bias | None = None
    gamma: float | None = None
    blur: tuple[float, float, float] | None = None
    sharpen: Sharpen | None = None
    low_res: LowRes | None = None
    spikes: Spikes | None = None
    gibbs: Gibbs | None = None
    noise: Noise | None = None

    @property
    def n_labels(self) -> int:
        return len(self.means)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (dicts, lists, numbers, strings, booleans, ``None``)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = {k: _lists(x) for k, x in dataclasses.asdict(v).items()} if dataclasses.is_dataclass(v) else _lists(v)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AppearanceParams:
        """Inverse of :meth:`to_dict`; unknown or missing keys are an :class:`InputError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown or not {"means", "stds", "weights", "seed"} <= set(d):
            raise InputError(f"not an appearance parameter set (unknown keys {sorted(unknown)} or missing ones)")
        kw: dict[str, Any] = {}
        for k, v in d.items():
            if k in _STEPS and v is not None:
                try:
                    kw[k] = _STEPS[k](**{a: _tuples(b) for a, b in v.items()})
                except TypeError as exc:
                    raise InputError(f"bad appearance parameters for {k}: {exc}") from None
            else:
                kw[k] = _tuples(v)
        return cls(**kw)


# ---------------------------------------------------------------------------------- sampling


def _u(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def _coin(g: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=g, dtype=torch.float64)) < p


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in ``[lo, hi]`` (inclusive)."""
    return int(torch.randint(int(lo), int(hi) + 1, (), generator=g))


def _seed(g: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (), generator=g))


def sample_appearance(generator: torch.Generator, n_labels: int, cfg: AppearanceConfig | None = None) -> AppearanceParams:
    """Draw one appearance for a label map with ids ``0 .. n_labels - 1``.

    Each step draws the same amount of randomness whether it ends up on or off, so switching one step
    in ``cfg`` does not change the others' draws.

    Args:
        generator: a CPU ``torch.Generator``; the only source of randomness.
        n_labels: number of labels (label 0 is the background).
        cfg: probabilities and ranges (default :class:`AppearanceConfig`).

    Returns:
        The parameters, to be applied with :func:`render`.
    """
    cfg = cfg or AppearanceConfig()
    if n_labels < 1:
        raise InputError(f"a label map needs at least one label, got n_labels={n_labels}")
    g = generator
    kmax = cfg.max_components
    u = torch.rand((n_labels, 3, kmax), generator=g, dtype=torch.float64)
    counts = torch.randint(1, kmax + 1, (n_labels,), generator=g).tolist()
    lo, hi = cfg.mean_range
    means = lo + (hi - lo) * u[:, 0]
    lo, hi = cfg.std_range
    stds = lo + (hi - lo) * u[:, 1]
    w = -torch.log(u[:, 2].clamp_min(1e-12))  # Dirichlet(1, ..., 1) after normalisation
    m_, s_, w_ = [], [], []
    for lab in range(n_labels):
        k = counts[lab]
        ww = w[lab, :k] / w[lab, :k].sum()
        m_.append(tuple(means[lab, :k].tolist()))
        s_.append(tuple(stds[lab, :k].tolist()))
        w_.append(tuple(ww.tolist()))
    if _coin(g, cfg.background_dark_prob):
        m_[0], s_[0], w_[0] = (0.0,), (0.0,), (1.0,)
    seed = _seed(g)

    on = _coin(g, cfg.texture_prob)
    stds_t = [_u(g, 0.0, cfg.texture_max_std) for _ in cfg.texture_scales]
    keep = [_coin(g, cfg.texture_scale_prob) for _ in cfg.texture_scales]
    if not any(keep):
        keep[max(range(len(keep)), key=lambda i: stds_t[i])] = True
    additive = _coin(g, cfg.texture_additive_prob)
    tex_seed = _seed(g)
    texture = None
    if on:
        idx = [i for i, k in enumerate(keep) if k]
        texture = Texture(
            tuple(float(cfg.texture_scales[i]) for i in idx), tuple(stds_t[i] for i in idx),
            cfg.texture_amplitude, additive, tex_seed,
        )  # fmt: skip

    on = _coin(g, cfg.bias_prob)
    coarse = tuple(_randint(g, *cfg.bias_nodes) for _ in range(3))
    bias = Bias(coarse, _u(g, *cfg.bias_strength), _seed(g))  # type: ignore[arg-type]
    bias = bias if on else None

    on = _coin(g, cfg.gamma_prob)
    gamma = math.exp(_u(g, math.log(cfg.gamma_range[0]), math.log(cfg.gamma_range[1])))
    gamma = gamma if on else None

    on = _coin(g, cfg.blur_prob)
    blur = tuple(_u(g, *cfg.blur_sigma) for _ in range(3))
    blur = blur if on else None
    on = _coin(g, cfg.sharpen_prob) and blur is None
    sharp = Sharpen(_u(g, *cfg.sharpen_sigma), _u(g, *cfg.sharpen_amount))
    sharp = sharp if on else None

    on = _coin(g, cfg.lowres_prob)
    low = LowRes(_randint(g, 0, 2), _u(g, *cfg.lowres_factor))
    low = low if on else None

    on = _coin(g, cfg.spikes_prob)
    n = _randint(g, *cfg.spikes_count)
    pos, mags, phases = [], [], []
    for _ in range(cfg.spikes_count[1]):
        d = torch.randn(3, generator=g, dtype=torch.float64)
        d = d / d.abs().max().clamp_min(1e-12)
        pos.append(tuple((d * _u(g, *cfg.spikes_radius)).tolist()))
        mags.append(_u(g, *cfg.spikes_magnitude))
        phases.append(_u(g, -math.pi, math.pi))
    spikes = Spikes(tuple(pos[:n]), tuple(mags[:n]), tuple(phases[:n])) if on else None

    on = _coin(g, cfg.gibbs_prob)
    n_axes = _randint(g, 1, 3)
    axes = tuple(sorted(torch.randperm(3, generator=g)[:n_axes].tolist()))
    gibbs = Gibbs(axes, _u(g, *cfg.gibbs_keep))
    gibbs = gibbs if on else None

    on = _coin(g, cfg.noise_prob)
    kind = "rician" if _coin(g, cfg.rician_prob) else "gaussian"
    noise = Noise(kind, _u(g, *cfg.noise_std), _seed(g))
    noise = noise if on else None

    return AppearanceParams(
        tuple(m_), tuple(s_), tuple(w_), seed, texture, bias, gamma, blur, sharp, low, spikes, gibbs, noise,  # type: ignore[arg-type]
    )


# -------------------------------------------------------------------------------- step functions


def gmm_intensities(
    labels: torch.Tensor,
    means: Sequence[Sequence[float]],
    stds: Sequence[Sequence[float]],
    weights: Sequence[Sequence[float]],
    seed: int,
    scale: float = 1.0,
) -> torch.Tensor:
    """Per-voxel draw from each label's Gaussian mixture.

    Args:
        labels: integer tensor with ids ``0 .. L - 1``.
        means: ``means[l]`` are label ``l``'s component means.
        stds: ``stds[l]`` its component standard deviations.
        weights: ``weights[l]`` its mixture weights (summing to one).
        seed: seed of the per-voxel draws, made on ``labels``' device.
        scale: multiplies means and stds (e.g. ``1 / 255``).

    Returns:
        A float32 tensor of ``labels``' shape.
    """
    n_labels = len(means)
    k = max(len(m) for m in means)
    tab = torch.zeros(3, n_labels, k, dtype=torch.float64)
    for lab in range(n_labels):
        kk = len(means[lab])
        if not len(stds[lab]) == len(weights[lab]) == kk:
            raise InputError(f"label {lab} has {kk} means but {len(stds[lab])} stds and {len(weights[lab])} weights")
        tab[0, lab, :kk] = torch.tensor(means[lab], dtype=torch.float64) * scale
        tab[1, lab, :kk] = torch.tensor(stds[lab], dtype=torch.float64) * scale
        tab[2, lab, :kk] = torch.tensor(weights[lab], dtype=torch.float64)
    tab = tab.float().to(labels.device)
    lab = labels if labels.dtype == torch.int64 else labels.long()
    gen = torch.Generator(device=labels.device).manual_seed(int(seed))
    z = torch.randn(lab.shape, generator=gen, device=labels.device)
    if k == 1:
        idx = lab
    else:
        u = torch.rand(lab.shape, generator=gen, device=labels.device)
        cum = tab[2].cumsum(dim=1)
        idx = lab * k
        for j in range(k - 1):
            idx = idx + (u > torch.take(cum[:, j].contiguous(), lab))
    out = torch.take(tab[1].reshape(-1), idx).mul_(z)
    return out.add_(torch.take(tab[0].reshape(-1), idx))


def apply_gamma(img: torch.Tensor, gamma: float) -> torch.Tensor:
    """Gamma contrast ``m (x / m) ** gamma`` of the non-negative part, ``m`` the volume's maximum.

    Monotonic non-decreasing in ``img``; maps ``[0, m]`` onto itself.
    """
    if not gamma > 0:
        raise InputError(f"gamma must be positive, got {gamma}")
    x = img.float().clamp_min(0)
    m = x.amax(dim=_DIMS, keepdim=True).clamp_min(1e-12)
    return x.div_(m).pow_(float(gamma)).mul_(m)


def normalise(img: torch.Tensor, percentiles: tuple[float, float] = (0.5, 99.5), max_samples: int = 65536) -> torch.Tensor:
    """Clip each volume at robust percentiles and rescale it to ``[0, 1]``.

    Percentiles (nearest rank) are estimated on a fixed strided subsample of at most about
    ``max_samples`` voxels per volume (every voxel for small volumes). A constant volume becomes zeros.

    Args:
        img: ``(..., X, Y, Z)`` image.
        percentiles: lower and upper percentiles, in ``[0, 100]``.
        max_samples: subsample size for the percentile estimate.

    Returns:
        A float32 tensor of ``img``'s shape with values in ``[0, 1]``.
    """
    lo_p, hi_p = percentiles
    if not 0.0 <= lo_p < hi_p <= 100.0:
        raise InputError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    shape = img.shape
    x = img.float().reshape(-1, math.prod(shape[-3:]))
    stride = max(1, x.shape[1] // max_samples) | 1
    sub = x[:, ::stride]
    n = sub.shape[1]
    k_lo = min(n, max(1, math.ceil(lo_p / 100 * n)))
    k_hi = min(n, max(1, math.ceil(hi_p / 100 * n)))
    lo = torch.kthvalue(sub, k_lo, dim=1).values[:, None]
    hi = torch.kthvalue(sub, k_hi, dim=1).values[:, None]
    span = hi - lo
    inv = torch.where(span > 0, 1.0 / span, torch.zeros_like(span))
    return torch.addcmul(-lo * inv, x, inv).clamp_(0.0, 1.0).reshape(shape)


# -------------------------------------------------------------------------------------- render


def _as_batch(labels: torch.Tensor) -> torch.Tensor:
    if labels.ndim == 5 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 4:
        raise InputError(f"render_batch needs labels of shape (B, X, Y, Z), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise InputError(f"labels must be an integer tensor, got {labels.dtype}")
    return labels


def _spike_positions(spikes: Spikes, shape: Sequence[int]) -> list[tuple[int, int, int]]:
    out = []
    for rel in spikes.positions:
        k = tuple(int(round(r * (n // 2))) for r, n in zip(rel, shape))
        out.append(k if any(k) else (0, 0, 1 if shape[2] > 1 else 0))
    return out


def render_batch(
    labels: torch.Tensor, params: Sequence[AppearanceParams], percentiles: tuple[float, float] = (0.5, 99.5)
) -> torch.Tensor:
    """Render ``B`` label maps, each with its own appearance; batched where the steps allow.

    The blur, the k-space steps (one ``rfftn`` and one ``irfftn`` for all volumes that need them)
    and the normalisation run on the whole batch; seeded fields are drawn per volume, so volume ``i``
    is the same as ``render(labels[i], params[i])``.

    Args:
        labels: ``(B, X, Y, Z)`` (or ``(B, 1, X, Y, Z)``) integer label maps, ids ``0 .. L - 1``.
        params: ``B`` parameter sets from :func:`sample_appearance`.
        percentiles: clipping percentiles of the final normalisation.

    Returns:
        ``(B, 1, X, Y, Z)`` float32 images in ``[0, 1]`` on ``labels``' device.
    """
    labels = _as_batch(labels)
    params = list(params)
    if len(params) != labels.shape[0]:
        raise InputError(f"got {len(params)} parameter sets for {labels.shape[0]} label maps")
    shape = tuple(int(s) for s in labels.shape[1:])
    dev = labels.device
    lmin, lmax = torch.aminmax(labels.reshape(labels.shape[0], -1), dim=1)
    for b, p in enumerate(params):
        if int(lmin[b]) < 0 or int(lmax[b]) >= p.n_labels:
            raise InputError(
                f"label ids must be contiguous 0..n_labels-1, got ids in [{int(lmin[b])}, {int(lmax[b])}] "
                f"for {p.n_labels} labels (relabel the map first)"
            )
    xs: list[torch.Tensor] = []
    for b, p in enumerate(params):
        x = gmm_intensities(labels[b], p.means, p.stds, p.weights, p.seed, scale=1.0 / 255.0)
        if p.texture is not None:
            t = p.texture
            tex = perlin_noise(shape, t.scales, t.seed, dev, t.stds).mul_(t.amplitude)
            x = x.add_(tex) if t.additive else x.mul_(tex.add_(1.0).clamp_min_(0.0))
            del tex
        x.clamp_min_(0.0)
        if p.bias is not None:
            x.mul_(bias_field(shape, p.bias.coarse_shape, p.bias.seed, p.bias.strength, dev))
        if p.gamma is not None:
            x = apply_gamma(x, p.gamma)
        xs.append(x)
        del x
    blur = [b for b, p in enumerate(params) if p.blur is not None]
    if blur:
        _batched(xs, blur, lambda x: gaussian_blur(x, [params[b].blur for b in blur]))
    for b, p in enumerate(params):
        if p.sharpen is not None:
            xs[b] = sharpen(xs[b], p.sharpen.sigma, p.sharpen.amount)
        if p.low_res is not None:
            xs[b] = low_resolution(xs[b], p.low_res.axis, p.low_res.factor)
    kspace = [b for b, p in enumerate(params) if p.spikes is not None or p.gibbs is not None]
    if kspace:
        _batched(xs, kspace, lambda x: _kspace(x, [params[b] for b in kspace]))
    for b, p in enumerate(params):
        if p.noise is not None:
            peak = float(xs[b].abs().amax())
            xs[b] = add_noise(xs[b], p.noise.std * peak, p.noise.seed, p.noise.kind)
    out = xs[0][None] if len(xs) == 1 else torch.stack(xs)
    del xs
    return normalise(out, percentiles)[:, None]


def _batched(xs: list[torch.Tensor], idx: list[int], fn: Any) -> None:
    """Replace ``xs[i]`` for ``i`` in ``idx`` by ``fn`` applied to them stacked (no copy for one)."""
    y = fn(xs[idx[0]][None] if len(idx) == 1 else torch.stack([xs[i] for i in idx]))
    for j, i in enumerate(idx):
        xs[i] = y[j]


def _kspace(x: torch.Tensor, params: list[AppearanceParams]) -> torch.Tensor:
    """Spikes and Gibbs truncation of a ``(N, X, Y, Z)`` batch through one ``rfftn`` / ``irfftn``."""
    shape = tuple(x.shape[1:])
    scale = x.abs().mean(dim=_DIMS) * math.prod(shape)
    spec = torch.fft.rfftn(x, dim=_DIMS)
    for i, p in enumerate(params):
        if p.spikes is not None:
            s = float(scale[i])
            vals = [s * m * complex(math.cos(ph), math.sin(ph)) for m, ph in zip(p.spikes.magnitudes, p.spikes.phases)]
            spectrum_spikes_(spec[i], shape, _spike_positions(p.spikes, shape), vals)
        if p.gibbs is not None:
            spectrum_truncate_(spec[i], shape, p.gibbs.axes, p.gibbs.keep_fraction)
    return torch.fft.irfftn(spec, s=shape, dim=_DIMS)


def render(labels: torch.Tensor, params: AppearanceParams, percentiles: tuple[float, float] = (0.5, 99.5)) -> torch.Tensor:
    """Render one label map with one appearance.

    Args:
        labels: ``(X, Y, Z)`` (or ``(1, X, Y, Z)``) integer label map with ids ``0 .. L - 1``.
        params: from :func:`sample_appearance` (or :meth:`AppearanceParams.from_dict`).
        percentiles: clipping percentiles of the final normalisation.

    Returns:
        A ``(1, X, Y, Z)`` float32 image in ``[0, 1]`` on ``labels``' device; deterministic given
        ``params`` and the device. The smooth fields (texture, bias) are drawn on the CPU and are the
        same on every device; the per-voxel draws (mixture samples, noise) use the device's own
        generator, so a CPU and a CUDA rendering of the same parameters differ in those.
    """
    if labels.ndim == 4 and labels.shape[0] == 1:
        labels = labels[0]
    if labels.ndim != 3:
        raise InputError(f"render needs a label map of shape (X, Y, Z), got {tuple(labels.shape)}")
    return render_batch(labels[None], [params], percentiles)[0]
