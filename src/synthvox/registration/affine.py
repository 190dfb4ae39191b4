"""The affine stage: a residual affine fitted on features.

:func:`fit_affine` makes an exhaustive translation search at the coarsest level (so a start tens of
millimetres off is recovered), then runs Adam on the 12 parameters of an affine in a coarse-to-fine
pyramid, minimising the weighted mean squared feature difference (points outside MOVING's field of view
count as the worst case), with the rotation prior of :mod:`synthvox.registration.rotation`;
:func:`affine_cost` is that cost for a given matrix and :func:`improves` says when a fit is worth taking.

Every transform is a 4x4 matrix mapping FIXED's world (RAS, mm) to MOVING's world.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from synthvox.registration.adam import Adam
from synthvox.registration.convex import pool
from synthvox.registration.grids import pooled_affine
from synthvox.registration.rotation import PRIOR_FREE_DEG
from synthvox.registration.sampling import sample_points
from synthvox.registration.warp import transform_points, world_points
from synthvox.volume import normalise_coords, spacing_of


def _sample(vol: torch.Tensor, vox: torch.Tensor, workers: int = 1) -> torch.Tensor:
    """Sample ``(C, X, Y, Z)`` at ``(N, 3)`` voxel positions (zeros outside) -> ``(C, N)``."""
    return sample_points(vol, normalise_coords(vox, tuple(vol.shape[1:])), "zeros", workers)


def _correlate(inp: torch.Tensor, ker: torch.Tensor) -> torch.Tensor:
    """``F.conv3d(inp[None], ker[None])[0, 0]`` (a cross-correlation summed over channels, valid shifts
    only) by FFT, in float64: a kernel the size of the fixed grid makes the direct convolution slow
    (a gigabyte of im2col for a +-64 mm search), the FFT takes milliseconds. No wrap-around reaches
    the valid shifts."""
    size = tuple(int(v) for v in inp.shape[1:])
    dims = (1, 2, 3)
    fi = torch.fft.rfftn(inp.double(), s=size, dim=dims)
    fk = torch.fft.rfftn(ker.double(), s=size, dim=dims)
    out = torch.fft.irfftn((fi * fk.conj()).sum(0), s=size, dim=(0, 1, 2))
    nx, ny, nz = (int(a) - int(b) + 1 for a, b in zip(size, ker.shape[1:]))
    return out[:nx, :ny, :nz].to(inp.dtype)


def _translation_search(ff: torch.Tensor, wf: torch.Tensor, fa: np.ndarray, mv: torch.Tensor, ma: np.ndarray,
                        start: torch.Tensor, search_mm: float) -> torch.Tensor:
    """Best translation (mm, moving-grid world) on a lattice of the grid's step, all shifts at once.

    The cost of every shift is a correlation, computed with ``conv3d``:
    ``sum w val |f - m|^2 = sum w val |f|^2 - 2 sum w f.(val m) + sum w val |m|^2`` (``val``: MOVING's
    weight channel), plus the out-of-bounds penalty ``2 sum w (1 - val)``. Needs both grids to share axes and spacing; MOVING's grid is
    resampled through ``start`` onto a lattice aligned with the fixed grid first.
    """
    step = float(spacing_of(fa).mean())
    n = max(1, int(np.floor(search_mm / step)))
    shape = tuple(int(v) + 2 * n for v in ff.shape[1:])
    ext = np.array(fa, dtype=np.float64)
    ext[:3, 3] = fa[:3, :3] @ np.full(3, -float(n)) + fa[:3, 3]
    # moving features on the fixed lattice extended by n voxels, through the current transform
    x = world_points(shape, ext, device=ff.device)  # type: ignore[arg-type]
    vox = transform_points(transform_points(x, start), np.linalg.inv(ma))
    pos = normalise_coords(vox.float(), tuple(mv.shape[1:]))
    region = F.grid_sample(mv[None], pos[None], mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    n_ch = ff.shape[0]
    m, val = region[:n_ch], region[n_ch:]
    w = wf[None]
    conv = _correlate
    # the weighted cost sum w val |f - m|^2, exact for fractional validity and for moving features that
    # are not zero where they are invalid (MIND of the zero padding is all ones)
    a = conv(val, w * ff.pow(2).sum(0, keepdim=True))
    b = conv(m * val, w * ff)
    c = conv(m.pow(2).sum(0, keepdim=True) * val, w)
    d = conv(val, w)
    total = w.sum()
    cost = (a - 2 * b + c + 2.0 * (total - d)) / total.clamp_min(1e-6)
    # numpy's: torch.unravel_index imports sympy (1 s) on its first call
    idx = np.unravel_index(int(cost.argmin()), tuple(cost.shape))
    k = torch.tensor([float(i) - n for i in idx], dtype=torch.float64, device=ff.device)
    # a shift of k lattice steps along the fixed axes, in world mm; through the (near-rigid) start transform
    shift_fixed = torch.as_tensor(fa[:3, :3], device=ff.device) @ k
    shift = torch.as_tensor(start[:3, :3], dtype=torch.float64, device=ff.device) @ shift_fixed
    return shift, float(cost.min())


#: Adam's epsilon in the affine fit: about the size of the gradient near a good optimum, so that a
#: gradient much smaller than that (an image registered onto itself) moves the parameters by much less
#: than the learning rate instead of by the learning rate (Adam's usual normalisation).
ADAM_EPS = 1e-3


def improves(before: float, after: float, rel: float = 0.02, abs_tol: float = 1e-4) -> bool:
    """Whether a fit's cost ``after`` is worth taking over ``before``: lower by more than what pooling and
    sampling alone change (``rel`` of ``before`` plus ``abs_tol``). Below that, the start is kept
    exactly, so an image registered onto itself stays at the identity."""
    return after < before - rel * abs(before) - abs_tol


def _cached(cache: dict | None, key: tuple, make: Callable[[], Any]) -> Any:
    """``cache[key]``, made by ``make()`` the first time (no cache: made every time)."""
    if cache is None:
        return make()
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _pool_moving(feat_moving: torch.Tensor, weight_moving: torch.Tensor, factor: int) -> torch.Tensor:
    """MOVING's features and (last channel) weight, pooled by ``factor`` (each pooled, then joined: no
    copy of the full-resolution features)."""
    return torch.cat([pool(feat_moving.float(), factor), pool(weight_moving[None].float(), factor)], dim=0)


def _level_points(feat_fixed: torch.Tensor, fixed_affine: np.ndarray, weight_fixed: torch.Tensor, factor: int,
                  max_points: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed world points, their features and weights on a grid pooled by ``factor`` (weighted region only)."""
    ff = pool(feat_fixed.float(), factor)
    wf = pool(weight_fixed[None].float(), factor)[0]
    fa = pooled_affine(fixed_affine, factor)
    keep = wf.reshape(-1) > 1e-3
    x = world_points(tuple(ff.shape[1:]), fa, device=ff.device).reshape(-1, 3)[keep]
    target = ff.reshape(ff.shape[0], -1)[:, keep]
    w = wf.reshape(-1)[keep]
    if x.shape[0] > max_points:
        sub = torch.arange(0, x.shape[0], x.shape[0] // max_points + 1, device=ff.device)
        x, target, w = x[sub], target[:, sub], w[sub]
    return x, target, w


def _points_cost(z: torch.Tensor, target: torch.Tensor, w: torch.Tensor, mv: torch.Tensor,
                 inv_ma: torch.Tensor, wm: torch.Tensor, inv_wa: torch.Tensor, workers: int = 1) -> torch.Tensor:
    """Weighted mean squared feature difference at moving-grid world points ``z``.

    ``mv`` (pooled features, grid ``inv_ma``) and ``wm`` (the moving weight at full resolution, grid
    ``inv_wa``: pooling would blur the edge of the field of view inwards); points where the moving
    weight is zero count as the worst case (2).
    """
    vox = z @ inv_ma[:3, :3].T + inv_ma[:3, 3]
    s = _sample(mv, vox.float(), workers)
    val = _sample(wm[None], (z @ inv_wa[:3, :3].T + inv_wa[:3, 3]).float(), workers)[0]
    ww = w * val
    sq = (s - target).pow(2).sum(0)
    return ((ww * sq).sum() + ((w - ww) * 2.0).sum()) / w.sum().clamp_min(1e-6)


def affine_cost(feat_fixed: torch.Tensor, fixed_affine: np.ndarray, feat_moving: torch.Tensor,
                moving_affine: np.ndarray, matrix: np.ndarray, *, weight_fixed: torch.Tensor | None = None,
                weight_moving: torch.Tensor | None = None, factor: int = 1, max_points: int = 200_000,
                cache: dict | None = None, workers: int = 1) -> float:
    """The cost :func:`fit_affine` minimises, for a given residual ``matrix``, on a grid pooled by ``factor``
    (``cache`` and ``workers``: as :func:`fit_affine`'s)."""
    device = feat_fixed.device
    wf = torch.ones(feat_fixed.shape[1:], device=device) if weight_fixed is None else weight_fixed.float()
    wm = torch.ones(feat_moving.shape[1:], device=device) if weight_moving is None else weight_moving.float()
    x, target, w = _cached(cache, ("points", factor, max_points),
                           lambda: _level_points(feat_fixed, fixed_affine, wf, factor, max_points))
    mv = _cached(cache, ("moving", factor), lambda: _pool_moving(feat_moving, wm, factor))[:-1]
    inv_ma = torch.as_tensor(np.linalg.inv(pooled_affine(moving_affine, factor)), device=device)
    inv_wa = torch.as_tensor(np.linalg.inv(moving_affine), device=device)
    m = torch.as_tensor(np.asarray(matrix, np.float64), device=device)
    with torch.no_grad():
        return float(_points_cost(x @ m[:3, :3].T + m[:3, 3], target, w, mv, inv_ma, wm, inv_wa, workers))


def _settle(step: int, n: int) -> float:
    """Learning-rate factor: constant for the first half of ``n`` steps, then a cosine down to zero."""
    half = n / 2.0
    if step < half:
        return 1.0
    return 0.5 * (1.0 + float(np.cos(np.pi * min(step - half, half) / max(half, 1.0))))


def fit_affine(
    feat_fixed: torch.Tensor,
    fixed_affine: np.ndarray,
    feat_moving: torch.Tensor,
    moving_affine: np.ndarray,
    *,
    weight_fixed: torch.Tensor | None = None,
    weight_moving: torch.Tensor | None = None,
    levels: tuple[int, ...] = (4, 2),
    iters: tuple[int, ...] = (80, 40),
    search_mm: float = 32.0,
    lr: float = 0.01,
    rigid_only: bool = False,
    max_scale: float = 1.3,
    max_shear: float = 0.15,
    max_points: int = 20_000,
    start_rotation: np.ndarray | None = None,
    prior_weight: float = 0.0,
    start_translation: np.ndarray | None = None,
    cache: dict | None = None,
    workers: int = 1,
) -> np.ndarray:
    """Fit a residual affine ``Q`` (fixed world to the moving grid's world) on features.

    The learning rate stays constant for the first half of each level, then decays to zero (cosine),
    so the fit settles on the optimum instead of wandering around it.

    Args:
        feat_fixed: ``(C, X, Y, Z)`` fixed features on a grid with affine ``fixed_affine``.
        fixed_affine: the fixed features' grid.
        feat_moving: ``(C, X', Y', Z')`` moving features; ``moving_affine`` places them in fixed world.
        moving_affine: the moving features' grid.
        weight_fixed: optional ``(X, Y, Z)`` weights (mask or foreground) on the fixed grid.
        weight_moving: optional ``(X', Y', Z')`` weights on the moving grid (zero: outside MOVING).
        levels: pooling factors of the pyramid, coarse to fine.
        iters: Adam steps per level.
        search_mm: half-width of the exhaustive translation search at the coarsest level (0 skips it).
        lr: Adam learning rate (radians / relative scale per step; translations in units of 50 mm).
        rigid_only: keep the linear part a rotation (skip scaling and shear).
        max_scale: largest scaling along an axis (and smallest, as its inverse).
        max_shear: largest shear coefficient.
        max_points: fixed points used per level (an even subsample of the weighted region).
        start_rotation: rotation (3x3) already applied before ``Q`` relative to the headers; the prior
            acts on the whole rotation ``start_rotation @ R(Q)``.
        prior_weight: weight of the prior against rotations far from the headers' (0 turns it off):
            ``prior_weight * max(0, cos(PRIOR_FREE_DEG) - cos angle)``.
        start_translation: translation (mm) of ``Q`` to start from (the search, if any, starts there).
        cache: a dict shared by calls on the same features and weights (the pooled moving features
            and the fixed points of each level are made once).
        workers: threads sharing the sampling of the moving features
            (:func:`synthvox.registration.sampling.sample_points`; the result does not depend on it).

    Returns:
        4x4 matrix ``Q`` with ``z = Q x`` the moving grid's world position of fixed point ``x``.
    """
    device = feat_fixed.device
    wf_full = torch.ones(feat_fixed.shape[1:], device=device) if weight_fixed is None else weight_fixed.float()
    wm_full = torch.ones(feat_moving.shape[1:], device=device) if weight_moving is None else weight_moving.float()
    radius = 50.0
    # centre of rotation: weighted centre of the fixed grid
    pts_full = world_points(tuple(wf_full.shape), fixed_affine, device=device)
    centre = (pts_full * wf_full[..., None].double()).reshape(-1, 3).sum(0) / wf_full.sum().double().clamp_min(1e-6)
    rot = torch.zeros(3, 3, dtype=torch.float64, device=device, requires_grad=True)
    log_scale = torch.zeros(3, dtype=torch.float64, device=device, requires_grad=True)
    shear = torch.zeros(3, dtype=torch.float64, device=device, requires_grad=True)
    trans = torch.zeros(3, dtype=torch.float64, device=device, requires_grad=True)
    if start_translation is not None:
        trans.data += torch.as_tensor(np.asarray(start_translation, np.float64), device=device) / radius
    iu = torch.triu_indices(3, 3, offset=1, device=device)
    s_max = float(np.log(max_scale))
    inv_wa = torch.as_tensor(np.linalg.inv(moving_affine), device=device)
    r0 = torch.as_tensor(np.eye(3) if start_rotation is None else np.asarray(start_rotation, np.float64), device=device)

    def rotation() -> torch.Tensor:
        return torch.linalg.matrix_exp(rot.triu(1) - rot.triu(1).T)

    def matrix(rot_m: torch.Tensor | None = None) -> torch.Tensor:
        # rotation x bounded scaling x bounded shear: the fit cannot shrink MOVING to hide a smaller
        # field of view (an unconstrained affine squeezes it to keep every fixed point inside)
        a = rotation() if rot_m is None else rot_m
        if not rigid_only:
            up = torch.zeros(3, 3, dtype=torch.float64, device=device)
            up = up.index_put((iu[0], iu[1]), max_shear * torch.tanh(shear))
            a = a @ torch.diag(torch.exp(s_max * torch.tanh(log_scale))) @ (torch.eye(3, dtype=torch.float64, device=device) + up)
        m = torch.eye(4, dtype=torch.float64, device=device)
        m = m.clone()
        m[:3, :3] = a
        m[:3, 3] = centre - a @ centre + radius * trans
        return m

    for li, (factor, n_iter) in enumerate(zip(levels, iters)):
        x, target, w = _cached(cache, ("points", factor, max_points),
                               lambda f=factor: _level_points(feat_fixed, fixed_affine, wf_full, f, max_points))
        mv = _cached(cache, ("moving", factor), lambda f=factor: _pool_moving(feat_moving, wm_full, f))
        ma = pooled_affine(moving_affine, factor)
        inv_ma = torch.as_tensor(np.linalg.inv(ma), device=device)
        mv_feat = mv[:-1]
        if li == 0 and search_mm > 0:
            with torch.no_grad():
                ff, wf = _cached(cache, ("grid", factor), lambda f=factor: (pool(feat_fixed.float(), f),
                                                                             pool(wf_full[None], f)[0]))
                best, _ = _translation_search(ff, wf, pooled_affine(fixed_affine, factor), mv, ma,
                                              matrix().detach(), search_mm)
                trans.data += best / radius
        opt = Adam([rot, log_scale, shear, trans], lr=lr, eps=ADAM_EPS)
        for k in range(n_iter):
            opt.lr = lr * _settle(k, max(n_iter, 1))  # as torch's LambdaLR with _settle
            opt.zero_grad(set_to_none=True)
            r = rotation()  # once per step, for the transform and the prior
            m = matrix(r)
            loss = _points_cost(x @ m[:3, :3].T + m[:3, 3], target, w, mv_feat, inv_ma, wm_full, inv_wa, workers)
            if prior_weight > 0:
                cos = (torch.trace(r0 @ r) - 1.0) / 2.0
                loss = loss + prior_weight * torch.relu(float(np.cos(np.radians(PRIOR_FREE_DEG))) - cos)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return matrix().cpu().numpy()
