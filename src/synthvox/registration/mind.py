"""MIND-SSC: the modality independent neighbourhood descriptor with self-similarity context.

Heinrich et al., "Towards realtime multimodal fusion for image-guided interventions using
self-similarity context", MICCAI 2013. Twelve channels per voxel, each comparing two patches of the
six-neighbourhood that lie :math:`\\sqrt{2}` apart (a pair of neighbours of the centre, not the centre
itself), normalised by the local variance estimate. Follows the formulation of the ConvexAdam reference
implementation (Siebert, Hansen, Heinrich 2021), written here for any device and dtype.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from synthvox.registration.convex import box3

#: The six neighbours of the centre of a 3x3x3 kernel, as (x, y, z) offsets into it.
_SIX = torch.tensor([[0, 1, 1], [1, 1, 0], [1, 0, 1], [1, 1, 2], [2, 1, 1], [1, 2, 1]])


@functools.lru_cache(maxsize=1)
def _pair_offsets() -> tuple[torch.Tensor, torch.Tensor]:
    """The first and second neighbour (x, y, z offsets into a 3x3x3 kernel) of each of the 12 pairs."""
    diff = _SIX[:, None, :] - _SIX[None, :, :]
    dist2 = (diff**2).sum(-1)
    i, j = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    pairs = (i > j) & (dist2 == 2)
    return _SIX[i[pairs]], _SIX[j[pairs]]


#: Channel order of the reference C++ implementation.
_ORDER = (6, 8, 1, 11, 2, 10, 0, 7, 9, 4, 5, 3)


#: Voxels per slab of :func:`_mind_by_slabs` on the CPU: the dozen temporaries of a slab stay in the
#: cache (whole volumes of 12 channels made MIND memory-bound, three times slower at 2 mm on a brain).
SLAB_VOXELS = 1 << 16


def _mind_by_slabs(x: torch.Tensor, dilation: int, slab: int) -> torch.Tensor:
    """MIND-SSC (radius 1) of a ``(X, Y, Z)`` image, ``slab`` slices along X at a time: each slab's
    patch distances, minus their minimum, and their mean (the local variance) first; then, with the
    image-wide mean of that variance, ``exp(-d / var)`` in place. The same values as the whole-volume
    formulation (replicated borders of the image and of the patch distances), in the output's
    channel order from the start."""
    nx, ny, nz = (int(v) for v in x.shape)
    d = dilation
    padded = F.pad(x[None, None], (d,) * 6, mode="replicate")[0, 0]
    first, second = _pair_offsets()
    pairs = [(first[k] * d, second[k] * d) for k in _ORDER]
    out = x.new_empty(12, nx, ny, nz)
    var = x.new_empty(nx, ny, nz)
    for x0 in range(0, nx, slab):
        x1 = min(nx, x0 + slab)
        lo, hi = max(0, x0 - 1), min(nx, x1 + 1)  # the rows of patch distances the box filter needs
        diff = x.new_empty(12, hi - lo, ny, nz)
        for c, (a, b) in enumerate(pairs):
            torch.sub(padded[lo + int(a[0]) : hi + int(a[0]), int(a[1]) : int(a[1]) + ny, int(a[2]) : int(a[2]) + nz],
                      padded[lo + int(b[0]) : hi + int(b[0]), int(b[1]) : int(b[1]) + ny, int(b[2]) : int(b[2]) + nz],
                      out=diff[c])
        diff.square_()
        s = torch.cat([diff[..., :1], diff, diff[..., -1:]], -1)
        s = s[..., :-2] + s[..., 1:-1] + s[..., 2:]
        s = torch.cat([s[:, :, :1], s, s[:, :, -1:]], 2)
        s = s[:, :, :-2] + s[:, :, 1:-1] + s[:, :, 2:]
        if x0 == 0:  # replicated patch distances beyond the image's first and last slices
            s = torch.cat([s[:, :1], s], 1)
        if x1 == nx:
            s = torch.cat([s, s[:, -1:]], 1)
        ssd = (s[:, :-2] + s[:, 1:-1]).add_(s[:, 2:]).mul_(1.0 / 27.0)
        ssd.sub_(ssd.min(dim=0, keepdim=True).values)
        torch.mean(ssd, dim=0, out=var[x0:x1])
        out[:, x0:x1] = ssd
    mean_var = var.mean()
    lo_var = torch.clamp(mean_var * 1e-3, min=torch.finfo(x.dtype).tiny)
    neg_inv = torch.maximum(torch.minimum(var, mean_var * 1e3), lo_var).reciprocal_().neg_()
    for x0 in range(0, nx, slab):
        out[:, x0 : x0 + slab].mul_(neg_inv[x0 : x0 + slab]).exp_()
    return out


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptors of a 3D image.

    Args:
        image: ``(X, Y, Z)``, ``(1, X, Y, Z)`` or ``(N, 1, X, Y, Z)`` tensor (any float dtype, any device).
        radius: half-width of the box filter that sums patch distances (patch size ``2*radius+1``).
        dilation: distance in voxels between the centre and its six neighbours.

    Returns:
        ``(12, X, Y, Z)`` (or ``(N, 12, X, Y, Z)`` for a batched input) descriptors in ``(0, 1]``.
    """
    squeeze = image.ndim < 5
    if image.ndim == 3:
        image = image[None, None]
    elif image.ndim == 4:
        image = image[None]
    if image.shape[1] != 1:
        raise ValueError(f"mind_ssc takes single-channel images, got {tuple(image.shape)}")
    x = image.float() if not torch.is_floating_point(image) else image
    if squeeze and radius == 1 and x.device.type == "cpu":
        ny, nz = int(x.shape[3]), int(x.shape[4])
        return _mind_by_slabs(x[0, 0], dilation, max(1, SLAB_VOXELS // max(ny * nz, 1)))
    padded = F.pad(x, (dilation,) * 6, mode="replicate")
    # each one-hot kernel of the reference's dilated convolution picks one shifted copy: slices instead
    # (five times faster on the CPU, the same values)
    nx, ny, nz = x.shape[2:]

    def shifted(offset: torch.Tensor) -> torch.Tensor:
        i, j, k = (int(v) * dilation for v in offset)
        return padded[:, 0, i : i + nx, j : j + ny, k : k + nz]

    diff = torch.stack([shifted(a) - shifted(b) for a, b in zip(*_pair_offsets())], dim=1)
    if radius == 1:
        ssd = box3(diff.pow(2).flatten(0, 1)).view_as(diff)
    else:
        ssd = F.avg_pool3d(F.pad(diff**2, (radius,) * 6, mode="replicate"), 2 * radius + 1, stride=1)
    mind = ssd - ssd.min(dim=1, keepdim=True).values
    var = mind.mean(dim=1, keepdim=True)
    mean_var = var.mean()
    # Clamp the local variance into a band around its image-wide mean (as the reference does); a
    # constant image has zero variance everywhere and gets all-ones descriptors.
    lo = torch.clamp(mean_var * 1e-3, min=torch.finfo(x.dtype).tiny)
    var = torch.maximum(torch.minimum(var, mean_var * 1e3), lo)
    mind = torch.exp(-mind / var)
    mind = mind[:, list(_ORDER)]
    return mind[0] if squeeze else mind
