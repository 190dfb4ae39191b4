"""Initial alignment and the affine stage.

* :func:`foreground` finds the object in an image of any modality (Otsu threshold of a smoothed copy).
* :func:`initial_candidates` aligns centres of mass (``"com"``) or centres and principal axes
  (``"moments"``: every sign choice of the axes, and the header's own orientation) of the two
  foregrounds in world space; :func:`choose_initial` keeps the candidate whose coarse MIND features
  match best after an exhaustive translation search (+-64 mm), so headers tens of millimetres off and
  foregrounds cut differently by the two fields of view are both handled.
* :func:`fit_affine` refines it on features: an exhaustive translation search at the coarsest level
  (so a start tens of millimetres off is recovered), then Adam on the 12 parameters of an affine in a
  coarse-to-fine pyramid, minimising the weighted mean squared feature difference.

Every transform is a 4x4 matrix mapping FIXED's world (RAS, mm) to MOVING's world.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from synthvox.errors import InputError
from synthvox.registration.convex import box3, pool
from synthvox.registration.warp import transform_points, world_points
from synthvox.volume import Volume, normalise_coords, resample_to_grid, spacing_of

INIT_METHODS = ("none", "com", "moments")


def otsu_threshold(values: torch.Tensor, bins: int = 128) -> float:
    """Otsu's threshold of a 1D tensor of values."""
    v = values.float().reshape(-1)
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    hist = torch.histc(v, bins=bins, min=lo, max=hi).double()
    centres = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)[:-1] + (hi - lo) / bins / 2
    w0 = hist.cumsum(0)
    w1 = hist.sum() - w0
    m0 = (hist * centres).cumsum(0) / w0.clamp_min(1e-12)
    m1 = ((hist * centres).sum() - (hist * centres).cumsum(0)) / w1.clamp_min(1e-12)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(between.argmax())])


