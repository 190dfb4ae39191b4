"""Transforms as displacement fields: composition, the ITK/ANTs convention, and applying a warp.

Conventions used throughout :mod:`synthvox.registration`:

* A *world affine* ``T`` (4x4) maps a point of FIXED's physical (RAS, mm) space to MOVING's physical
  space: registration finds where each fixed point comes from in the moving image.
* A deformable displacement ``u`` lives on a *working grid* (``working_affine``, isotropic) in units of
  working voxels, applied before ``T``: fixed point ``x`` (working voxel ``v``) maps to
  ``T(A_w (v + u(v)))``.
* The saved warp follows ITK/ANTs: a displacement ``d`` in mm on FIXED's grid, in LPS physical space,
  such that LPS point ``p`` maps to ``p + d(p)`` in MOVING's LPS space. NIfTI affines are RAS, so the x
  and y components change sign between the two.
"""

from __future__ import annotations

import numpy as np
import torch

from synthvox.errors import InputError
from synthvox.volume import Volume, affine_points, sample_at, voxel_grid

#: Multiplying a RAS vector by this gives the LPS vector (and back).
RAS_TO_LPS = (-1.0, -1.0, 1.0)


def world_points(shape: tuple[int, int, int], affine: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """World (RAS, mm) coordinates of every voxel of a grid, ``(X, Y, Z, 3)`` float64."""
    return affine_points(shape, affine, device=device, dtype=torch.float64)


def transform_points(points: torch.Tensor, matrix: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Apply a 4x4 matrix to ``(..., 3)`` points (float64)."""
    m = torch.as_tensor(np.asarray(matrix, np.float64) if not isinstance(matrix, torch.Tensor) else matrix,
                        device=points.device).to(points.dtype)
    return points @ m[:3, :3].T + m[:3, 3]


def _plus_linear(points: torch.Tensor, linear: np.ndarray, field: torch.Tensor) -> torch.Tensor:
    """``points`` ``(X, Y, Z, 3)`` plus ``linear @ field`` for a ``(3, X, Y, Z)`` field, as ``(3, X, Y, Z)``."""
    lin = torch.as_tensor(np.asarray(linear, np.float64), dtype=field.dtype, device=field.device)
    return (torch.einsum("ij,jxyz->ixyz", lin, field) + points.permute(3, 0, 1, 2)).contiguous()


def compose_displacement(
    shape: tuple[int, int, int],
    affine: np.ndarray,
    world_affine: np.ndarray,
    disp_vox: torch.Tensor | None = None,
    working_affine: np.ndarray | None = None,
) -> torch.Tensor:
    """One displacement field (RAS, mm) on a grid for ``world_affine`` after a working-grid displacement.

    Args:
        shape: the output grid's spatial shape (normally FIXED's).
        affine: the output grid's voxel-to-world affine.
        world_affine: 4x4 fixed-world to moving-world matrix.
        disp_vox: ``(3, h, w, d)`` displacement in working-grid voxels (or ``None`` for affine only).
        working_affine: the working grid's affine (needed with ``disp_vox``).

    Returns:
        ``(3, X, Y, Z)`` float32 displacement ``d`` with ``x -> x + d(x)`` landing in MOVING's RAS space:
        ``d(x) = T(x + W U(W^-1 x)) - x`` (``W``: the working grid's affine, ``U``: ``disp_vox``
        interpolated linearly), evaluated from the voxel indices of the grid in float32 (the affine
        parts are products of the 4x4 matrices, in float64).
    """
    if disp_vox is None:
        return then_affine(None, shape, affine, world_affine)
    if working_affine is None:
        raise ValueError("compose_displacement needs working_affine with disp_vox")
    a = np.asarray(affine, np.float64)
    wa = np.asarray(working_affine, np.float64)
    v = affine_points(shape, np.linalg.inv(wa) @ a, device=disp_vox.device)
    u = sample_at(disp_vox.float(), v, mode="linear", padding="border")  # (3, X, Y, Z) working voxels
    deform = torch.einsum("ij,jxyz->ixyz", torch.as_tensor(wa[:3, :3], dtype=u.dtype, device=u.device), u)
    return then_affine(deform, shape, affine, world_affine)


def then_affine(disp_ras: torch.Tensor | None, shape: tuple[int, int, int], affine: np.ndarray,
                world_affine: np.ndarray) -> torch.Tensor:
    """The displacement of ``x -> T(x + d(x))`` on a grid, for a RAS displacement ``d`` (``None``: zero)
    on it and the 4x4 world matrix ``T``: ``T A v - A v + T_lin d`` at voxel ``v`` (float32)."""
    a = np.asarray(affine, np.float64)
    t = np.asarray(world_affine, np.float64)
    part = affine_points(shape, t @ a - a, device=disp_ras.device if disp_ras is not None else "cpu")
    if disp_ras is None:
        return part.permute(3, 0, 1, 2).contiguous()
    return _plus_linear(part, t[:3, :3], disp_ras.float())


def invert_field(disp_vox: torch.Tensor, iters: int = 30, tol: float = 1e-3) -> torch.Tensor:
    """The inverse of ``v -> v + u(v)`` on ``u``'s own grid: ``w`` with ``w(z) = -u(z + w(z))`` (voxels).

    Fixed-point iteration (it converges where the map does not fold), at most ``iters`` steps, until no
    voxel moves by more than ``tol`` voxels: no wasted iterations.
    """
    u = disp_vox.float()
    grid = voxel_grid(tuple(int(s) for s in u.shape[1:]), device=u.device)
    w = -u
    for _ in range(iters):
        w_new = -sample_at(u, grid + w.permute(1, 2, 3, 0), mode="linear", padding="border")
        change = float((w_new - w).abs().max())
        w = w_new
        if change < tol:
            break
    return w


def inverse_displacement(
    shape: tuple[int, int, int],
    affine: np.ndarray,
    world_affine: np.ndarray,
    disp_vox: torch.Tensor | None = None,
    working_affine: np.ndarray | None = None,
    iters: int = 30,
    tol_mm: float = 0.01,
) -> torch.Tensor:
    """The inverse of :func:`compose_displacement`'s map as a RAS displacement on another grid.

    The forward map is ``x -> T(x + U(x))`` (``U``: the working-grid displacement); for each point ``y``
    of the grid (``shape``, ``affine``), normally MOVING's, the fixed point is ``x = z + W(z)`` with
    ``z = T^-1(y)`` and ``W`` the inverse of ``U`` found once on the working grid (:func:`invert_field`,
    on every second working voxel, ``tol_mm`` converted to its voxels) and interpolated linearly, like
    ``U`` itself is in the warp.

    Returns:
        ``(3, X, Y, Z)`` float32 displacement ``e`` with ``y -> y + e(y)`` landing in FIXED's RAS space.
    """
    inv_t = np.linalg.inv(np.asarray(world_affine, np.float64))
    if disp_vox is None:
        return then_affine(None, shape, affine, inv_t)
    if working_affine is None:
        raise ValueError("inverse_displacement needs working_affine with disp_vox")
    wa = np.asarray(working_affine, np.float64)
    # on every second working voxel (the field is smooth at that scale: the deformable stage's
    # grids are two or more working voxels apart), then interpolated like the forward field
    sub = 2 if min(disp_vox.shape[1:]) >= 8 else 1
    wa_sub = wa @ np.diag([sub, sub, sub, 1.0])
    step = float(np.abs(np.linalg.det(wa_sub[:3, :3]))) ** (1.0 / 3.0)
    w = invert_field(disp_vox[:, ::sub, ::sub, ::sub] / sub, iters=iters, tol=tol_mm / max(step, 1e-12))
    a = np.asarray(affine, np.float64)
    z = affine_points(shape, np.linalg.inv(wa_sub) @ inv_t @ a, device=disp_vox.device)
    part = affine_points(shape, inv_t @ a - a, device=disp_vox.device)  # T^-1 y - y on the grid's voxel indices
    return _plus_linear(part, wa_sub[:3, :3], sample_at(w, z, mode="linear", padding="border"))


def ras_to_itk(disp_ras: torch.Tensor) -> torch.Tensor:
    """RAS displacement ``(3, X, Y, Z)`` to the ITK (LPS) convention (and back: the map is its own inverse)."""
    flip = torch.tensor(RAS_TO_LPS, dtype=disp_ras.dtype, device=disp_ras.device).view(3, 1, 1, 1)
    return disp_ras * flip


itk_to_ras = ras_to_itk


def warp_to_itk_volume(disp_ras: torch.Tensor, affine: np.ndarray) -> Volume:
    """The ITK/ANTs displacement field as a 3-channel :class:`Volume`; save it with ``io.save(..., vector=True)``."""
    return Volume(ras_to_itk(disp_ras).float().cpu(), np.asarray(affine, np.float64).copy())


def check_warp(warp: Volume) -> None:
    """Raise :class:`InputError` unless ``warp`` is a 3-component displacement field."""
    if warp.data.shape[0] != 3 or not torch.is_floating_point(warp.data):
        raise InputError(f"a warp must hold 3 displacement components per voxel, got {warp.data.shape[0]}")


def apply_displacement(
    image: Volume,
    disp_ras: torch.Tensor,
    affine: np.ndarray,
    *,
    labels: bool = False,
) -> Volume:
    """Resample ``image`` through a RAS displacement field defined on the grid (``disp_ras``, ``affine``).

    Args:
        image: any volume, on any grid (its own affine places it in the world).
        disp_ras: ``(3, X, Y, Z)`` displacement in mm (RAS), ``x -> x + d(x)`` into ``image``'s space.
        affine: the displacement field's grid.
        labels: nearest-neighbour sampling with label ids kept exactly (otherwise linear).

    Returns:
        ``image`` resampled onto the displacement field's grid (zeros outside ``image``).
    """
    shape = tuple(int(s) for s in disp_ras.shape[1:])
    device = image.data.device
    to_image = np.linalg.inv(np.asarray(image.affine, np.float64))
    # voxel positions in the image: its inverse affine applied to x + d(x), from the grid's indices
    vox = _plus_linear(affine_points(shape, to_image @ np.asarray(affine, np.float64), device=device),  # type: ignore[arg-type]
                       to_image[:3, :3], disp_ras.to(device).float()).permute(1, 2, 3, 0)
    data = image.data
    if not labels and not torch.is_floating_point(data):
        data = data.float()
    out = sample_at(data, vox.float(), mode="nearest" if labels else "linear", padding="zeros")
    return Volume(out, np.asarray(affine, np.float64).copy())


def apply_warp(image: Volume, warp: Volume, *, labels: bool = False, reference: Volume | None = None) -> Volume:
    """Apply a saved ITK/ANTs warp (as written by ``synthvox register``) to any image or label map.

    Args:
        image: the volume to move (normally on MOVING's grid, but any grid placed in MOVING's space works).
        warp: 3-channel displacement field in the ITK convention (LPS, mm) on FIXED's grid.
        labels: nearest neighbour, label ids preserved.
        reference: a grid to write onto instead of the warp's own (the displacement is interpolated
            linearly onto it; zero displacement outside the warp's field of view is not assumed: the
            border value is used).

    Returns:
        The moved volume on the warp's (or ``reference``'s) grid.
    """
    check_warp(warp)
    disp = itk_to_ras(warp.data.float())
    affine = warp.affine
    if reference is not None and not (
        reference.shape == warp.shape and np.allclose(reference.affine, warp.affine, atol=1e-4)
    ):
        vox = affine_points(reference.shape, np.linalg.inv(warp.affine) @ np.asarray(reference.affine), device=disp.device)
        disp = sample_at(disp, vox, mode="linear", padding="border")
        affine = reference.affine
    return apply_displacement(image, disp, affine, labels=labels)
