"""The coarse deformable stage of ConvexAdam (Siebert, Hansen, Heinrich 2021): a discrete search of
feature distances over a dense displacement grid, regularised by coupled convex optimisation, with
optional inverse consistency.

All functions work on ``(C, X, Y, Z)`` features on a common grid, on any device. Displacements are in
voxels of the grid they live on, ordered (x, y, z) like the array axes. Loops run over displacement
offsets (at most ``(2r+1)^2`` iterations), never over voxels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from synthvox.registration.parallel import run_tasks
from synthvox.volume import sample_at, voxel_grid

#: Coupling weights of the alternation (the reference's schedule; for unit-variance features).
COUPLING = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def _box3_slices(x: torch.Tensor, passes: int) -> torch.Tensor:
    y = x
    for _ in range(passes):
        y = F.pad(y[None], (1,) * 6, mode="replicate")[0]
        y = y[:, :-2] + y[:, 1:-1] + y[:, 2:]
        y = y[:, :, :-2] + y[:, :, 1:-1] + y[:, :, 2:]
        y = (y[..., :-2] + y[..., 1:-1] + y[..., 2:]) * (1.0 / 27.0)
    return y


class _Box3(torch.autograd.Function):
    """The box filter with its own backward: with replicated borders it is a symmetric linear map
    (the weight of ``x_0`` in ``y_0`` is 2/3 along an axis, and so is that of ``g_0`` in the gradient
    of ``x_0``), so the gradient is the same filter, applied to the incoming gradient. Autograd's
    slice backward would allocate a zero volume for each of the 27 slices of a pass instead."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, passes: int) -> torch.Tensor:  # type: ignore[override]
        ctx.passes = passes
        return _box3_slices(x, passes)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return _box3_slices(grad, ctx.passes), None


def box3(x: torch.Tensor, passes: int = 1) -> torch.Tensor:
    """3x3x3 box filter with replicated borders over the last three axes of ``(C, X, Y, Z)``.

    Separable: three sums of shifted slices per pass, which on the CPU is ten times faster than
    ``avg_pool3d`` for a few channels (a displacement field, forward and backward in the Adam loop);
    ``avg_pool3d`` stays faster for hundreds of channels (a cost volume)."""
    if x.shape[0] <= 64 and min(x.shape[1:]) >= 2:
        return _Box3.apply(x, passes) if x.requires_grad and torch.is_grad_enabled() else _box3_slices(x, passes)
    if x.shape[0] > 64:
        y = x[None]
        for _ in range(passes):
            y = F.avg_pool3d(F.pad(y, (1,) * 6, mode="replicate"), 3, stride=1)
        return y[0]
    return _box3_slices(x, passes)


def pool(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool ``(C, X, Y, Z)`` by an integer factor (remainders dropped)."""
    if factor == 1:
        return x
    return F.avg_pool3d(x[None], factor, stride=factor)[0]


def displacement_offsets(radius: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``(3, (2r+1)^3)`` integer offsets of the search, index ``(a*K + b)*K + c`` for (x, y, z)."""
    r = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    g = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=0)
    return g.reshape(3, -1)


def _box3_last(x: torch.Tensor, passes: int) -> torch.Tensor:
    """:func:`box3` of a channels-last ``(X, Y, Z, D)`` tensor: every shifted slice is a contiguous
    block of ``D`` values, which keeps a cost volume's smoothing memory-bound rather than strided."""
    y = x
    for _ in range(passes):
        y = torch.cat([y[:1], y, y[-1:]], 0)
        y = y[:-2] + y[1:-1] + y[2:]
        y = torch.cat([y[:, :1], y, y[:, -1:]], 1)
        y = y[:, :-2] + y[:, 1:-1] + y[:, 2:]
        y = torch.cat([y[:, :, :1], y, y[:, :, -1:]], 2)
        y = (y[:, :, :-2] + y[:, :, 1:-1]).add_(y[:, :, 2:]).mul_(1.0 / 27.0)
    return y


