"""Volume: a channel-first ``(C, X, Y, Z)`` tensor with a 4x4 voxel-to-world (RAS) affine.

Geometry helpers (reorientation, resampling onto grids and spacings) live here; they never read or
write files (that is :mod:`synthvox.io`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from synthvox.errors import InputError


@dataclass
class Volume:
    """A 3D image or label map with its geometry.

    Attributes:
        data: tensor of shape ``(C, X, Y, Z)``.
        affine: ``(4, 4)`` float64 array mapping voxel indices to RAS world coordinates in mm.
    """

    data: torch.Tensor
    affine: np.ndarray

    def __post_init__(self) -> None:
        if self.data.ndim != 4:
            raise InputError(f"a Volume needs a (C, X, Y, Z) tensor, got shape {tuple(self.data.shape)}")
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise InputError(f"an affine must be 4x4, got {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(X, Y, Z)``."""
        return tuple(int(s) for s in self.data.shape[1:])  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along each array axis (norms of the affine's columns)."""
        return spacing_of(self.affine)

    def to(self, device: torch.device | str) -> Volume:
        return Volume(self.data.to(device), self.affine.copy())


def check_min_size(shape: tuple[int, ...], minimum: int | tuple[int, int, int], what: str, stage: str) -> None:
    """Refuse, with one line, a grid smaller than a stage needs (a pooling pyramid, a patch, ...).

    Args:
        shape: the spatial shape ``(X, Y, Z)`` the stage would get (after any resampling).
        minimum: voxels needed along each axis (one int or three).
        what: the input, for the message (``"moving image"``).
        stage: the stage, for the message (``"the affine stage at 2 mm"``).

    Raises:
        InputError: ``shape`` is smaller than ``minimum`` along some axis.
    """
    mins = (int(minimum),) * 3 if isinstance(minimum, (int, np.integer)) else tuple(int(m) for m in minimum)
    if any(int(s) < m for s, m in zip(shape, mins)):
        need = "x".join(map(str, mins)) if len(set(mins)) > 1 else f"{mins[0]}"
        raise InputError(
            f"{what} is too small for {stage}: {'x'.join(map(str, shape))} voxels, needs at least {need} along each axis"
        )


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each array axis of ``affine``."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


#: :func:`snap_affine`'s grids, in units of the power of two nearest an image's mean voxel size: the
#: 3x3 part to 1e-4 of it, the translation to 1e-2 of it (0.1 and 10 micrometres for 1 mm voxels).
SNAP_LINEAR = 1e-4
SNAP_TRANSLATION = 1e-2


def snap_affine(affine: np.ndarray) -> np.ndarray:
    """``affine`` with its entries rounded to a grid far coarser than the rounding of any header format.

    Every format stores an affine at its own precision: a NIfTI sform and qform and an MGH header in
    float32 fields (each its own parametrisation), NRRD and MetaImage as decimal text, a DICOM series
    in 16-character strings; copies of one image then read up to about 1e-7 of a voxel apart. The
    entries of the 3x3 part are rounded to :data:`SNAP_LINEAR` and those of the translation to
    :data:`SNAP_TRANSLATION`, both times the power of two nearest the mean voxel size (itself read the
    same from every copy unless that size lies within 1e-7 of ``2**(k + 0.5)``: 0.707, 1.414, 2.83 mm),
    so such copies snap to the very same matrix, unless an entry lies within its format's rounding of
    the midpoint between two grid values: of 3000 random oblique headers (voxels of 0.5 to 1.5 mm,
    origins within 150 mm), 5 float32-sform NIfTI, 4 MGZ and 1 NRRD copies snapped elsewhere than the
    double-precision qform's. The snapped matrix places voxel ``v`` at most ``(0.005 + 5e-5 * sum(v))``
    times that power of two from where ``affine`` does: 0.06 of a voxel at the far corner of a 256³
    grid, 0.007 at its origin.
    """
    a = np.asarray(affine, np.float64)
    scale = 2.0 ** float(np.round(np.log2(float(spacing_of(a).mean()))))
    out = a.copy()
    out[:3, :3] = np.round(a[:3, :3] / (SNAP_LINEAR * scale)) * (SNAP_LINEAR * scale)
    out[:3, 3] = np.round(a[:3, 3] / (SNAP_TRANSLATION * scale)) * (SNAP_TRANSLATION * scale)
    return out


def same_grid(a: Volume, b: Volume, atol: float = 1e-3) -> bool:
    """True when ``a`` and ``b`` share spatial shape and affine (within ``atol`` mm)."""
    return a.shape == b.shape and bool(np.allclose(a.affine, b.affine, atol=atol))


def to_canonical(vol: Volume) -> Volume:
    """Reorder and flip axes so the array is closest to RAS+ (as nibabel's ``as_closest_canonical``).

    Only permutations and flips are applied: no interpolation, so values are unchanged.
    """
    import nibabel as nib

    ornt = nib.orientations.io_orientation(vol.affine)
    target = nib.orientations.axcodes2ornt(("R", "A", "S"))
    transform = nib.orientations.ornt_transform(ornt, target)
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return Volume(vol.data, vol.affine.copy())
    data = vol.data
    # transform[i] = (new axis, flip) for input axis i
    perm = [0] * 3
    for in_ax, (out_ax, flip) in enumerate(transform):
        if flip < 0:
            data = data.flip(in_ax + 1)
        perm[int(out_ax)] = in_ax
    data = data.permute(0, *(p + 1 for p in perm)).contiguous()
    affine = vol.affine @ nib.orientations.inv_ornt_aff(transform, vol.shape)
    return Volume(data, affine)


def grid_to_grid(src_affine: np.ndarray, dst_affine: np.ndarray) -> np.ndarray:
    """4x4 matrix mapping destination voxel indices to source voxel indices."""
    return np.linalg.inv(np.asarray(src_affine, np.float64)) @ np.asarray(dst_affine, np.float64)


def voxel_grid(shape: tuple[int, int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Voxel index coordinates of a grid, shape ``(X, Y, Z, 3)``, float32."""
    axes = [torch.arange(s, device=device, dtype=torch.float32) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def affine_points(shape: tuple[int, int, int], matrix: np.ndarray, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``matrix`` (4x4) applied to the voxel indices of a grid: ``(X, Y, Z, 3)`` in ``dtype``.

    The same as ``voxel_grid(shape) @ matrix[:3, :3].T + matrix[:3, 3]``, but each component is a sum of
    three 1D ramps (evaluated in float64, then cast): no index grid and no matrix product over the grid.
    """
    m = np.asarray(matrix, np.float64)
    idx = [torch.arange(int(n), device=device, dtype=torch.float64) for n in shape]
    out = torch.empty((*(int(n) for n in shape), 3), device=device, dtype=dtype)
    for k in range(3):
        out[..., k] = ((float(m[k, 0]) * idx[0] + float(m[k, 3]))[:, None, None]
                       + (float(m[k, 1]) * idx[1])[None, :, None] + (float(m[k, 2]) * idx[2])[None, None, :])
    return out


def normalise_coords(vox: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Voxel index coordinates ``(..., 3)`` in (x, y, z) array order to ``grid_sample``'s [-1, 1].

    Returns the coordinates reversed to (z, y, x) as ``grid_sample`` expects for a ``(N, C, X, Y, Z)``
    input, with ``align_corners=True`` semantics.
    """
    size = torch.tensor([max(s - 1, 1) for s in shape], dtype=vox.dtype, device=vox.device)
    return (2.0 * vox / size - 1.0).flip(-1)


def sample_at(
    data: torch.Tensor, vox: torch.Tensor, mode: str = "linear", padding: str = "zeros"
) -> torch.Tensor:
    """Sample a ``(C, X, Y, Z)`` tensor at voxel coordinates ``vox`` of shape ``(X', Y', Z', 3)``.

    Args:
        data: the source array.
        vox: voxel coordinates into ``data`` (x, y, z order).
        mode: ``"linear"`` for images, ``"nearest"`` for label maps (ids preserved exactly).
        padding: ``"zeros"`` or ``"border"``.
    """
    gs_mode = {"linear": "bilinear", "nearest": "nearest"}[mode]
    is_int = not torch.is_floating_point(data)
    if is_int and mode == "nearest":
        return _gather_nearest(data, vox, padding)
    grid = normalise_coords(vox, tuple(data.shape[1:]))[None]
    src = data.to(torch.float64 if is_int else data.dtype)
    if is_int and data.abs().max() < 2**24:
        src = data.to(torch.float32)
    out = F.grid_sample(src[None], grid.to(src.dtype), mode=gs_mode, padding_mode=padding, align_corners=True)[0]
    if is_int:
        out = out.round().to(data.dtype)
    return out


def _gather_nearest(data: torch.Tensor, vox: torch.Tensor, padding: str) -> torch.Tensor:
    """Nearest-neighbour sampling of integer data by indexing: every id is kept exactly, however
    large (``grid_sample`` works in floating point, which rounds ids above 2**24 or 2**53)."""
    shape = torch.tensor(data.shape[1:], device=vox.device)
    idx = torch.round(vox).to(torch.int64)  # round half to even, as grid_sample's nearest mode
    inside = ((idx >= 0) & (idx < shape)).all(dim=-1)
    idx = torch.minimum(idx.clamp(min=0), shape - 1)
    flat = (idx[..., 0] * shape[1] + idx[..., 1]) * shape[2] + idx[..., 2]
    out = data.reshape(data.shape[0], -1)[:, flat.reshape(-1).to(data.device)].reshape(data.shape[0], *vox.shape[:-1])
    if padding == "zeros":
        out = out * inside.to(data.device)
    return out


def resample_to_grid(
    vol: Volume,
    shape: tuple[int, int, int],
    affine: np.ndarray,
    mode: str = "linear",
    padding: str = "zeros",
) -> Volume:
    """Resample ``vol`` onto the grid given by ``shape`` and ``affine`` through world space.

    Works for any (oblique, anisotropic, flipped) pair of affines. ``mode="nearest"`` keeps label ids.
    """
    m = grid_to_grid(vol.affine, affine)
    if np.allclose(m, np.eye(4), atol=1e-6) and tuple(shape) == vol.shape:
        return Volume(vol.data.clone(), np.asarray(affine, np.float64).copy())
    vox = affine_points(tuple(shape), m, device=vol.data.device)
    out = sample_at(vol.data, vox, mode=mode, padding=padding)
    return Volume(out, np.asarray(affine, np.float64).copy())


def resample_like(vol: Volume, ref: Volume, mode: str = "linear", padding: str = "zeros") -> Volume:
    """Resample ``vol`` onto ``ref``'s grid."""
    return resample_to_grid(vol, ref.shape, ref.affine, mode=mode, padding=padding)


def grid_for_spacing(
    shape: tuple[int, int, int], affine: np.ndarray, spacing: float | tuple[float, float, float]
) -> tuple[tuple[int, int, int], np.ndarray]:
    """The grid covering the same field of view as (``shape``, ``affine``) at a new ``spacing``.

    The directions of the axes are kept; the centre of the field of view stays where it is.
    """
    affine = np.asarray(affine, np.float64)
    old = spacing_of(affine)
    new = np.broadcast_to(np.asarray(spacing, np.float64), (3,)).copy()
    if not np.all(np.isfinite(new)) or np.any(new <= 0):
        raise InputError(f"spacing must be a positive, finite number of mm, got {tuple(float(v) for v in new)}")
    new_shape = tuple(int(max(1, round(s * o / n))) for s, o, n in zip(shape, old, new))
    direction = affine[:3, :3] / old
    new_affine = np.eye(4)
    new_affine[:3, :3] = direction * new
    centre_old = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + affine[:3, 3]
    new_affine[:3, 3] = centre_old - new_affine[:3, :3] @ ((np.asarray(new_shape) - 1) / 2.0)
    return new_shape, new_affine  # type: ignore[return-value]


def resample_to_spacing(
    vol: Volume, spacing: float | tuple[float, float, float], mode: str = "linear"
) -> Volume:
    """Resample ``vol`` to a new voxel ``spacing`` (mm), keeping its field of view and directions."""
    shape, affine = grid_for_spacing(vol.shape, vol.affine, spacing)
    return resample_to_grid(vol, shape, affine, mode=mode)


# ---------------------------------------------------------------------------------------------------
# World maps in ITK's convention
#
# ITK (and ANTs, Slicer, SimpleITK) transform files map a point of FIXED's physical space to MOVING's
# (the direction ``antsApplyTransforms`` reads them in), in LPS millimetres. synthvox's world affines map
# FIXED's RAS world to MOVING's: the same map with the x and y axes negated on both sides.

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS, its own inverse


def itk_to_ras_matrix(matrix_lps: np.ndarray) -> np.ndarray:
    """A 4x4 fixed-to-moving matrix in LPS (ITK's physical space) as the same map in RAS."""
    return _LPS @ np.asarray(matrix_lps, np.float64) @ _LPS


ras_to_itk_matrix = itk_to_ras_matrix


def check_affine(affine: np.ndarray, what: str, path: str | os.PathLike | None = None) -> np.ndarray:
    """A 4x4 float64 voxel-to-world affine, or an :class:`InputError` when it is unusable.

    Refuses non-finite entries, a singular or nearly singular 3x3 part (zero, duplicated or
    collinear axes) and voxel sizes outside 1e-6 to 1e6 mm (a nanometre to a kilometre), all of which
    make every later resampling step fail or produce garbage. Readers of images, label maps and
    warps use it, and :func:`synthvox.io.save` checks the affine it writes.
    """
    where = f": {path}" if path is not None else ""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise InputError(f"{what} has an invalid (non-finite or malformed) affine{where}")
    lin = a[:3, :3]
    spacing = np.sqrt((lin**2).sum(axis=0))
    if np.any(spacing < 1e-6) or np.any(spacing > 1e6):
        raise InputError(f"{what} has voxel sizes {tuple(float(f'{s:.3g}') for s in spacing)} mm, outside 1e-6 to 1e6 mm{where}")
    # |det| relative to the product of the column norms: 1 for orthogonal axes, 0 for collinear ones
    if abs(np.linalg.det(lin)) < 1e-6 * float(np.prod(spacing)):
        raise InputError(f"{what} has a degenerate (singular) affine: its voxel axes are collinear{where}")
    return a


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
