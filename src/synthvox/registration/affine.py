"""Initial alignment and the affine stage.

* :func:`foreground` finds the object in an image of any modality (Otsu threshold of a smoothed copy).
* :func:`initial_candidates` names the starts: the headers, a translation of the foregrounds' centres
  of mass onto each other (``"com"``) and the four rotations of their principal axes onto each other
  (``"moments"``); :func:`score_candidates` refines each by an exhaustive translation search
  (+-64 mm) and a short affine on coarse MIND features, and scores it by the features' match plus a
  prior against rotations far from the headers' (:func:`rotation_prior`), so headers tens of
  millimetres off are handled and an elongated, nearly symmetric object does not come out flipped.
* :func:`fit_affine` refines it on features: an exhaustive translation search at the coarsest level
  (so a start tens of millimetres off is recovered), then Adam on the 12 parameters of an affine in a
  coarse-to-fine pyramid, minimising the weighted mean squared feature difference (points outside
  MOVING's field of view count as the worst case), with the same rotation prior.

Every transform is a 4x4 matrix mapping FIXED's world (RAS, mm) to MOVING's world.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from synthvox.errors import InputError
from synthvox.registration.convex import box3, pool
from synthvox.registration.parallel import run_tasks
from synthvox.registration.sampling import sample_points
from synthvox.registration.warp import transform_points, world_points
from synthvox.volume import Volume, affine_points, normalise_coords, resample_to_grid, spacing_of

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


#: A candidate initial transform: its name and the 4x4 fixed-world to moving-world matrix.
Candidate = tuple[str, np.ndarray]


def initial_candidates(fixed: Volume, moving: Volume, method: str = "moments",
                       fixed_fg: torch.Tensor | None = None, moving_fg: torch.Tensor | None = None) -> list[Candidate]:
    """First fixed-world to moving-world transforms, each named: the headers always come first.

    Args:
        fixed: single-channel fixed image (any grid).
        moving: single-channel moving image (any grid).
        method: ``"none"`` (the headers only), ``"com"`` (the headers and a translation of the centres
            of mass of the foregrounds onto each other) or ``"moments"`` (those two and the four proper
            rotations of the principal axes onto each other, about the centres of mass).
        fixed_fg: optional precomputed fixed foreground (or mask) on the fixed grid.
        moving_fg: optional precomputed moving foreground on the moving grid.

    Returns:
        ``[("headers", I), ("com", ...), ("axes+-+", ...), ...]``.
    """
    if method not in INIT_METHODS:
        raise InputError(f"unknown --init {method!r}: use one of {', '.join(INIT_METHODS)}")
    candidates: list[Candidate] = [("headers", np.eye(4))]
    if method == "none":
        return candidates
    ff = foreground(fixed.data) if fixed_fg is None else fixed_fg.bool()
    mf = foreground(moving.data) if moving_fg is None else moving_fg.bool()
    cf, vf = _moments(ff, fixed.affine)
    cm, vm = _moments(mf, moving.affine)
    candidates.append(("com", _rigid(np.eye(3), cf, cm)))
    if method == "moments":
        for signs in itertools.product((1.0, -1.0), repeat=3):
            rot = vm @ np.diag(signs) @ vf.T
            if np.linalg.det(rot) > 0:
                name = "axes" + "".join("+" if v > 0 else "-" for v in signs)
                candidates.append((name, _rigid(rot, cf, cm)))
    return candidates


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


#: Rotations up to this angle from the headers' cost nothing under the prior (scanners and head
#: positions differ by a few degrees; the prior is there against tens of degrees, and flips).
PRIOR_FREE_DEG = 15.0


def rotation_prior(matrix: np.ndarray, weight: float = 0.0) -> float:
    """The rotation prior of :func:`fit_affine` for a whole transform:
    ``weight * max(0, cos(PRIOR_FREE_DEG) - cos(angle))``."""
    c = float(np.cos(np.radians(rotation_angle_deg(matrix))))
    return float(weight * max(0.0, float(np.cos(np.radians(PRIOR_FREE_DEG))) - c))


def edge_margins(shape: tuple[int, ...], margin: int, extra: int = 0) -> list[int]:
    """Per-axis margins for :func:`interior`: ``margin`` (plus ``extra``), each part at most a sixth of
    the axis, so a thin slab keeps its middle and the fixed side's margin stays the larger one."""
    return [min(int(margin), int(n) // 6) + min(int(extra), int(n) // 6) for n in shape]


def interior(mask: torch.Tensor, margin: int | list[int]) -> torch.Tensor:
    """``(X, Y, Z)`` weights in [0, 1] set to zero within ``margin`` voxels (per axis, or the same for
    all) of zero weight or of the border.

    Features near the edge of a field of view see padding (MIND's neighbourhood, the network's
    receptive field), so the two images' features there differ even where the images agree.
    """
    m = mask.float()
    ms = [int(margin)] * 3 if isinstance(margin, int) else [int(v) for v in margin]
    if max(ms) <= 0:
        return m
    pad = (ms[2], ms[2], ms[1], ms[1], ms[0], ms[0])
    outside = 1.0 - F.pad(m[None, None], pad, value=0.0)
    # a box maximum is separable: one axis at a time (a 3D kernel of 13^3 is a hundred times slower)
    for axis, v in enumerate(ms):
        kernel = [1, 1, 1]
        kernel[axis] = 2 * v + 1
        outside = F.max_pool3d(outside, tuple(kernel), stride=1)
    eroded = 1.0 - outside[0, 0]
    return torch.minimum(m, eroded)


def inner_box(shape: tuple[int, ...], margin: int | list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """``interior`` of an all-ones grid: ``(X, Y, Z)`` ones except within ``margin`` voxels (per axis,
    or the same for all) of the border, made from three 1D masks."""
    ms = [int(margin)] * 3 if isinstance(margin, int) else [int(v) for v in margin]
    out = torch.ones(tuple(int(n) for n in shape), device=device)
    for k, (n, v) in enumerate(zip(shape, ms)):
        i = torch.arange(int(n), device=device)
        view = [1, 1, 1]
        view[k] = int(n)
        out.mul_(((i >= v) & (i <= int(n) - 1 - v)).float().view(view))
    return out


def fov_weight(moving: Volume, world: np.ndarray, shape: tuple[int, int, int], affine: np.ndarray,
               margin: int | list[int]) -> torch.Tensor:
    """Where MOVING's field of view covers a grid (through ``world``), ``margin`` voxels inside its edge
    (and inside the grid's own border): 0 or 1 per voxel.

    Covered: along every axis of MOVING (``n`` voxels) the sample position ``p`` lies within
    ``[-0.001, n - 0.999]``, where linear sampling of an all-ones MOVING with zero padding gives more
    than 0.999 along that axis. That set is convex and the positions are affine in the grid's indices, so the erosion by a
    box of ``margin`` voxels (what :func:`interior` does) is the same interval shrunk along MOVING's
    axis ``k`` by the box's reach ``sum_j |dp_k / dv_j| margin_j``: three comparisons of separable
    positions, no resampling and no max-pooling.
    """
    device = moving.data.device
    ms = [int(margin)] * 3 if isinstance(margin, int) else [int(v) for v in margin]
    if min(moving.shape) < 2:  # grid_sample's convention for a single voxel: sample it everywhere
        ones = Volume(torch.ones((1, *moving.shape), device=device), moving.affine)
        cover = resample_through(ones, world, shape, affine).data[0]
        return interior((cover > 0.999).float(), ms)
    m = np.linalg.inv(moving.affine) @ np.asarray(world) @ np.asarray(affine)
    out = inner_box(shape, ms, device=device)
    pos = affine_points(shape, m, device=device, dtype=torch.float64)  # MOVING's voxel position of every voxel
    for k, n in enumerate(moving.shape):
        reach = float(sum(abs(m[k, j]) * ms[j] for j in range(3)))
        out.mul_(((pos[..., k] - reach > -0.001) & (pos[..., k] + reach < float(n) - 0.999)).float())
    return out


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
    idx = torch.unravel_index(cost.argmin(), cost.shape) if hasattr(torch, "unravel_index") else np.unravel_index(int(cost.argmin()), tuple(cost.shape))
    k = torch.tensor([float(i) - n for i in idx], dtype=torch.float64, device=ff.device)
    # a shift of k lattice steps along the fixed axes, in world mm; through the (near-rigid) start transform
    shift_fixed = torch.as_tensor(fa[:3, :3], device=ff.device) @ k
    shift = torch.as_tensor(start[:3, :3], dtype=torch.float64, device=ff.device) @ shift_fixed
    return shift, float(cost.min())


#: Weight of the rotation prior: ``PRIOR_WEIGHT * max(0, cos 15deg - cos angle)`` is added to the
#: feature cost (unit total variance features: 0 for a perfect match, about 2 for unrelated images),
#: so a start 30 degrees off the headers pays 0.01, 90 degrees 0.097, upside down 0.197.
PRIOR_WEIGHT = 0.1
#: Features within this many voxels of a field of view's edge are not compared (MIND's reach). The
#: fixed side of a pooled fit keeps one more pooled cell away from its edge, so that at the start no
#: fixed point sees the moving edge (whose penalty would otherwise pull the fit inwards).
FOV_MARGIN = 3


#: Adam's epsilon in the affine fit: about the size of the gradient near a good optimum, so that a
#: gradient much smaller than that (an image registered onto itself) moves the parameters by much less
#: than the learning rate instead of by the learning rate (Adam's usual normalisation).
ADAM_EPS = 1e-3


def improves(before: float, after: float, rel: float = 0.02, abs_tol: float = 1e-4) -> bool:
    """Whether a fit's cost ``after`` is worth taking over ``before``: lower by more than what pooling and
    sampling alone change (``rel`` of ``before`` plus ``abs_tol``). Below that, the start is kept
    exactly, so an image registered onto itself stays at the identity."""
    return after < before - rel * abs(before) - abs_tol


#: Candidates that get the short affine after all were scored by the translation search alone: on all
#: 15 evaluation pairs (11 brain, 3 spine, MR -> CT) the one the short affine chose was among the best
#: two of the search, and two tasks fill two threads in one round.
REFINE = 2


def score_candidates(fixed_w: Volume, weight_w: torch.Tensor, moving: Volume, candidates: list[Candidate],
                     *, search_mm: float = 64.0, factor: int = 2, iters: int = 30,
                     prior_weight: float = PRIOR_WEIGHT, workers: int = 1, refine: int = REFINE) -> list[dict]:
    """Score every candidate after a translation search, and the best ``refine`` of them after a short
    coarse affine too, with a rotation prior.

    Every candidate first gets an exhaustive translation search of +-``search_mm`` on MIND-SSC features
    of grids ``2 * factor`` times as coarse as the working grid; its score is the weighted feature
    cost there plus the prior against rotations far from the headers'. The ``refine`` best of those
    (all of them when ``refine`` is 0) are then refined by :func:`fit_affine` from that translation
    (``iters`` Adam steps) and scored again; only they can be chosen. On 11 brain pairs, 3 spine pairs
    and the MR -> CT pair the candidate the short affine chose was always among the best two of the
    translation search (sharing the moving features of the headers and the centres of mass, which
    differ by a translation only, changed which of the two was chosen and cost two pairs 0.01 and
    0.02 Dice). Cheap: a few thousand points per candidate.

    Args:
        fixed_w: FIXED on the working grid.
        weight_w: fixed weights (foreground) on the working grid.
        moving: MOVING on its own grid.
        candidates: named fixed-world to moving-world transforms (see :func:`initial_candidates`).
        search_mm: translation search half-width.
        factor: coarsening of the working grid for the features.
        iters: Adam steps of the short affine.
        prior_weight: weight of the rotation prior (0 turns it off).
        workers: threads scoring candidates side by side (:func:`synthvox.registration.parallel.run_tasks`).
        refine: how many of the best candidates after the translation search get the short affine
            (0: all).

    Returns:
        One dict per candidate, in order: ``name``, ``start`` (the candidate), ``matrix`` (after the
        search, or the short affine), ``cost``, ``rotation_deg`` (of ``matrix``, relative to the
        headers), ``score``, ``search_score`` (the score after the translation search) and ``refined``
        (whether it got the short affine).
    """
    from synthvox.registration.features import robust_unit_range, total_std
    from synthvox.registration.mind import mind_ssc
    from synthvox.volume import grid_for_spacing

    s = float(spacing_of(fixed_w.affine).min())
    cshape, caff = grid_for_spacing(fixed_w.shape, fixed_w.affine, s * factor)
    # features of both images see their edge values continued beyond their fields of view (as MIND
    # pads), so an image meets its own features exactly, up to the edge
    fc = resample_to_grid(fixed_w, cshape, caff, padding="border")
    wc = resample_to_grid(Volume(weight_w[None].float(), fixed_w.affine), cshape, caff).data[0]
    ff = mind_ssc(robust_unit_range(fc.data))
    scale = total_std(ff, wc > 0.5)
    ff = ff / scale
    wc = inner_box(cshape, edge_margins(cshape, FOV_MARGIN, 2), device=wc.device) * wc

    def moving_features(frame: np.ndarray) -> dict:
        """MOVING's features on a grid with the coarse grid's axes, through ``frame``."""
        eshape, eaff = extended_grid(caff, moving, frame, align=2)
        me = resample_through(moving, frame, eshape, eaff, padding="border")
        valid = fov_weight(moving, frame, eshape, eaff, edge_margins(cshape, FOV_MARGIN))
        return {"frame": np.asarray(frame), "fm": mind_ssc(robust_unit_range(me.data)) / scale, "eaff": eaff,
                "valid": valid, "cache": {}}

    def fit(name: str, cand: np.ndarray, feats: dict, start: np.ndarray | None, n_iter: int) -> dict:
        """Fit from ``start`` (a residual translation in ``feats``' frame; ``None``: the search)."""
        frame = feats["frame"]
        q0 = np.linalg.inv(frame) @ np.asarray(cand)  # the candidate in its features' frame: a translation
        kw = {"weight_fixed": wc, "weight_moving": feats["valid"], "cache": feats["cache"]}
        q = fit_affine(ff, caff, feats["fm"], feats["eaff"], levels=(2,), iters=(n_iter,),
                       search_mm=search_mm if start is None else 0.0,
                       start_translation=(q0 if start is None else start)[:3, 3],
                       start_rotation=rotation_part(frame), prior_weight=prior_weight, **kw)
        cost = affine_cost(ff, caff, feats["fm"], feats["eaff"], q, factor=2, **kw)
        cost0 = affine_cost(ff, caff, feats["fm"], feats["eaff"], q0, factor=2, **kw)
        if not improves(cost0 + rotation_prior(cand, prior_weight), cost + rotation_prior(frame @ q, prior_weight)):
            q, cost = q0, cost0  # the candidate as it is was as good: keep it exactly
        total = frame @ q
        return {"name": name, "start": np.asarray(cand), "matrix": total, "residual": q, "cost": cost,
                "rotation_deg": rotation_angle_deg(total), "score": cost + rotation_prior(total, prior_weight)}

    feats = run_tasks([functools.partial(moving_features, cand) for _, cand in candidates], workers)
    # the candidates are independent: side by side on ``workers`` threads (see registration.parallel)
    searched = run_tasks([functools.partial(fit, name, cand, feats[i], None, 0)
                          for i, (name, cand) in enumerate(candidates)], workers)
    order = sorted(range(len(candidates)), key=lambda i: searched[i]["score"])
    chosen = order if refine <= 0 else order[:refine]
    refined = run_tasks([functools.partial(fit, candidates[i][0], candidates[i][1], feats[i],
                                           searched[i]["residual"], iters) for i in chosen], workers)
    out = []
    for i, c in enumerate(searched):
        row = dict(refined[chosen.index(i)]) if i in chosen and iters > 0 else dict(c)
        row.pop("residual")
        row.update(search_score=c["score"], refined=i in chosen)
        out.append(row)
    return out


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
        opt = torch.optim.Adam([rot, log_scale, shear, trans], lr=lr, eps=ADAM_EPS)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k, n=max(n_iter, 1): _settle(k, n))
        for _ in range(n_iter):
            opt.zero_grad(set_to_none=True)
            r = rotation()  # once per step, for the transform and the prior
            m = matrix(r)
            loss = _points_cost(x @ m[:3, :3].T + m[:3, 3], target, w, mv_feat, inv_ma, wm_full, inv_wa, workers)
            if prior_weight > 0:
                cos = (torch.trace(r0 @ r) - 1.0) / 2.0
                loss = loss + prior_weight * torch.relu(float(np.cos(np.radians(PRIOR_FREE_DEG))) - cos)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return matrix().cpu().numpy()
