"""Augmentation for few-shot finetuning: the data engine's spatial transforms, applied to patches of
real images, plus random appearance changes of the kind a scanner makes.

Sample, then apply: :func:`sample_patch_augment` draws a frozen :class:`PatchAugment` record from an
explicit generator; :func:`extract_patch` applies it deterministically. The spatial part reuses
:mod:`synthvox.synth.spatial` (random affine + elastic deformation, one grid for the image (linear)
and its labels (nearest)); the grid is built at patch size and placed around the patch centre inside
the whole volume, so a rotated or zoomed patch sees real context instead of padding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from synthvox.synth.appearance import apply_gamma
from synthvox.synth.artefacts import add_noise, gaussian_blur, low_resolution
from synthvox.synth.fields import bias_field
from synthvox.synth.spatial import (
    AffineParams,
    AffineRange,
    ElasticParams,
    ElasticRange,
    sample_affine,
    sample_elastic,
    sampling_grid,
    warp_image,
    warp_labels,
)


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the finetuning augmentation.

    Attributes:
        p_affine: probability of a random affine (scale, rotation, shear).
        scale: scale range per axis.
        max_rotation_deg: rotation angle range (about a random axis).
        shear: shear range.
        flip: random mirroring of each axis (off by default: it breaks labels that tell left from right).
        p_elastic: probability of a smooth elastic deformation.
        elastic_std: largest standard deviation of the elastic displacement, in voxels.
        p_gamma: probability of a gamma change ``x ** exp(N(0, gamma_log_std))``.
        gamma_log_std: spread of the gamma's logarithm.
        p_contrast: probability of a contrast/brightness jitter.
        contrast: multiplicative contrast range; brightness shifts by up to ``brightness``.
        brightness: additive shift range (intensities are in about [0, 1]).
        p_bias: probability of a smooth multiplicative bias field.
        bias_strength: largest standard deviation of the log bias field.
        p_blur: probability of a Gaussian blur.
        blur_sigma: largest blur sigma, in voxels.
        p_lowres: probability of simulating a thick-slice acquisition along one axis.
        lowres_factor: largest slice-thickness factor.
        p_noise: probability of additive Gaussian noise.
        noise_std: largest noise standard deviation.
        p_invert: probability of inverting the contrast (``1 - x``), for modality robustness.
    """

    p_affine: float = 0.8
    scale: tuple[float, float] = (0.8, 1.25)
    max_rotation_deg: float = 20.0
    shear: float = 0.05
    flip: bool = False
    p_elastic: float = 0.3
    elastic_std: float = 2.0
    p_gamma: float = 0.5
    gamma_log_std: float = 0.3
    p_contrast: float = 0.5
    contrast: tuple[float, float] = (0.75, 1.25)
    brightness: float = 0.1
    p_bias: float = 0.5
    bias_strength: float = 0.3
    p_blur: float = 0.2
    blur_sigma: float = 1.0
    p_lowres: float = 0.2
    lowres_factor: float = 3.0
    p_noise: float = 0.5
    noise_std: float = 0.05
    p_invert: float = 0.0


@dataclass(frozen=True)
class PatchAugment:
    """One patch's augmentation, as drawn by :func:`sample_patch_augment` (``None``: step off)."""

    affine: AffineParams | None
    elastic: ElasticParams | None
    gamma: float | None
    contrast: tuple[float, float] | None  # (factor, shift)
    bias: tuple[int, float] | None  # (seed, strength)
    blur: float | None
    lowres: tuple[int, float] | None  # (axis, factor)
    noise: tuple[int, float] | None  # (seed, std)
    invert: bool


def _u(g: torch.Generator) -> float:
    return float(torch.rand((), generator=g, dtype=torch.float64))


