"""Fields of view: which features to compare near an image's edge, where MOVING covers a grid, and
whether two fields of view meet at all.

Features near the edge of a field of view see padding (MIND's neighbourhood, the network's receptive
field), so they are not compared within :data:`FOV_MARGIN` voxels of it.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from synthvox.registration.grids import resample_through
from synthvox.volume import Volume, affine_points

#: Features within this many voxels of a field of view's edge are not compared (MIND's reach). The
#: fixed side of a pooled fit keeps one more pooled cell away from its edge, so that at the start no
#: fixed point sees the moving edge (whose penalty would otherwise pull the fit inwards).
FOV_MARGIN = 3


def edge_margins(shape: tuple[int, ...], margin: int, extra: int = 0) -> list[int]:
    """Per-axis margins for :func:`interior`: ``margin`` (plus ``extra``), each part at most a sixth of
    the axis, so a thin slab keeps its middle and the fixed side's margin stays the larger one."""
    return [min(int(margin), int(n) // 6) + min(int(extra), int(n) // 6) for n in shape]


def interior(mask: torch.Tensor, margin: int | list[int]) -> torch.Tensor:
    """``(X, Y, Z)`` weights in [0, 1] set to zero within ``margin`` voxels (per axis, or the same for
    all) of zero weight or of the border.

    Features near the edge of a field of view see padding (MIND's neighbourhood, the network's
    receptive field), so the two images' features there differ even where the images agree.
    """
    m = mask.float()
    ms = [int(margin)] * 3 if isinstance(margin, int) else [int(v) for v in margin]
    if max(ms) <= 0:
        return m
    pad = (ms[2], ms[2], ms[1], ms[1], ms[0], ms[0])
    outside = 1.0 - F.pad(m[None, None], pad, value=0.0)
    # a box maximum is separable: one axis at a time (a 3D kernel of 13^3 is a hundred times slower)
    for axis, v in enumerate(ms):
        kernel = [1, 1, 1]
        kernel[axis] = 2 * v + 1
        outside = F.max_pool3d(outside, tuple(kernel), stride=1)
    eroded = 1.0 - outside[0, 0]
    return torch.minimum(m, eroded)


def inner_box(shape: tuple[int, ...], margin: int | list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """``interior`` of an all-ones grid: ``(X, Y, Z)`` ones except within ``margin`` voxels (per axis,
    or the same for all) of the border, made from three 1D masks."""
    ms = [int(margin)] * 3 if isinstance(margin, int) else [int(v) for v in margin]
    out = torch.ones(tuple(int(n) for n in shape), device=device)
    for k, (n, v) in enumerate(zip(shape, ms)):
        i = torch.arange(int(n), device=device)
        view = [1, 1, 1]
        view[k] = int(n)
        out.mul_(((i >= v) & (i <= int(n) - 1 - v)).float().view(view))
    return out


def fov_weight(moving: Volume, world: np.ndarray, shape: tuple[int, int, int], affine: np.ndarray,
               margin: int | list[int]) -> torch.Tensor:
    """Where MOVING's field of view covers a grid (through ``world``), ``margin`` voxels inside its edge
    (and inside the grid's own border): 0 or 1 per voxel.

    Covered: along every axis of MOVING (``n`` voxels) the sample position ``p`` lies within
    ``[-0.001, n - 0.999]``, where linear sampling of an all-ones MOVING with zero padding gives more
    than 0.999 along that axis. That set is convex and the positions are affine in the grid's indices, so the erosion by a
    box of ``margin`` voxels (what :func:`interior` does) is the same interval shrunk along MOVING's
    axis ``k`` by the box's reach ``sum_j |dp_k / dv_j| margin_j``: three comparisons of separable
    positions, no resampling and no max-pooling.
    """
    device = moving.data.device
    ms = [int(margin)] * 3 if isinstance(margin, int) else [int(v) for v in margin]
    if min(moving.shape) < 2:  # grid_sample's convention for a single voxel: sample it everywhere
        ones = Volume(torch.ones((1, *moving.shape), device=device), moving.affine)
        cover = resample_through(ones, world, shape, affine).data[0]
        return interior((cover > 0.999).float(), ms)
    m = np.linalg.inv(moving.affine) @ np.asarray(world) @ np.asarray(affine)
    out = inner_box(shape, ms, device=device)
    pos = affine_points(shape, m, device=device, dtype=torch.float64)  # MOVING's voxel position of every voxel
    for k, n in enumerate(moving.shape):
        reach = float(sum(abs(m[k, j]) * ms[j] for j in range(3)))
        out.mul_(((pos[..., k] - reach > -0.001) & (pos[..., k] + reach < float(n) - 0.999)).float())
    return out


def bounding_boxes_overlap(fixed_shape: tuple[int, int, int], fixed_affine: np.ndarray,
                           moving_shape: tuple[int, int, int], moving_affine: np.ndarray,
                           world: np.ndarray) -> bool:
    """Whether the world bounding boxes of FIXED and of MOVING (pulled back through ``world``) intersect."""
    def corners(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
        c = np.array(list(itertools.product(*[(-0.5, s - 0.5) for s in shape])), dtype=np.float64)
        return c @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]

    fc = corners(fixed_shape, fixed_affine)
    mc = corners(moving_shape, moving_affine)
    inv = np.linalg.inv(world)
    mc = mc @ inv[:3, :3].T + inv[:3, 3]
    return bool(np.all(fc.min(0) < mc.max(0)) and np.all(mc.min(0) < fc.max(0)))
