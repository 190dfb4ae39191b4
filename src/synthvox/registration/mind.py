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