def sample_patch_augment(generator: torch.Generator, cfg: AugmentConfig) -> PatchAugment:
    """Draw one :class:`PatchAugment`. Always consumes the same amount of random numbers."""
    g = generator
    aff = sample_affine(
        g,
        AffineRange(
            scale=tuple(cfg.scale),
            max_rotation_deg=cfg.max_rotation_deg,
            shear=cfg.shear,
            flip_prob=0.5 if cfg.flip else 0.0,
            translation=0.0,
        ),
    )
    use_aff = _u(g) < cfg.p_affine
    if not use_aff and cfg.flip:  # keep the flips even without the rest of the affine
        aff = AffineParams(flip=aff.flip)
        use_aff = any(aff.flip)
    ela = sample_elastic(g, ElasticRange(control_points=(4, 4, 4), max_std=cfg.elastic_std))
    use_ela = _u(g) < cfg.p_elastic
    u = [_u(g) for _ in range(16)]
    seeds = torch.randint(0, 2**62, (2,), generator=g).tolist()
    gamma = math.exp(cfg.gamma_log_std * math.sqrt(-2 * math.log(max(u[1], 1e-12))) * math.cos(2 * math.pi * u[2]))
    lo, hi = cfg.contrast
    return PatchAugment(
        affine=aff if use_aff else None,
        elastic=ela if use_ela and ela.std > 0 else None,
        gamma=gamma if u[0] < cfg.p_gamma else None,
        contrast=(lo + (hi - lo) * u[4], cfg.brightness * (2 * u[5] - 1)) if u[3] < cfg.p_contrast else None,
        bias=(int(seeds[0]), cfg.bias_strength * u[7]) if u[6] < cfg.p_bias else None,
        blur=cfg.blur_sigma * (0.25 + 0.75 * u[9]) if u[8] < cfg.p_blur else None,
        lowres=(int(3 * u[11]) % 3, 1.5 + (cfg.lowres_factor - 1.5) * u[12]) if u[10] < cfg.p_lowres else None,
        noise=(int(seeds[1]), cfg.noise_std * u[14]) if u[13] < cfg.p_noise else None,
        invert=u[15] < cfg.p_invert,
    )


def patch_grid(
    volume_shape: Sequence[int],
    centre: torch.Tensor,
    patch_size: Sequence[int],
    aug: PatchAugment,
    device: torch.device,
) -> torch.Tensor:
    """``grid_sample`` grid ``(1, *patch, 3)`` sampling a transformed patch around ``centre`` of a volume.

    :func:`synthvox.synth.spatial.sampling_grid` gives the transform at patch size in the patch's
    normalised coordinates; they are rescaled into voxels around ``centre`` and renormalised to the
    whole volume, so the patch samples real neighbouring tissue wherever it rotates or zooms to.
    """
    grid = sampling_grid(patch_size, aug.affine, aug.elastic, batch=1, device=device)  # (1, *p, 3) zyx
    half_p = torch.tensor([(p - 1) / 2 for p in patch_size], dtype=torch.float32, device=device).flip(0)
    c = centre.to(device=device, dtype=torch.float32).flip(0)
    size = torch.tensor([max(s - 1, 1) for s in volume_shape], dtype=torch.float32, device=device).flip(0)
    vox = grid * half_p + c
    return 2.0 * vox / size - 1.0


def apply_appearance(image: torch.Tensor, aug: PatchAugment) -> torch.Tensor:
    """Apply the appearance part of ``aug`` to a ``(1, X, Y, Z)`` image with intensities in about [0, 1].

    Bias field, gamma, blur, thick slices and noise are the data engine's own steps
    (:mod:`synthvox.synth.fields`, :mod:`synthvox.synth.appearance`, :mod:`synthvox.synth.artefacts`).
    """
    x = image.float().clamp(min=0.0)
    shape = tuple(x.shape[1:])
    if aug.bias is not None:
        seed, strength = aug.bias
        x = x * bias_field(shape, (4, 4, 4), seed, strength, device=x.device)
    if aug.gamma is not None:
        x = apply_gamma(x, aug.gamma)
    if aug.blur is not None:
        x = gaussian_blur(x, (aug.blur,) * 3)
    if aug.lowres is not None:
        axis, factor = aug.lowres
        x = low_resolution(x, axis, factor)
    if aug.contrast is not None:
        factor, shift = aug.contrast
        m = x.mean()
        x = (x - m) * factor + m + shift
    if aug.noise is not None:
        seed, std = aug.noise
        x = add_noise(x, std, seed)
    if aug.invert:
        x = 1.0 - x
    return x


def extract_patch(
    image: torch.Tensor,
    classes: torch.Tensor,
    centre: torch.Tensor,
    patch_size: Sequence[int],
    aug: PatchAugment,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The augmented patch around ``centre``: image ``(1, *patch)`` float and classes ``(1, *patch)``.

    Outside the volume the image is 0 (normalised background) and the classes are 0.
    """
    grid = patch_grid(image.shape[1:], centre, patch_size, aug, device)
    img = warp_image(image[None].to(device), grid, padding="zeros")[0]
    lab = warp_labels(classes[None].to(device), grid)[0]
    return apply_appearance(img, aug), lab


def augment_batch(
    images: Sequence[torch.Tensor],
    classes: Sequence[torch.Tensor],
    centres: Sequence[torch.Tensor],
    patch_size: Sequence[int],
    cfg: AugmentConfig,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw and apply one augmentation per patch; returns ``(B, 1, *patch)`` images and classes."""
    xs, ys = [], []
    for img, cls, c in zip(images, classes, centres):
        aug = sample_patch_augment(generator, cfg)
        x, y = extract_patch(img, cls, c, patch_size, aug, device)
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)
