"""The prior against rotations far from the headers': a transform's rotation and its angle, and the cost
that initial scoring and the affine fit add for it, so an elongated, nearly symmetric object does not
come out flipped."""

from __future__ import annotations

import numpy as np

#: Weight of the rotation prior: ``PRIOR_WEIGHT * max(0, cos 15deg - cos angle)`` is added to the
#: feature cost (unit total variance features: 0 for a perfect match, about 2 for unrelated images),
#: so a start 30 degrees off the headers pays 0.01, 90 degrees 0.097, upside down 0.197.
PRIOR_WEIGHT = 0.1
#: Rotations up to this angle from the headers' cost nothing under the prior (scanners and head
#: positions differ by a few degrees; the prior is there against tens of degrees, and flips).
PRIOR_FREE_DEG = 15.0


def rotation_part(matrix: np.ndarray) -> np.ndarray:
    """The rotation of the polar decomposition of a 4x4 (or 3x3) matrix's linear part."""
    u, _, vt = np.linalg.svd(np.asarray(matrix, np.float64)[:3, :3])
    r = u @ vt
    if np.linalg.det(r) < 0:  # a reflection: the nearest rotation flips the least significant axis
        u[:, -1] *= -1
        r = u @ vt
    return r


def rotation_angle_deg(matrix: np.ndarray) -> float:
    """Angle in degrees of the rotation part of a transform (0 for a translation)."""
    r = rotation_part(matrix)
    return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0))))


def rotation_prior(matrix: np.ndarray, weight: float = 0.0) -> float:
    """The rotation prior of :func:`fit_affine` for a whole transform:
    ``weight * max(0, cos(PRIOR_FREE_DEG) - cos(angle))``."""
    c = float(np.cos(np.radians(rotation_angle_deg(matrix))))
    return float(weight * max(0.0, float(np.cos(np.radians(PRIOR_FREE_DEG))) - c))