def foreground(image: torch.Tensor) -> torch.Tensor:
    """Boolean ``(X, Y, Z)`` foreground of a ``(1, X, Y, Z)`` image (any modality).

    Raises:
        InputError: the image is constant.
    """
    x = image[0].float()
    if float(x.max() - x.min()) <= 0:
        raise InputError("an input image is constant: there is nothing to register")
    smooth = box3(x[None], passes=2)[0]
    flat = smooth.reshape(-1)
    if flat.numel() > 1_000_000:
        flat = flat[:: flat.numel() // 1_000_000 + 1]
    lo, hi = torch.quantile(flat, torch.tensor([0.001, 0.999], device=flat.device))
    t = otsu_threshold(flat.clamp(float(lo), float(hi)))
    mask = smooth > t
    if not bool(mask.any()):
        mask = smooth >= smooth.max()
    return mask


def _mask_points(mask: torch.Tensor, affine: np.ndarray, max_points: int = 200_000) -> torch.Tensor:
    idx = torch.nonzero(mask).to(torch.float64)
    if idx.shape[0] > max_points:
        idx = idx[:: idx.shape[0] // max_points + 1]
    a = torch.as_tensor(np.asarray(affine, np.float64))
    return idx @ a[:3, :3].T + a[:3, 3]


def _moments(mask: torch.Tensor, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pts = _mask_points(mask.cpu(), affine).numpy()
    centre = pts.mean(0)
    cov = np.cov((pts - centre).T)
    _, vecs = np.linalg.eigh(cov)
    return centre, vecs


def _rigid(rotation: np.ndarray, c_fixed: np.ndarray, c_moving: np.ndarray) -> np.ndarray:
    t = np.eye(4)
    t[:3, :3] = rotation
    t[:3, 3] = c_moving - rotation @ c_fixed
    return t


def initial_candidates(fixed: Volume, moving: Volume, method: str = "moments",
                       fixed_fg: torch.Tensor | None = None, moving_fg: torch.Tensor | None = None) -> list[np.ndarray]:
    """First fixed-world to moving-world transforms from the two images' foregrounds (best guess first).

    Args:
        fixed: single-channel fixed image (any grid).
        moving: single-channel moving image (any grid).
        method: ``"none"`` (the headers as they are), ``"com"`` (translate the centres of mass of the
            foregrounds onto each other) or ``"moments"`` (also rotate the principal axes onto each other
            when that increases the foregrounds' overlap).
        fixed_fg: optional precomputed fixed foreground (or mask) on the fixed grid.
        moving_fg: optional precomputed moving foreground on the moving grid.
    """
    if method not in INIT_METHODS:
        raise InputError(f"unknown --init {method!r}: use one of {', '.join(INIT_METHODS)}")
    if method == "none":
        return [np.eye(4)]
    ff = foreground(fixed.data) if fixed_fg is None else fixed_fg.bool()
    mf = foreground(moving.data) if moving_fg is None else moving_fg.bool()
    cf, vf = _moments(ff, fixed.affine)
    cm, vm = _moments(mf, moving.affine)
    candidates = [_rigid(np.eye(3), cf, cm)]
    if method == "moments":
        for signs in itertools.product((1.0, -1.0), repeat=3):
            rot = vm @ np.diag(signs) @ vf.T
            if np.linalg.det(rot) > 0:
                candidates.append(_rigid(rot, cf, cm))
    return candidates


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


def pooled_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    """The affine of a grid average-pooled by ``factor``."""
    scale = np.eye(4)
    scale[:3, :3] *= factor
    scale[:3, 3] = (factor - 1) / 2.0
    return np.asarray(affine) @ scale


def extended_grid(working_affine: np.ndarray, moving: Volume, world: np.ndarray,
                  max_size: int = 256) -> tuple[tuple[int, int, int], np.ndarray]:
    """A grid with the working grid's axes and spacing covering all of MOVING, pulled back through ``world``.

    Moving resampled onto it is roughly aligned with the working grid (same axes), so features computed
    on it are comparable to the fixed image's, and nothing of MOVING is cut off.
    """
    inv_w = np.linalg.inv(working_affine)
    inv_t = np.linalg.inv(world)
    c = np.array(list(itertools.product(*[(-0.5, s - 0.5) for s in moving.shape])), dtype=np.float64)
    mc = c @ moving.affine[:3, :3].T + moving.affine[:3, 3]
    mc = mc @ inv_t[:3, :3].T + inv_t[:3, 3]
    vox = mc @ inv_w[:3, :3].T + inv_w[:3, 3]
    lo = np.floor(vox.min(0))
    hi = np.ceil(vox.max(0))
    shape = np.clip(hi - lo + 1, 2, max_size).astype(int)
    start = np.where(hi - lo + 1 > max_size, np.round((lo + hi) / 2 - max_size / 2), lo)
    shift = np.eye(4)
    shift[:3, 3] = start
    return tuple(int(s) for s in shape), np.asarray(working_affine) @ shift  # type: ignore[return-value]


def resample_through(moving: Volume, world: np.ndarray, shape: tuple[int, int, int], affine: np.ndarray,
                     mode: str = "linear") -> Volume:
    """MOVING sampled at ``world(affine @ v)`` for every voxel ``v`` of the grid (``shape``, ``affine``)."""
    return resample_to_grid(Volume(moving.data, np.linalg.inv(world) @ moving.affine), shape,
                            np.asarray(affine) @ np.eye(4), mode=mode)


def _sample(vol: torch.Tensor, vox: torch.Tensor) -> torch.Tensor:
    """Sample ``(C, X, Y, Z)`` at ``(N, 3)`` voxel positions (zeros outside) -> ``(C, N)``."""
    pos = normalise_coords(vox, tuple(vol.shape[1:]))
    return F.grid_sample(vol[None], pos.view(1, -1, 1, 1, 3), mode="bilinear", padding_mode="zeros",
                         align_corners=True)[0, :, :, 0, 0]


def _translation_search(ff: torch.Tensor, wf: torch.Tensor, fa: np.ndarray, mv: torch.Tensor, ma: np.ndarray,
                        start: torch.Tensor, search_mm: float) -> torch.Tensor:
    """Best translation (mm, moving-grid world) on a lattice of the grid's step, all shifts at once.

    The cost of every shift is a correlation, computed with ``conv3d``:
    ``sum w |f - m|^2 = sum w val |f|^2 - 2 sum w f.m + sum w |m|^2`` (``m`` is zero outside MOVING),
    plus the out-of-bounds penalty. Needs both grids to share axes and spacing; MOVING's grid is
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
    conv = lambda inp, ker: F.conv3d(inp[None], ker[None])[0, 0]  # noqa: E731
    a = conv(val, w * ff.pow(2).sum(0, keepdim=True))
    b = conv(m, w * ff)
    c = conv(m.pow(2).sum(0, keepdim=True), w)
    d = conv(val, w)
    total = w.sum()
    cost = (a - 2 * b + c + 2.0 * (total - d)) / total.clamp_min(1e-6)
    idx = torch.unravel_index(cost.argmin(), cost.shape) if hasattr(torch, "unravel_index") else np.unravel_index(int(cost.argmin()), tuple(cost.shape))
    k = torch.tensor([float(i) - n for i in idx], dtype=torch.float64, device=ff.device)
    # a shift of k lattice steps along the fixed axes, in world mm; through the (near-rigid) start transform
    shift_fixed = torch.as_tensor(fa[:3, :3], device=ff.device) @ k
    shift = torch.as_tensor(start[:3, :3], dtype=torch.float64, device=ff.device) @ shift_fixed
    return shift, float(cost.min())


def choose_initial(fixed_w: Volume, weight_w: torch.Tensor, moving: Volume, candidates: list[np.ndarray],
                   search_mm: float = 64.0, factor: int = 2) -> np.ndarray:
    """Pick the candidate transform (plus a translation) whose coarse MIND features match best.

    Each candidate is followed by an exhaustive translation search of +-``search_mm`` on a lattice of
    ``2 * factor`` working voxels; the lowest cost wins. Cheap: MIND on grids twice as coarse as the
    working grid.

    Args:
        fixed_w: FIXED on the working grid.
        weight_w: fixed weights (foreground) on the working grid.
        moving: MOVING on its own grid.
        candidates: fixed-world to moving-world transforms to try.
        search_mm: translation search half-width.
        factor: coarsening of the working grid for the features.
    """
    from synthvox.registration.features import robust_unit_range
    from synthvox.registration.mind import mind_ssc
    from synthvox.volume import grid_for_spacing

    s = float(spacing_of(fixed_w.affine).min())
    cshape, caff = grid_for_spacing(fixed_w.shape, fixed_w.affine, s * factor)
    fc = resample_to_grid(fixed_w, cshape, caff)
    wc = resample_to_grid(Volume(weight_w[None].float(), fixed_w.affine), cshape, caff).data[0]
    ff = pool(mind_ssc(robust_unit_range(fc.data)), 2)
    wf = pool(wc[None], 2)[0]
    fa = pooled_affine(caff, 2)
    best, best_cost = candidates[0], float("inf")
    for cand in candidates:
        eshape, eaff = extended_grid(caff, moving, cand)
        me = resample_through(moving, cand, eshape, eaff)
        valid = resample_through(Volume(torch.ones_like(moving.data), moving.affine), cand, eshape, eaff).data
        mv = pool(torch.cat([mind_ssc(robust_unit_range(me.data)), valid], dim=0), 2)
        shift, cost = _translation_search(ff, wf, fa, mv, pooled_affine(eaff, 2),
                                          torch.eye(4, dtype=torch.float64), search_mm)
        if cost < best_cost:
            q = np.eye(4)
            q[:3, 3] = shift.cpu().numpy()
            best, best_cost = cand @ q, cost
    return best


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
) -> np.ndarray:
    """Fit a residual affine ``Q`` (fixed world to the moving grid's world) on features.

    Args:
        feat_fixed: ``(C, X, Y, Z)`` fixed features on a grid with affine ``fixed_affine``.
        fixed_affine: the fixed features' grid.
        feat_moving: ``(C, X', Y', Z')`` moving features; ``moving_affine`` places them in fixed world.
        moving_affine: the moving features' grid.
        weight_fixed: optional ``(X, Y, Z)`` weights (mask or foreground) on the fixed grid.
        weight_moving: optional ``(X', Y', Z')`` weights on the moving grid.
        levels: pooling factors of the pyramid, coarse to fine.
        iters: Adam steps per level.
        search_mm: half-width of the exhaustive translation search at the coarsest level (0 skips it).
        lr: Adam learning rate (radians / relative scale per step; translations in units of 50 mm).
        rigid_only: keep the linear part a rotation (skip scaling and shear).
        max_scale: largest scaling along an axis (and smallest, as its inverse).
        max_shear: largest shear coefficient.
        max_points: fixed points used per level (an even subsample of the weighted region).

    Returns:
        4x4 matrix ``Q`` with ``z = Q x`` the moving grid's world position of fixed point ``x``.
    """
    device = feat_fixed.device
    wf_full = torch.ones(feat_fixed.shape[1:], device=device) if weight_fixed is None else weight_fixed.float()
    wm_full = torch.ones(feat_moving.shape[1:], device=device) if weight_moving is None else weight_moving.float()
    mov_full = torch.cat([feat_moving.float(), wm_full[None]], dim=0)
    radius = 50.0
    # centre of rotation: weighted centre of the fixed grid
    pts_full = world_points(tuple(wf_full.shape), fixed_affine, device=device)
    centre = (pts_full * wf_full[..., None].double()).reshape(-1, 3).sum(0) / wf_full.sum().double().clamp_min(1e-6)
    rot = torch.zeros(3, 3, dtype=torch.float64, device=device, requires_grad=True)
    log_scale = torch.zeros(3, dtype=torch.float64, device=device, requires_grad=True)
    shear = torch.zeros(3, dtype=torch.float64, device=device, requires_grad=True)
    trans = torch.zeros(3, dtype=torch.float64, device=device, requires_grad=True)
    iu = torch.triu_indices(3, 3, offset=1, device=device)
    s_max = float(np.log(max_scale))

    def matrix() -> torch.Tensor:
        # rotation x bounded scaling x bounded shear: the fit cannot shrink MOVING to hide a smaller
        # field of view (an unconstrained affine squeezes it to keep every fixed point inside)
        a = torch.linalg.matrix_exp(rot.triu(1) - rot.triu(1).T)
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
        ff = pool(feat_fixed.float(), factor)
        wf = pool(wf_full[None], factor)[0]
        fa = pooled_affine(fixed_affine, factor)
        mv = pool(mov_full, factor)
        ma = pooled_affine(moving_affine, factor)
        keep = wf.reshape(-1) > 1e-3
        x = world_points(tuple(ff.shape[1:]), fa, device=device).reshape(-1, 3)[keep]
        target = ff.reshape(ff.shape[0], -1)[:, keep]
        w = wf.reshape(-1)[keep]
        if x.shape[0] > max_points:
            sub = torch.arange(0, x.shape[0], x.shape[0] // max_points + 1, device=device)
            x, target, w = x[sub], target[:, sub], w[sub]
        inv_ma = torch.as_tensor(np.linalg.inv(ma), device=device)
        n_ch = ff.shape[0]

        def loss_of(z: torch.Tensor, target: torch.Tensor = target, w: torch.Tensor = w,
                    mv: torch.Tensor = mv, inv_ma: torch.Tensor = inv_ma, n_ch: int = n_ch) -> torch.Tensor:
            vox = z @ inv_ma[:3, :3].T + inv_ma[:3, 3]
            s = _sample(mv, vox.float())
            ww = w * s[n_ch]
            sq = (s[:n_ch] - target).pow(2).sum(0)
            # points that fall outside MOVING count as the worst case (2 for unit-variance features)
            return ((ww * sq).sum() + ((w - ww) * 2.0).sum()) / w.sum().clamp_min(1e-6)

        if li == 0 and search_mm > 0:
            with torch.no_grad():
                best, _ = _translation_search(ff, wf, fa, mv, ma, matrix().detach(), search_mm)
                trans.data += best / radius
        opt = torch.optim.Adam([rot, log_scale, shear, trans], lr=lr)
        for _ in range(n_iter):
            opt.zero_grad(set_to_none=True)
            m = matrix()
            z = x @ m[:3, :3].T + m[:3, 3]
            loss = loss_of(z)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return matrix().cpu().numpy()
