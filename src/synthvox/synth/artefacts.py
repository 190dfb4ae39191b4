"""Acquisition artefacts: blur and sharpening, thick slices with partial volume, k-space spikes,
Gibbs ringing and thermal noise.

Each function takes an image of shape ``(..., X, Y, Z)`` (any leading dimensions: ``(X, Y, Z)``,
``(C, X, Y, Z)`` or ``(B, C, X, Y, Z)``) and explicit parameters, and returns a new float tensor of
the same shape on the same device. The k-space steps also exist as in-place operations on an
``rfftn`` spectrum (:func:`spectrum_spikes_`, :func:`spectrum_truncate_`) so that several of them
share one forward and one inverse FFT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from synthvox.errors import InputError

__all__ = [
    "add_noise",
    "gaussian_blur",
    "gaussian_weights",
    "gibbs_ringing",
    "kspace_spikes",
    "low_resolution",
    "low_resolution_matrix",
    "sharpen",
    "spectrum_spikes_",
    "spectrum_truncate_",
]

_DIMS = (-3, -2, -1)


def _spatial(img: torch.Tensor) -> tuple[int, int, int]:
    if img.ndim < 3:
        raise InputError(f"expected a tensor of shape (..., X, Y, Z), got shape {tuple(img.shape)}")
    return tuple(int(s) for s in img.shape[-3:])  # type: ignore[return-value]


def _check_axis(axis: int) -> int:
    axis = int(axis)
    if axis not in (0, 1, 2):
        raise InputError(f"spatial axis must be 0, 1 or 2, got {axis}")
    return axis


# ----------------------------------------------------------------------------------------- blur


def gaussian_weights(sigmas: torch.Tensor, truncate: float = 3.0) -> torch.Tensor:
    """Normalised 1D Gaussian kernels, one row per sigma, all of the longest kernel's length.

    Args:
        sigmas: ``(N,)`` standard deviations in voxels (0 gives the identity kernel).
        truncate: kernel radius in standard deviations.

    Returns:
        ``(N, 2r + 1)`` float32 weights with ``r = ceil(truncate * max(sigmas))``.
    """
    sigmas = sigmas.float().reshape(-1)
    radius = int(math.ceil(truncate * float(sigmas.max()))) if sigmas.numel() else 0
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=sigmas.device)
    s = sigmas.clamp_min(1e-6)[:, None]
    w = torch.exp(-0.5 * (x[None] / s) ** 2)
    w = torch.where(torch.abs(x[None]) <= truncate * s + 0.5, w, torch.zeros_like(w))
    return w / w.sum(dim=1, keepdim=True)


def _conv_axis(x: torch.Tensor, axis: int, weights: torch.Tensor) -> torch.Tensor:
    """Convolve ``x`` ``(N, X, Y, Z)`` along spatial ``axis`` with per-volume ``weights`` ``(N, K)``.

    Edges are replicated. Shifted multiply-adds: K passes over memory, no im2col, no conv kernels.
    """
    k = weights.shape[1]
    r = k // 2
    dim = axis + 1
    n = x.shape[dim]
    if r == 0:
        return x * weights[:, 0].view(-1, 1, 1, 1)
    first, last = x.narrow(dim, 0, 1), x.narrow(dim, n - 1, 1)
    reps = [1, 1, 1, 1]
    reps[dim] = r
    padded = torch.cat([first.repeat(reps), x, last.repeat(reps)], dim=dim)
    w = weights.view(-1, k, 1, 1, 1)
    out = padded.narrow(dim, 0, n) * w[:, 0]
    for i in range(1, k):
        out.addcmul_(padded.narrow(dim, i, n), w[:, i])
    return out


def _per_volume(img: torch.Tensor, values: Sequence | torch.Tensor, width: int, what: str) -> torch.Tensor:
    """``values`` as an ``(N, width)`` tensor: one row for all volumes, or one row per volume."""
    n = int(math.prod(img.shape[:-3]))
    v = torch.as_tensor(values, dtype=torch.float32, device=img.device)
    if v.ndim == 1:
        v = v[None].expand(n, -1)
    if v.shape != (n, width):
        raise InputError(f"{what} must have {width} values, or {width} per volume ({n} volumes), got shape {tuple(v.shape)}")
    return v


def gaussian_blur(img: torch.Tensor, sigmas: Sequence[float] | Sequence[Sequence[float]] | torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a different sigma (in voxels) along each axis.

    Args:
        img: ``(..., X, Y, Z)`` image.
        sigmas: three sigmas ``(sx, sy, sz)`` for every volume, or ``(N, 3)`` sigmas, one row per
            volume where ``N`` is the product of the leading dimensions. Axes whose sigmas are all
            below 0.1 voxel are left untouched (such a kernel is the identity in float32).

    Returns:
        The blurred image, same shape; edges are replicated.
    """
    shape = _spatial(img)
    s = _per_volume(img, sigmas, 3, "sigmas")
    if bool((s < 0).any()):
        raise InputError("blur sigmas must be non-negative")
    x = img.reshape(-1, *shape).float()
    out = x
    for axis in range(3):
        if float(s[:, axis].max()) < 0.1:  # the kernel is the identity to within 1e-21
            continue
        out = _conv_axis(out, axis, gaussian_weights(s[:, axis]))
    return (out.clone() if out is x else out).reshape(img.shape)


