"""Landmarks: points carried by a registration's map or a saved warp, and the target registration error.

Directions (as ITK's and ANTs' point transforms): a warp on FIXED's grid (``warp.nii.gz``) carries a
point of FIXED's world to where it lies in MOVING's (``p -> p + d(p)``): the map the images are
resampled through. To follow the image, carrying MOVING's points onto FIXED's, use the inverse map,
``inverse_warp.nii.gz`` (on MOVING's grid). Points are RAS millimetres.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from synthvox.registration.warp import itk_to_ras
from synthvox.volume import Volume, sample_at


def _sample(field: torch.Tensor, affine: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A ``(3, X, Y, Z)`` field at RAS points (linear, border values beyond the grid), and which points
    lie inside the grid."""
    vox = (np.asarray(points, np.float64) - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    shape = np.asarray(field.shape[1:])
    inside = ((vox >= -0.5) & (vox <= shape - 0.5)).all(axis=1)
    v = torch.as_tensor(vox, dtype=torch.float64, device=field.device).reshape(-1, 1, 1, 3)
    d = sample_at(field.double(), v, mode="linear", padding="border")
    return d.reshape(3, -1).T.cpu().numpy(), inside


def map_points_through(points: np.ndarray, world_affine: np.ndarray, deformable_ras: torch.Tensor | None = None,
                       grid_affine: np.ndarray | None = None) -> np.ndarray:
    """FIXED's points carried into MOVING's world by a registration's map ``x -> T(x + u(x))``
    (``u``: the deformable part, RAS mm on the grid ``grid_affine``; exact for the affine part
    everywhere, the deformable part continued from the grid's border beyond it)."""
    x = np.asarray(points, np.float64).reshape(-1, 3)
    if deformable_ras is not None:
        x = x + _sample(deformable_ras, np.asarray(grid_affine, np.float64), x)[0]
    t = np.asarray(world_affine, np.float64)
    return x @ t[:3, :3].T + t[:3, 3]


def apply_warp_to_points(points: np.ndarray, warp: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Points (RAS mm) carried by a saved ITK/ANTs warp, ``p -> p + d(p)``: with ``warp.nii.gz``
    FIXED's points to MOVING's world, with ``inverse_warp.nii.gz`` MOVING's to FIXED's (following the
    moved image). Returns the mapped points and which lay inside the warp's grid (the others get the
    displacement of its nearest border)."""
    d, inside = _sample(itk_to_ras(warp.data.float()), warp.affine, points)
    return np.asarray(points, np.float64).reshape(-1, 3) + d, inside


def tre_report(fixed_points: np.ndarray, moving_points: np.ndarray, mapped: np.ndarray,
               labels: list[str] | None = None) -> dict[str, Any]:
    """The target registration error of corresponding landmarks, before (the headers: each fixed point
    where it is) and after (carried by the map): mean, median, max and per point, in mm."""
    f = np.asarray(fixed_points, np.float64)
    m = np.asarray(moving_points, np.float64)
    before = np.linalg.norm(f - m, axis=1)
    after = np.linalg.norm(np.asarray(mapped) - m, axis=1)
    labels = list(labels) if labels else [""] * len(f)
    return {
        "n": int(len(f)),
        "tre_before_mm": {"mean": float(before.mean()), "median": float(np.median(before)), "max": float(before.max())},
        "tre_after_mm": {"mean": float(after.mean()), "median": float(np.median(after)), "max": float(after.max())},
        "per_point": [{"label": lab, "before_mm": round(float(b), 4), "after_mm": round(float(a), 4)}
                      for lab, b, a in zip(labels, before, after)],
    }