def cost_volume(
    feat_fixed: torch.Tensor,
    feat_moving: torch.Tensor,
    radius: int,
    weight_fixed: torch.Tensor | None = None,
    weight_moving: torch.Tensor | None = None,
    smooth: int = 2,
) -> torch.Tensor:
    """Sum-of-squared-differences cost of every displacement within ``radius`` voxels.

    Args:
        feat_fixed: ``(C, X, Y, Z)``.
        feat_moving: ``(C, X, Y, Z)`` on the same grid.
        radius: search half-width ``r`` (``(2r+1)^3`` displacements).
        weight_fixed: optional ``(X, Y, Z)`` weights in [0, 1] (a fixed mask).
        weight_moving: optional ``(X, Y, Z)`` weights of the moving grid (a moving mask), shifted with it.
        smooth: passes of a 3x3x3 box filter over the cost of each displacement (patch aggregation).

    Returns:
        ``((2r+1)^3, X, Y, Z)`` costs (a view of a channels-last array, which :func:`coupled_convex`
        uses as it is); where a weight is zero the cost is the volume's mean cost, so the
        regularisation decides there.
    """
    k = 2 * radius + 1
    _, nx, ny, nz = feat_fixed.shape
    pad = (radius,) * 6
    mov = F.pad(feat_moving[None], pad, mode="replicate")[0]
    mov = mov.unfold(3, k, 1)  # (C, X+2r, Y+2r, Z, K)
    wmov = None
    if weight_moving is not None:
        wmov = F.pad(weight_moving[None, None].float(), pad, mode="replicate")[0, 0].unfold(2, k, 1)
    ff = feat_fixed[..., None]
    # channels last: (X, Y, Z, K, K, K), displacement index (a*K + b)*K + c as displacement_offsets
    cost = feat_fixed.new_empty(nx, ny, nz, k, k, k)
    weight = feat_fixed.new_empty(nx, ny, nz, k, k, k) if wmov is not None else None
    for a in range(k):
        for b in range(k):
            cost[:, :, :, a, b] = (ff - mov[:, a : a + nx, b : b + ny]).pow(2).sum(0)  # (X, Y, Z, K)
            if weight is not None:
                weight[:, :, :, a, b] = wmov[a : a + nx, b : b + ny]
    cost = cost.reshape(nx, ny, nz, k**3)
    if weight is not None or weight_fixed is not None:
        w = weight_fixed.float().reshape(nx, ny, nz, 1) if weight_fixed is not None else None
        if weight is not None:
            w = weight.reshape(nx, ny, nz, k**3) if w is None else weight.reshape(nx, ny, nz, k**3).mul_(w)
        # w * cost + (1 - w) * mean, in place
        mean = cost.mean()
        cost = cost.sub_(mean).mul_(w).add_(mean)
    if smooth:
        cost = _box3_last(cost, smooth)
    return cost.permute(3, 0, 1, 2)


def coupled_convex(cost: torch.Tensor, radius: int, coupling: tuple[float, ...] = COUPLING) -> torch.Tensor:
    """Regularise the per-voxel argmin of a cost volume by alternating with a smoothed field.

    Each round solves, independently per voxel, ``argmin_d cost(d) + c * |d - s|^2`` where ``s`` is the
    box-smoothed field of the previous round, with ``c`` increasing along ``coupling``.

    Returns:
        ``(3, X, Y, Z)`` displacement (voxels), smooth.
    """
    offsets = displacement_offsets(radius, cost.device).to(cost.dtype)  # (3, D)
    shape = tuple(int(v) for v in cost.shape[1:])
    # one row of displacements per voxel: every argmin runs along contiguous memory
    rows = cost.permute(1, 2, 3, 0).reshape(-1, cost.shape[0])
    sq = (offsets**2).sum(0)
    # ties (flat regions, where every displacement costs the same) go to the smallest displacement,
    # not to the first offset of the search (-r, -r, -r)
    rows = rows + (1e-4 * float(rows.abs().mean()) / max(radius, 1) ** 2) * sq

    def field_of(idx: torch.Tensor) -> torch.Tensor:
        return box3(offsets[:, idx].reshape(3, *shape))

    field = field_of(rows.argmin(1))
    for c in coupling:
        # |o - s|^2 = |o|^2 - 2 o.s + |s|^2; the last term does not change the argmin
        scored = torch.addmm(rows, field.reshape(3, -1).T, offsets, alpha=-2.0 * c)
        field = field_of(scored.add_(c * sq).argmin(1))
    return field