def sharpen(img: torch.Tensor, sigma: float, amount: float) -> torch.Tensor:
    """Unsharp masking: ``img + amount * (img - blur(img, sigma))``."""
    blurred = gaussian_blur(img, (sigma, sigma, sigma))
    return torch.lerp(blurred, img.float(), 1.0 + float(amount))


# ------------------------------------------------------------------------------ low resolution


def _along(x: torch.Tensor, axis: int, mat: torch.Tensor) -> torch.Tensor:
    """Apply ``mat`` ``(m, n)`` along spatial ``axis`` of ``x`` ``(N, X, Y, Z)``: one matrix product, no copies."""
    nb, nx, ny, nz = x.shape
    if axis == 0:
        return torch.matmul(mat, x.reshape(nb, nx, ny * nz)).reshape(nb, -1, ny, nz)
    if axis == 1:
        return torch.matmul(mat, x)
    return torch.matmul(x, mat.t())


def low_resolution_matrix(n: int, factor: float, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The two 1D operators of :func:`low_resolution`: slab averaging ``(m, n)`` and interpolation ``(n, m)``.

    The ``m = round(n / factor)`` slabs tile the axis exactly, each ``n / m`` voxels thick; a voxel
    cut by a slab boundary contributes to both slabs in proportion to its overlap (box slice profile,
    so a thin structure's total signal is kept). Interpolation back is linear
    (``interpolate(..., align_corners=False)`` applied to an identity matrix).
    """
    m = max(1, int(round(n / float(factor))))
    thick = n / m
    edges = torch.arange(m + 1, dtype=torch.float64) * thick
    v = torch.arange(n, dtype=torch.float64)
    overlap = torch.minimum(v[None] + 1, edges[1:, None]) - torch.maximum(v[None], edges[:-1, None])
    down = (overlap.clamp_min(0) / thick).float()  # (m, n), rows sum to one
    up = F.interpolate(torch.eye(m)[None], size=n, mode="linear", align_corners=False)[0].t().contiguous()  # (n, m)
    return down.to(device), up.to(device)


def low_resolution(img: torch.Tensor, axis: int, factor: float) -> torch.Tensor:
    """Simulate thick slices along ``axis``: partial-volume averaging, then linear interpolation back.

    The image is averaged over ``round(n / factor)`` slabs about ``factor`` voxels thick (box slice
    profile, see :func:`low_resolution_matrix`) and linearly interpolated back to ``n`` slices, which
    removes the frequencies above the thick slices' Nyquist limit along ``axis`` only. Two small
    matrix products along the axis; the cost falls with the factor.

    Args:
        img: ``(..., X, Y, Z)`` image.
        axis: spatial axis (0, 1 or 2) of the thick slices.
        factor: slice thickness in voxels (>= 1).

    Returns:
        The degraded image, same shape.
    """
    shape = _spatial(img)
    axis = _check_axis(axis)
    if not factor >= 1.0:
        raise InputError(f"low-resolution factor must be >= 1, got {factor}")
    n = shape[axis]
    if int(round(n / float(factor))) >= n:
        return img.float().clone()
    down, up = low_resolution_matrix(n, factor, img.device)
    x = img.float().reshape(-1, *shape)
    return _along(_along(x, axis, down), axis, up).reshape(img.shape)


# ------------------------------------------------------------------------------------- k-space


def _freq_range(n: int, k: int, axis: int) -> None:
    if abs(k) > n // 2:
        raise InputError(f"k-space position {k} is outside [-{n // 2}, {n // 2}] along axis {axis}")


def spectrum_spikes_(
    spec: torch.Tensor,
    shape: Sequence[int],
    positions: Sequence[Sequence[int]],
    values: Sequence[complex],
) -> torch.Tensor:
    """Add ``values`` at signed frequencies ``positions`` of one volume's ``rfftn`` spectrum, in place.

    The Hermitian partner is handled: a spike at ``k`` is also a spike at ``-k`` with the
    conjugate value, so the image stays real and shows a plane wave ``2 |v| / N cos(2 pi k.x + phi)``.

    Args:
        spec: ``(X, Y, Z // 2 + 1)`` complex spectrum of a real ``(X, Y, Z)`` volume.
        shape: the volume's spatial shape ``(X, Y, Z)``.
        positions: integer signed frequencies ``(kx, ky, kz)``, each ``|k_i| <= n_i // 2``.
        values: complex amplitude of each spike.

    Returns:
        ``spec``.
    """
    nx, ny, nz = (int(s) for s in shape)
    for pos, v in zip(positions, values):
        kx, ky, kz = (int(p) for p in pos)
        for a, (n, k) in enumerate(zip((nx, ny, nz), (kx, ky, kz))):
            _freq_range(n, k, a)
        v = complex(v)
        if kz < 0:
            kx, ky, kz, v = -kx, -ky, -kz, v.conjugate()
        ix, iy = kx % nx, ky % ny
        mx, my = (-kx) % nx, (-ky) % ny
        on_edge = kz == 0 or (nz % 2 == 0 and kz == nz // 2)
        if on_edge and (ix, iy) == (mx, my):  # self-conjugate frequency: only the real part survives
            spec[ix, iy, kz] += v.real
        elif on_edge:  # the partner lies in the stored half-space too
            spec[ix, iy, kz] += v
            spec[mx, my, kz] += v.conjugate()
        else:
            spec[ix, iy, kz] += v
    return spec


def spectrum_truncate_(spec: torch.Tensor, shape: Sequence[int], axes: Sequence[int], keep_fraction: float) -> torch.Tensor:
    """Zero the frequencies above ``keep_fraction`` of Nyquist along ``axes``, in place (Gibbs ringing).

    Args:
        spec: ``(..., X, Y, Z // 2 + 1)`` complex ``rfftn`` spectrum over the last three dimensions.
        shape: spatial shape ``(X, Y, Z)`` of the real volume.
        axes: spatial axes (0, 1, 2) to truncate.
        keep_fraction: fraction of the frequencies kept, in ``(0, 1]``.

    Returns:
        ``spec``.
    """
    if not 0.0 < keep_fraction <= 1.0:
        raise InputError(f"Gibbs keep fraction must be in (0, 1], got {keep_fraction}")
    for axis in axes:
        axis = _check_axis(axis)
        n = int(shape[axis])
        cut = max(1, int(math.floor(keep_fraction * (n // 2))))
        dim = spec.ndim - 3 + axis
        if axis == 2:
            stored = spec.shape[dim]
            if cut + 1 < stored:
                spec.narrow(dim, cut + 1, stored - cut - 1).zero_()
        elif n - 2 * cut - 1 > 0:
            spec.narrow(dim, cut + 1, n - 2 * cut - 1).zero_()
    return spec


def kspace_spikes(
    img: torch.Tensor,
    positions: Sequence[Sequence[int]],
    magnitudes: float | Sequence[float],
    phases: Sequence[float] | None = None,
) -> torch.Tensor:
    """Add k-space spikes (a few high-magnitude k-space points): stripes / herringbone in the image.

    A spike of magnitude ``m`` at frequency ``k`` adds the plane wave
    ``2 m mean(|img|) cos(2 pi k.x / n + phase)``, i.e. ``m`` is relative to the image's DC term.

    Args:
        img: ``(..., X, Y, Z)`` image; every volume gets the same spikes.
        positions: integer signed frequencies ``(kx, ky, kz)``, ``|k_i| <= n_i // 2``.
        magnitudes: one magnitude for all spikes or one per spike.
        phases: phase of each spike in radians (default 0).

    Returns:
        The corrupted image, same shape.
    """
    shape = _spatial(img)
    positions = [tuple(int(v) for v in p) for p in positions]
    mags = [float(magnitudes)] * len(positions) if isinstance(magnitudes, (int, float)) else [float(m) for m in magnitudes]
    phases = [0.0] * len(positions) if phases is None else [float(p) for p in phases]
    if not (len(mags) == len(phases) == len(positions)) or any(len(p) != 3 for p in positions):
        raise InputError("kspace_spikes needs one (kx, ky, kz) position, magnitude and phase per spike")
    x = img.float().reshape(-1, *shape)
    spec = torch.fft.rfftn(x, dim=_DIMS)
    scale = x.abs().mean(dim=_DIMS) * math.prod(shape)
    for b in range(x.shape[0]):
        s = float(scale[b])
        vals = [s * m * complex(math.cos(p), math.sin(p)) for m, p in zip(mags, phases)]
        spectrum_spikes_(spec[b], shape, positions, vals)
    return torch.fft.irfftn(spec, s=shape, dim=_DIMS).reshape(img.shape)


def gibbs_ringing(img: torch.Tensor, axes: int | Sequence[int], keep_fraction: float) -> torch.Tensor:
    """Gibbs ringing: truncate k-space to ``keep_fraction`` of Nyquist along ``axes``.

    Args:
        img: ``(..., X, Y, Z)`` image.
        axes: one spatial axis or several.
        keep_fraction: fraction of the frequencies kept along each axis, in ``(0, 1]``.

    Returns:
        The ringing image, same shape.
    """
    shape = _spatial(img)
    axes = [axes] if isinstance(axes, int) else list(axes)
    spec = torch.fft.rfftn(img.float(), dim=_DIMS)
    spectrum_truncate_(spec, shape, axes, keep_fraction)
    return torch.fft.irfftn(spec, s=shape, dim=_DIMS)


# --------------------------------------------------------------------------------------- noise


def add_noise(img: torch.Tensor, std: float, seed: int, kind: str = "gaussian") -> torch.Tensor:
    """Add thermal noise of standard deviation ``std``.

    ``gaussian`` adds ``N(0, std^2)``; ``rician`` returns the magnitude
    ``sqrt((img + n1)^2 + n2^2)`` with ``n1, n2 ~ N(0, std^2)`` (a magnitude MR image), whose
    standard deviation is ``std`` where the signal is well above the noise.

    Args:
        img: ``(..., X, Y, Z)`` image.
        std: noise standard deviation, in the image's units.
        seed: seed of the noise, drawn on ``img``'s device.
        kind: ``gaussian`` or ``rician``.

    Returns:
        The noisy image, same shape.
    """
    if kind not in ("gaussian", "rician"):
        raise InputError(f"noise kind must be 'gaussian' or 'rician', got {kind!r}")
    if std < 0:
        raise InputError(f"noise std must be non-negative, got {std}")
    gen = torch.Generator(device=img.device).manual_seed(int(seed))
    out = torch.randn(img.shape, generator=gen, device=img.device).mul_(float(std)).add_(img)
    if kind == "rician":
        imag = torch.randn(img.shape, generator=gen, device=img.device).mul_(float(std))
        out.square_().addcmul_(imag, imag).sqrt_()
    return out
