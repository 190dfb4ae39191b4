"""The grids registration works on: FIXED's working grid, grids pooled from it, and the grid with its
axes that covers all of MOVING through a transform.

Every transform is a 4x4 matrix mapping FIXED's world (RAS, mm) to MOVING's world.
"""

from __future__ import annotations

import itertools

import numpy as np

from synthvox.volume import Volume, grid_for_spacing, resample_to_grid, spacing_of

#: The working grid's spacing in mm by default (:attr:`synthvox.registration.RegistrationConfig.spacing`,
#: ``synthvox register --spacing``): on the 11 consecutive brain pairs of benchmarks/registration.py
#: mean Dice 0.730 in 0.43x the time of ANTs SyN, and 0.730 in 0.63x on 2 mm (the same run, 2 threads).
WORKING_SPACING = 2.5
#: Most working voxels along an axis (the spacing grows to fit).
MAX_WORKING_SIZE = 192
#: Fewest working voxels along the longest axis (the spacing shrinks to fit, down to FIXED's own): a
#: small field of view (a spinal cord, 77 mm) is not registered on 20 voxels.
MIN_WORKING_SIZE = 64


def working_grid(fixed: Volume, spacing: float = WORKING_SPACING, max_size: int = MAX_WORKING_SIZE,
                 min_size: int = MIN_WORKING_SIZE) -> tuple[tuple[int, int, int], np.ndarray]:
    """FIXED's field of view and axes at an isotropic ``spacing`` (FIXED's finest spacing instead when
    coarser), at most ``max_size`` voxels along any axis and at least ``min_size`` along the longest."""
    extent = np.asarray(fixed.shape) * spacing_of(fixed.affine)
    s = min(float(spacing), float(extent.max()) / max(min_size, 1))
    s = max(s, float(spacing_of(fixed.affine).min()))
    s = max(s, float(extent.max()) / max_size)
    return grid_for_spacing(fixed.shape, fixed.affine, s)


def pooled_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    """The affine of a grid average-pooled by ``factor``."""
    scale = np.eye(4)
    scale[:3, :3] *= factor
    scale[:3, 3] = (factor - 1) / 2.0
    return np.asarray(affine) @ scale


def extended_grid(working_affine: np.ndarray, moving: Volume, world: np.ndarray,
                  max_size: int = 256, align: int = 1) -> tuple[tuple[int, int, int], np.ndarray]:
    """A grid with the working grid's axes and spacing covering all of MOVING, pulled back through ``world``.

    Moving resampled onto it is roughly aligned with the working grid (same axes), so features computed
    on it are comparable to the fixed image's, and nothing of MOVING is cut off. Its origin and size are
    multiples of ``align`` working voxels, so grids pooled by any divisor of ``align`` share their cells
    with the working grid pooled the same way (an image registered onto itself then meets its own
    pooled features exactly).
    """
    inv_w = np.linalg.inv(working_affine)
    inv_t = np.linalg.inv(world)
    c = np.array(list(itertools.product(*[(-0.5, s - 0.5) for s in moving.shape])), dtype=np.float64)
    mc = c @ moving.affine[:3, :3].T + moving.affine[:3, 3]
    mc = mc @ inv_t[:3, :3].T + inv_t[:3, 3]
    vox = mc @ inv_w[:3, :3].T + inv_w[:3, 3]
    a = max(int(align), 1)
    lo = np.floor(vox.min(0) / a) * a
    hi = np.ceil((vox.max(0) + 1) / a) * a - 1
    cap = max(max_size // a, 1) * a
    shape = np.clip(hi - lo + 1, 2, cap).astype(int)
    start = np.where(hi - lo + 1 > cap, np.round(((lo + hi) / 2 - cap / 2) / a) * a, lo)
    shift = np.eye(4)
    shift[:3, 3] = start
    return tuple(int(s) for s in shape), np.asarray(working_affine) @ shift  # type: ignore[return-value]


def resample_through(moving: Volume, world: np.ndarray, shape: tuple[int, int, int], affine: np.ndarray,
                     mode: str = "linear", padding: str = "zeros") -> Volume:
    """MOVING sampled at ``world(affine @ v)`` for every voxel ``v`` of the grid (``shape``, ``affine``)."""
    return resample_to_grid(Volume(moving.data, np.linalg.inv(world) @ moving.affine), shape,
                            np.asarray(affine) @ np.eye(4), mode=mode, padding=padding)
