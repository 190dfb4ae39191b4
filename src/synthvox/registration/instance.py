"""Adam instance optimisation of a dense displacement field (the "Adam" half of ConvexAdam).

The field lives on a grid coarser than the features by ``stride``; it is smoothed by three passes of
a 3x3x3 box filter (a cheap B-spline-like kernel) before use, and regularised by the diffusion
energy (mean squared finite differences) and, optionally, a penalty on Jacobian determinants near or
below zero (folding). The data term is the sum of squared feature differences,
optionally weighted by masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from synthvox.registration.adam import Adam
from synthvox.registration.convex import box3, pool, upsample_field
from synthvox.registration.sampling import sample_points
from synthvox.volume import normalise_coords, sample_at, voxel_grid


def diffusion(field: torch.Tensor) -> torch.Tensor:
    """Mean squared forward differences of a ``(3, X, Y, Z)`` field along each axis, summed."""
    dx = field[:, 1:] - field[:, :-1]
    dy = field[:, :, 1:] - field[:, :, :-1]
    dz = field[:, :, :, 1:] - field[:, :, :, :-1]
    return dx.pow(2).mean() + dy.pow(2).mean() + dz.pow(2).mean()


def jacobian_det(field: torch.Tensor) -> torch.Tensor:
    """Determinant of ``I + grad u`` of a ``(3, X, Y, Z)`` displacement in voxels (central differences
    inside, one-sided at the borders, as :func:`synthvox.metrics.jacobian_determinant`); differentiable.

    Written out by cofactors: six times faster than ``torch.linalg.det`` on a batch of 3x3 matrices on
    the CPU, forward and backward, which matters in the Adam loop."""
    (a, b, c), (d, e, f), (g, h, i) = (torch.gradient(field[k], dim=(0, 1, 2)) for k in range(3))
    a, e, i = a + 1, e + 1, i + 1
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


def folding_penalty(field: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """Mean of ``relu(margin - det J)^2``: zero where the map keeps at least ``margin`` of each volume,
    growing where it shrinks space towards folding (``det J <= 0``)."""
    return F.relu(margin - jacobian_det(field)).pow(2).mean()


def instance_optimise(
    feat_fixed: torch.Tensor,
    feat_moving: torch.Tensor,
    init: torch.Tensor | None = None,
    *,
    stride: int = 1,
    iters: int = 80,
    lam: float = 1.25,
    lr: float = 1.0,
    weight_fixed: torch.Tensor | None = None,
    weight_moving: torch.Tensor | None = None,
    fold_weight: float = 0.0,
    region: torch.Tensor | None = None,
    tol: float = 0.0,
    patience: int = 10,
    stats: dict | None = None,
    workers: int = 1,
    subsample: int = 1,
) -> torch.Tensor:
    """Refine a displacement field by Adam on feature SSD with diffusion regularisation.

    Args:
        feat_fixed: ``(C, X, Y, Z)`` fixed features.
        feat_moving: moving features on the same grid.
        init: ``(3, X, Y, Z)`` starting displacement in voxels (zeros when ``None``).
        stride: the field's grid spacing in feature voxels (features are pooled by it).
        iters: Adam steps.
        lam: weight of the diffusion energy.
        lr: Adam learning rate (in field voxels).
        weight_fixed: optional fixed mask ``(X, Y, Z)``.
        weight_moving: optional moving mask on the same grid, warped with the field.
        fold_weight: weight of :func:`folding_penalty` (0 turns it off).
        region: optional ``(X, Y, Z)`` boolean mask of where the data term is evaluated (the object
            and a margin around it): the field still spans the whole grid (regularised everywhere),
            but the features are sampled only there, each point counting as much as without it
            (the data term is scaled by the region's share of the grid). Elsewhere, where both
            images are background, the data term has next to no gradient.
        tol: early stop: after every ``patience`` steps, stop when the mean loss of those steps fell by
            less than ``tol`` (relative) from the ``patience`` steps before (0: always ``iters`` steps).
        patience: the window of the early stop.
        stats: when given, filled with ``steps`` (the steps taken) and ``loss`` (the last loss).
        workers: threads sharing the sampling of the moving features
            (:func:`synthvox.registration.sampling.sample_points`; the result does not depend on it).
        subsample: each step evaluates the data term on every ``subsample``-th point of the region
            only, the next step on the next share, in turn (a stochastic estimate of the same mean):
            on four brain pairs 2 halved the sampling for 0.0005 mean Dice.

    Returns:
        ``(3, X, Y, Z)`` displacement in voxels of the features' grid.
    """
    shape = tuple(int(s) for s in feat_fixed.shape[1:])
    ff = pool(feat_fixed.float(), stride)
    fm = pool(feat_moving.float(), stride)
    cshape = tuple(int(s) for s in ff.shape[1:])
    mov = fm
    if weight_moving is not None:
        mov = torch.cat([fm, pool(weight_moving[None].float(), stride)], dim=0)
    wf = pool(weight_fixed[None].float(), stride)[0] if weight_fixed is not None else None
    if init is None:
        start = torch.zeros((3, *cshape), device=ff.device)
    else:
        # the field is smoothed before use, so start from the pooled initial field
        centres = voxel_grid(cshape, device=ff.device) * stride + (stride - 1) / 2.0  # type: ignore[arg-type]
        start = sample_at(init.float(), centres, mode="linear", padding="border") / stride
    param = torch.nn.Parameter(start.clone())
    opt = Adam([param], lr=lr)
    n_ch = ff.shape[0]
    grid = voxel_grid(cshape, device=ff.device).reshape(-1, 3)  # type: ignore[arg-type]
    points = torch.arange(grid.shape[0], device=ff.device)
    share = 1.0
    if region is not None:
        keep = (pool(region[None].float(), stride)[0] > 0).reshape(-1)
        if bool(keep.any()):
            share = float(keep.float().mean())
            points = keep.nonzero()[:, 0]
    ff, wf = ff.reshape(n_ch, -1), None if wf is None else wf.reshape(-1)
    # the points of each step, in turn: every ``subsample``-th point of the region, each set with its
    # fixed features, weights and positions gathered once
    draws = [(p, ff[:, p], None if wf is None else wf[p], grid[p])
             for p in (points[k :: max(1, subsample)] for k in range(max(1, subsample)))]
    losses: list[float] = []
    with torch.enable_grad():
        for step in range(iters):
            opt.zero_grad(set_to_none=True)
            disp = box3(param, passes=3)
            kept, ff_k, wf_k, at_rest = draws[step % len(draws)]
            at = disp.reshape(3, -1).index_select(1, kept).T
            sampled = sample_points(mov, normalise_coords(at_rest + at, cshape), "border", workers)
            sq = (sampled[:n_ch] - ff_k).pow(2).sum(0)
            if weight_moving is not None or wf_k is not None:
                w = torch.ones_like(sq)
                if wf_k is not None:
                    w = w * wf_k
                if weight_moving is not None:
                    w = w * sampled[n_ch]
                data = share * (w * sq).sum() / w.sum().clamp_min(1.0)
            else:
                data = share * sq.mean()
            loss = data + lam * diffusion(disp)
            if fold_weight > 0:
                loss = loss + fold_weight * folding_penalty(disp)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            n = len(losses)
            if tol > 0 and n >= 2 * patience and n % patience == 0:
                before = sum(losses[-2 * patience : -patience]) / patience
                now = sum(losses[-patience:]) / patience
                if before - now < tol * abs(before):  # a plateau: more steps would be wasted
                    break
    if stats is not None:
        stats["steps"] = len(losses)
        stats["loss"] = losses[-1] if losses else float("nan")
    with torch.no_grad():
        disp = box3(param.detach(), passes=3)
    return upsample_field(disp, stride, shape)  # type: ignore[arg-type]
