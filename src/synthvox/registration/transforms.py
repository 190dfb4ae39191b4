"""Linear transforms between ITK's convention and synthvox's, and the kinds of registration.

ITK (and ANTs, Slicer, SimpleITK) transform files map a point of FIXED's physical space to MOVING's
(the direction ``antsApplyTransforms`` reads them in), in LPS millimetres, as ``A (p - c) + c + t``
with a centre ``c``. synthvox's world affines map FIXED's RAS world to MOVING's: the same map, with
the x and y axes negated on both sides. :func:`itk_to_ras_matrix` and :func:`ras_to_itk_matrix`
convert between the two; :func:`synthvox.io.load_transform` reads the files.
"""

from __future__ import annotations

import numpy as np

from synthvox.errors import InputError

#: How far a registration goes (``--transform``): the start and a rigid fit, the start and an affine
#: fit, or those and the deformable stages.
TRANSFORM_KINDS = ("rigid", "affine", "deformable")

_P = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS, its own inverse


def itk_to_ras_matrix(matrix_lps: np.ndarray) -> np.ndarray:
    """A 4x4 fixed-to-moving matrix in LPS (ITK's physical space) as the same map in RAS."""
    return _P @ np.asarray(matrix_lps, np.float64) @ _P


ras_to_itk_matrix = itk_to_ras_matrix


def check_world_matrix(matrix: np.ndarray, what: str = "the initial transform") -> np.ndarray:
    """``matrix`` as a 4x4 float64 affine map, or an :class:`InputError` (non-finite, not affine, singular)."""
    m = np.asarray(matrix, np.float64)
    if m.shape != (4, 4) or not np.isfinite(m).all():
        raise InputError(f"{what} must be a finite 4x4 matrix, got shape {m.shape}")
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0]):
        raise InputError(f"{what} must be affine (last row 0 0 0 1), got {m[3].tolist()}")
    if abs(np.linalg.det(m[:3, :3])) < 1e-6:
        raise InputError(f"{what} is singular (its linear part has determinant {np.linalg.det(m[:3, :3]):.3g})")
    return m


def matrix_of_points(transform_point, what: str) -> np.ndarray:  # noqa: ANN001 - any callable point map
    """The 4x4 matrix of a point map (LPS to LPS) that is affine, from the images of the origin and the
    unit vectors; refuses a map that is not affine (checked on a few points 100 mm apart)."""
    o = np.asarray(transform_point((0.0, 0.0, 0.0)), np.float64)
    m = np.eye(4)
    for i in range(3):
        e = np.zeros(3)
        e[i] = 1.0
        m[:3, i] = np.asarray(transform_point(tuple(e)), np.float64) - o
    m[:3, 3] = o
    for p in ((100.0, -50.0, 30.0), (-80.0, 120.0, -60.0)):
        got = np.asarray(transform_point(p), np.float64)
        if not np.allclose(got, m[:3, :3] @ np.asarray(p) + o, atol=1e-4):
            raise InputError(f"{what} is not a linear (rigid or affine) transform; give an affine, or register without it")
    return m