def compose(field_a: torch.Tensor, field_b: torch.Tensor) -> torch.Tensor:
    """Displacement of ``v -> v + a(v) -> ... + b(v + a(v))`` (``a`` first, then ``b``), in voxels."""
    grid = voxel_grid(tuple(field_a.shape[1:]), device=field_a.device)
    pos = grid + field_a.permute(1, 2, 3, 0)
    return field_a + sample_at(field_b, pos, mode="linear", padding="border")


def inverse_consistency(forward: torch.Tensor, backward: torch.Tensor, iters: int = 15) -> tuple[torch.Tensor, torch.Tensor]:
    """Make a forward and a backward displacement field (voxels) approximately inverse to each other."""
    grid = voxel_grid(tuple(forward.shape[1:]), device=forward.device)
    f, b = forward, backward
    for _ in range(iters):
        f_new = 0.5 * (f - sample_at(b, grid + f.permute(1, 2, 3, 0), padding="border"))
        b_new = 0.5 * (b - sample_at(f, grid + b.permute(1, 2, 3, 0), padding="border"))
        f, b = f_new, b_new
    return f, b


def upsample_field(field: torch.Tensor, factor: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """A displacement on a grid pooled by ``factor`` to the fine grid ``shape`` (values scaled to fine voxels).

    Coarse voxel ``i`` covers fine voxels ``i*factor ... i*factor + factor - 1``.
    """
    if factor == 1 and tuple(field.shape[1:]) == tuple(shape):
        return field
    fine = voxel_grid(tuple(shape), device=field.device)
    coarse = (fine - (factor - 1) / 2.0) / factor
    return sample_at(field, coarse, mode="linear", padding="border") * factor


def convex_stage(
    feat_fixed: torch.Tensor,
    feat_moving: torch.Tensor,
    grid: int,
    radius: int,
    weight_fixed: torch.Tensor | None = None,
    weight_moving: torch.Tensor | None = None,
    inverse_consistent: bool = True,
    workers: int = 1,
) -> torch.Tensor:
    """The coarse stage: displacement ``(3, X, Y, Z)`` in fine voxels on the features' grid.

    Args:
        feat_fixed: ``(C, X, Y, Z)`` fixed features.
        feat_moving: moving features on the same grid (already affinely aligned).
        grid: pooling factor of the search grid (voxels per control point).
        radius: search half-width in control-point steps (capture range ``grid * radius`` voxels).
        weight_fixed: optional fixed mask ``(X, Y, Z)``.
        weight_moving: optional moving mask on the same grid.
        inverse_consistent: also solve moving-to-fixed and make the two consistent.
        workers: threads for the two directions, solved side by side
            (:func:`synthvox.registration.parallel.run_tasks`).
    """
    shape = tuple(int(s) for s in feat_fixed.shape[1:])
    ff, fm = pool(feat_fixed, grid), pool(feat_moving, grid)
    wf = pool(weight_fixed[None].float(), grid)[0] if weight_fixed is not None else None
    wm = pool(weight_moving[None].float(), grid)[0] if weight_moving is not None else None
    tasks = [lambda: coupled_convex(cost_volume(ff, fm, radius, wf, wm), radius)]
    if inverse_consistent:
        tasks.append(lambda: coupled_convex(cost_volume(fm, ff, radius, wm, wf), radius))
    fields = run_tasks(tasks, workers)
    fwd = fields[0]
    if inverse_consistent:
        fwd, _ = inverse_consistency(fwd, fields[1])
    return upsample_field(fwd, grid, shape)  # type: ignore[arg-type]
