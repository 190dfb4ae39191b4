"""The stages of one registration, in the order :func:`stages` lists them, over one :class:`State`.

Each step reads what the earlier ones set on the state and sets its own part; a stage is a few steps
timed (and reported) under one name:

1. ``init``:
   :func:`find_working_grid` (FIXED's field of view and axes at an isotropic spacing, see
   :func:`synthvox.registration.grids.working_grid`; both foregrounds; where FIXED's features are
   compared), :func:`choose_start` (the named candidates of :mod:`synthvox.registration.initial`, the
   best after a translation search and a short coarse affine, with the rotation prior) and
   :func:`frame_moving` (MOVING through that start on a grid with the working grid's axes covering all
   of it, and where its field of view lies).
2. ``features``: :func:`compute_features`, FIXED's on the working grid and MOVING's on its frame
   (MIND-SSC, the network's, or both, on a common scale).
3. ``affine`` (optional): :func:`fit_residual_affine`, a translation search then a coarse-to-fine Adam
   fit on the features, kept only when it improves on the start.
4. ``convex`` (optional, with ``adam``): :func:`moving_onto_working_grid` (MOVING's features through
   the affine onto the working grid) and :func:`convex_search` (ConvexAdam's coupled convex search).
5. ``adam``: :func:`optimise_instance`, Adam instance optimisation with diffusion regularisation and a
   folding penalty (on a grid of about ``adam_grid_mm``, its data term near FIXED's foreground on half
   the points per step, stopped when its loss stops falling).
6. ``check``: :func:`keep_the_best`, the result's feature match against the start's and the headers';
   a worse result is replaced by the better of those, with a warning.
7. ``compose``: :func:`onto_own_headers` (the images back on the affines their files give, see
   below), then :func:`compose_outputs`, one displacement field on FIXED's grid (ITK/ANTs convention),
   the deformable part alone and the inverse on MOVING's grid, moved image and labels, the folding.

The stages before ``compose`` see each image's affine snapped (:func:`synthvox.volume.snap_affine`):
copies of an image in formats that store its header at different precisions (float32 NIfTI or MGH
fields, decimal text) then register bit for bit alike, where the search, a chain of discrete choices
(the start, the convex search's argmin) and Adam steps, would otherwise turn a 1e-7 mm difference into
millimetres. The transform found is then taken as it is, a map of world points, and ``compose``
applies it to the images as their own headers place them (within 0.06 of a voxel of the snapped
placement at the far corner of a 256³ grid).

A step that replaces another (a given initial transform instead of :func:`choose_start`: :func:`use_start`, MOVING's
features computed again on the working grid instead of :func:`moving_onto_working_grid`) is a function
of the state setting the same fields; stopping after a stage leaves the later ones out of the list.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from synthvox.errors import InputError
from synthvox.metrics import folding_percent
from synthvox.registration.affine import affine_cost, fit_affine, improves
from synthvox.registration.config import RegistrationConfig
from synthvox.registration.convex import box3, convex_stage
from synthvox.registration.descriptors import FeatureExtractor, combine, feature_scales, set_weight
from synthvox.registration.foreground import foreground
from synthvox.registration.fov import FOV_MARGIN, bounding_boxes_overlap, edge_margins, fov_weight, inner_box
from synthvox.registration.grids import extended_grid, resample_through, working_grid
from synthvox.registration.initial import initial_candidates, score_candidates
from synthvox.registration.instance import instance_optimise
from synthvox.registration.network import FeatureNetwork
from synthvox.registration.parallel import run_tasks
from synthvox.registration.rotation import rotation_angle_deg, rotation_part, rotation_prior
from synthvox.registration.warp import (
    apply_displacement,
    compose_displacement,
    inverse_displacement,
    then_affine,
    transform_points,
    world_points,
)
from synthvox.volume import Volume, resample_to_grid, sample_at, spacing_of


class Grid(NamedTuple):
    """A grid's shape and 4x4 voxel-to-world affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray


class Outputs(NamedTuple):
    """What :func:`compose_outputs` makes, on FIXED's grid unless said otherwise (RAS displacements)."""

    displacement: torch.Tensor
    deformable: torch.Tensor
    moved: Volume
    moved_labels: Volume | None
    folding: float
    inverse: torch.Tensor  # on MOVING's grid


@dataclass
class State:
    """One registration as its stages hand it on (every transform maps FIXED's world to MOVING's).

    Given: the images on the device, their masks as booleans on their own grids, MOVING's labels, the
    resolved network, the settings, the device, the threads for independent tasks, and ``warn`` (a
    warning for the log and the report); ``headers``: the images' own affines (FIXED's, MOVING's) when
    ``fixed`` and ``moving`` hold them snapped, put back by :func:`onto_own_headers`. Then, set by the
    step named: ``grid``, ``spacing``, ``fixed_fg`` and ``moving_fg`` (foregrounds or masks on the
    images' grids), ``fixed_w``,
    ``foreground_w``, ``mask_w`` (FIXED's mask on the working grid, or None) and ``weight``
    (:func:`find_working_grid`); ``candidates``, ``scored``, ``choice`` and ``start``
    (:func:`choose_start`); ``frame``, ``moving_f`` and ``cover_f`` (MOVING and where it holds
    features, on the frame: :func:`frame_moving`); ``extractor``, ``scales``, ``feat_fixed`` and
    ``feat_moving`` (on the frame: :func:`compute_features`); ``residual`` (after the start:
    :func:`fit_residual_affine`); ``feat_moving_w`` and ``moving_weight_w``
    (:func:`moving_onto_working_grid`); ``disp`` (working voxels, before ``residual``:
    :func:`convex_search`, :func:`optimise_instance`) and ``adam_steps``; ``similarity``, ``fallback``
    and ``world`` (:func:`keep_the_best`); ``outputs`` (:func:`compose_outputs`). ``times``: seconds
    per stage.
    """

    fixed: Volume
    moving: Volume
    fixed_mask: torch.Tensor | None
    moving_mask: torch.Tensor | None
    moving_labels: Volume | None
    network: FeatureNetwork
    cfg: RegistrationConfig
    init: str
    modality_fixed: str
    modality_moving: str
    ct_window: tuple[float, float] | None
    device: torch.device
    workers: int
    warn: Callable[[str], None]
    headers: tuple[np.ndarray, np.ndarray] | None = None
    times: dict[str, float] = field(default_factory=dict)
    grid: Grid | None = None
    spacing: float = 0.0
    fixed_w: Volume | None = None
    foreground_w: torch.Tensor | None = None
    mask_w: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    fixed_fg: torch.Tensor | None = None
    moving_fg: torch.Tensor | None = None
    candidates: list[tuple[str, np.ndarray]] = field(default_factory=list)
    scored: list[dict[str, Any]] = field(default_factory=list)
    choice: str = "headers"
    start: np.ndarray = field(default_factory=lambda: np.eye(4))
    frame: Grid | None = None
    moving_f: Volume | None = None
    cover_f: torch.Tensor | None = None
    extractor: FeatureExtractor | None = None
    scales: dict[str, float] | None = None
    feat_fixed: torch.Tensor | None = None
    feat_moving: torch.Tensor | None = None
    residual: np.ndarray = field(default_factory=lambda: np.eye(4))
    feat_moving_w: torch.Tensor | None = None
    cover_w: torch.Tensor | None = None
    moving_weight_w: torch.Tensor | None = None
    disp: torch.Tensor | None = None
    adam_steps: int = 0
    similarity: dict[str, float] = field(default_factory=dict)
    fallback: str | None = None
    world: np.ndarray = field(default_factory=lambda: np.eye(4))
    outputs: Outputs | None = None


#: A step: reads and sets parts of the state, and may return a detail for its stage's progress line.
Step = Callable[[State], "str | None"]


@dataclass(frozen=True)
class Stage:
    """Steps timed and reported under one name (the keys of the report's ``seconds``)."""

    name: str
    steps: tuple[Step, ...]


def stages(affine: bool = True, deformable: bool = True, start: Step | None = None) -> list[Stage]:
    """The stages of a registration, in order (the affine and deformable ones when asked for).

    Args:
        affine: the affine stage (rigid with ``cfg.transform == "rigid"``, see :func:`fit_residual_affine`).
        deformable: the convex and Adam stages.
        start: the step that sets the start instead of :func:`choose_start` (see :func:`use_start`).
    """
    out = [Stage("init", (find_working_grid, start or choose_start, frame_moving)),
           Stage("features", (compute_features,))]
    if affine:
        out.append(Stage("affine", (fit_residual_affine,)))
    if deformable:
        out += [Stage("convex", (moving_onto_working_grid, convex_search)), Stage("adam", (optimise_instance,))]
    return out + [Stage("check", (keep_the_best,)), Stage("compose", (onto_own_headers, compose_outputs))]


def run_stages(state: State, plan: list[Stage], log: Callable[[str, float, str], None]) -> State:
    """Run ``plan`` on ``state``: each stage's steps in order, its time into ``state.times`` and one
    ``log(name, seconds, details)`` call."""
    for stage in plan:
        t = time.perf_counter()
        details = [d for d in (step(state) for step in stage.steps) if d]
        state.times[stage.name] = time.perf_counter() - t
        log(stage.name, state.times[stage.name], "; ".join(details))
    return state


# ------------------------------------------------------------------------------------------------ init


def find_working_grid(st: State) -> None:
    """The working grid, FIXED on it (edge values continued beyond its field of view, as MIND pads: an
    image meets its own features), both foregrounds (or masks), and where FIXED's features are compared."""
    cfg, dev = st.cfg, st.device
    st.grid = Grid(*working_grid(st.fixed, cfg.spacing, cfg.max_size, cfg.min_size))
    st.spacing = float(spacing_of(st.grid.affine)[0])
    st.fixed_fg, st.moving_fg = run_tasks(
        [lambda: st.fixed_mask if st.fixed_mask is not None else foreground(st.fixed.data),
         lambda: st.moving_mask if st.moving_mask is not None else foreground(st.moving.data)], st.workers)
    st.fixed_w = resample_to_grid(st.fixed, *st.grid, padding="border")
    st.foreground_w = resample_to_grid(Volume(st.fixed_fg[None].float(), st.fixed.affine), *st.grid).data[0]
    st.mask_w = st.foreground_w > 0.5 if st.fixed_mask is not None else None
    weight = (st.mask_w.float() if st.mask_w is not None
              else box3((st.foreground_w > 0.5).float()[None], passes=2)[0].gt(0).float())
    st.weight = weight * inner_box(st.grid.shape, edge_margins(st.grid.shape, FOV_MARGIN, 1), device=dev)


def choose_start(st: State) -> str:
    """The initial transform: the headers with ``init="none"``, else the best-scored candidate."""
    st.candidates = initial_candidates(st.fixed, st.moving, st.init, st.fixed_fg, st.moving_fg)
    if st.init == "none":
        st.start, st.choice = st.candidates[0][1], "headers"
    else:
        cfg = st.cfg
        st.scored = score_candidates(st.fixed_w, st.foreground_w, st.moving, st.candidates,  # type: ignore[arg-type]
                                     search_mm=cfg.init_search_mm, iters=cfg.init_iters, prior_weight=cfg.rotation_prior,
                                     workers=st.workers, refine=cfg.init_refine, rigid_only=cfg.transform == "rigid")
        best = min((c for c in st.scored if c["refined"]), key=lambda c: c["score"])
        st.start, st.choice = best["matrix"], best["name"]
    return (f"{len(st.candidates)} candidates, chose {st.choice}"
            + (f" (rotation {rotation_angle_deg(st.start):.0f} deg from the headers)" if st.scored else ""))


def use_start(matrix: np.ndarray) -> Step:
    """The step that starts from ``matrix`` (4x4, fixed world to moving world, RAS; an initial
    transform file as :func:`synthvox.io.load_transform` reads it) instead of :func:`choose_start`."""
    return functools.partial(given_start, matrix=np.asarray(matrix, np.float64).copy())


def given_start(st: State, matrix: np.ndarray) -> str:
    """Set the start to ``matrix`` (no search: the candidates are that one, named ``given``)."""
    st.candidates = [("given", matrix)]
    st.start, st.choice = matrix, "given"
    return (f"the given initial transform: rotation {rotation_angle_deg(matrix):.1f} deg, "
            f"translation {float(np.linalg.norm(matrix[:3, 3])):.1f} mm from the headers")


def frame_moving(st: State) -> None:
    """MOVING through the start on a grid with the working grid's axes that covers all of it (its
    origin and size multiples of every affine pooling factor), and where its features are its own (not
    padding, and inside its mask): the weight of the moving side everywhere."""
    fixed, moving, cfg, start = st.fixed, st.moving, st.cfg, st.start
    if not bounding_boxes_overlap(fixed.shape, fixed.affine, moving.shape, moving.affine, start):
        if st.choice == "given":
            raise InputError("the fixed and moving images do not overlap in world space after the initial transform (check that it maps FIXED's points to MOVING's, as ITK's and ANTs' files do)")
        raise InputError(f"the fixed and moving images do not overlap in world space after --init {st.init} (check their headers, or use --init com/moments)")
    align = int(np.lcm.reduce([int(v) for v in cfg.affine_levels])) if cfg.affine_levels else 1
    st.frame = Grid(*extended_grid(st.grid.affine, moving, start, max_size=max(cfg.max_size, 256), align=align))  # type: ignore[union-attr]
    margins = edge_margins(st.grid.shape, FOV_MARGIN)  # type: ignore[union-attr]
    st.moving_f, cover = run_tasks([lambda: resample_through(moving, start, *st.frame, padding="border"),  # type: ignore[misc]
                                    lambda: fov_weight(moving, start, *st.frame, margins)], st.workers)  # type: ignore[misc]
    if st.moving_mask is not None:
        mask = Volume(st.moving_mask[None].float(), moving.affine)
        cover = cover * (resample_through(mask, start, *st.frame).data[0] > 0.5).float()  # type: ignore[misc]
    st.cover_f = cover


# -------------------------------------------------------------------------------------------- features


def compute_features(st: State) -> str:
    """FIXED's features on the working grid and MOVING's on its frame, each set scaled on FIXED's
    foreground and weighted by the network's share."""
    net = st.network
    st.extractor = FeatureExtractor(kind=net.kind, model=net.model, device=st.device, modality_fixed=st.modality_fixed,
                                    modality_moving=st.modality_moving, ct_window=st.ct_window,
                                    net_zoom=st.spacing / net.spacing_mm if net.spacing_mm else 1.0)
    extractor = st.extractor
    raw_f, raw_m = run_tasks([lambda: extractor.raw(st.fixed_w.data, "fixed"),  # type: ignore[union-attr]
                              lambda: extractor.raw(st.moving_f.data, "moving")], st.workers)  # type: ignore[union-attr]
    st.scales = feature_scales(raw_f, st.foreground_w > 0.5)  # type: ignore[operator]
    st.feat_fixed = combine(raw_f, st.scales, net.shares)
    st.feat_moving = combine(raw_m, st.scales, net.shares)
    return (f"{net.kind} on {'x'.join(map(str, st.grid.shape))} at {st.spacing:g} mm"  # type: ignore[union-attr]
            + (f" (the network at {net.spacing_mm:g} mm)" if net.spacing_mm else "")
            + (f", the network's share {net.share:g}" if net.share is not None else ""))


# ---------------------------------------------------------------------------------------------- affine


def fit_residual_affine(st: State) -> str:
    """A residual affine after the start on the features (a rotation and translation with
    ``transform="rigid"``), kept only when it improves on the start (an image onto itself keeps the
    identity)."""
    cfg, (wshape, waff), (_, eaff) = st.cfg, st.grid, st.frame  # type: ignore[misc]
    # the rotation prior holds the whole rotation near the headers', or near a given start's
    prior_ref = np.eye(4) if st.choice == "given" else st.start
    # half a coarsest cell more: no pooled fixed point starts on the moving edge
    weight_fit = st.weight * inner_box(wshape, edge_margins(wshape, FOV_MARGIN, max(cfg.affine_levels) // 2),
                                       device=st.device)
    pooled: dict = {}  # the pooled moving features of each level, made once for the fit and the costs
    kw = {"weight_fixed": weight_fit, "weight_moving": st.cover_f, "cache": pooled, "workers": st.workers}
    residual = fit_affine(st.feat_fixed, waff, st.feat_moving, eaff, levels=cfg.affine_levels, iters=cfg.affine_iters,
                          search_mm=cfg.search_mm, start_rotation=rotation_part(prior_ref),
                          prior_weight=cfg.rotation_prior, rigid_only=cfg.transform == "rigid", **kw)
    finest = min(cfg.affine_levels)
    cost_fit = affine_cost(st.feat_fixed, waff, st.feat_moving, eaff, residual, factor=finest, **kw)
    cost_0 = affine_cost(st.feat_fixed, waff, st.feat_moving, eaff, np.eye(4), factor=finest, **kw)
    if improves(cost_0 + rotation_prior(prior_ref, cfg.rotation_prior),
                cost_fit + rotation_prior(prior_ref @ residual, cfg.rotation_prior)):
        st.residual = residual
    return f"rotation {rotation_angle_deg(st.start @ st.residual):.1f} deg from the headers"


# ------------------------------------------------------------------------------------------ deformable


def moving_onto_working_grid(st: State) -> str:
    """MOVING's features and cover through the residual affine onto the working grid; its weight there
    (None when MOVING covers all of FIXED's compared region and has no mask). With ``matched_fov`` and
    a network, MOVING itself goes onto the working grid and its (network) features are computed there."""
    if st.cfg.matched_fov != "none" and st.network.model is not None:
        detail = moving_features_on_working_grid(st)
        cover_w = st.cover_w
    else:
        detail = ""
        st.feat_moving_w = _frame_onto_working_grid(st, st.feat_moving)  # type: ignore[arg-type]
        cover_w = _frame_onto_working_grid(st, st.cover_f[None])[0]  # type: ignore[index]
    inside = cover_w[st.weight > 0]  # type: ignore[operator]
    partial = inside.numel() > 0 and float(inside.min()) < 0.999  # MOVING does not cover all of FIXED
    st.moving_weight_w = cover_w if st.moving_mask is not None or partial else None
    return detail


def _frame_onto_working_grid(st: State, data: torch.Tensor) -> torch.Tensor:
    """``(C, ...)`` values on MOVING's frame through the residual affine onto the working grid."""
    to_w = np.linalg.inv(st.residual) @ st.frame.affine  # type: ignore[union-attr]
    return resample_to_grid(Volume(data, to_w), *st.grid).data  # type: ignore[misc]


def moving_features_on_working_grid(st: State) -> str:
    """MOVING through the start and the residual affine onto the working grid (edge values beyond its
    field of view, as FIXED there) and its network features computed on it, from the same field of
    view as FIXED's: with ``matched_fov="all"`` every feature set, with ``"network"`` the network's
    beside MIND-SSC's from the frame; sets ``feat_moving_w`` and ``cover_w``."""
    to = st.start @ st.residual
    margins = edge_margins(st.grid.shape, FOV_MARGIN)  # type: ignore[union-attr]
    moving_w, cover = run_tasks([lambda: resample_through(st.moving, to, *st.grid, padding="border"),  # type: ignore[misc]
                                 lambda: fov_weight(st.moving, to, *st.grid, margins)], st.workers)  # type: ignore[misc]
    if st.moving_mask is not None:
        mask = Volume(st.moving_mask[None].float(), st.moving.affine)
        cover = cover * (resample_through(mask, to, *st.grid).data[0] > 0.5).float()  # type: ignore[misc]
    st.cover_w = cover
    if st.cfg.matched_fov == "all":
        st.feat_moving_w = combine(st.extractor.raw(moving_w.data, "moving"), st.scales, st.network.shares)  # type: ignore[union-attr, arg-type]
        return "MOVING's features again on the working grid"
    net = st.extractor.raw(moving_w.data, "moving", only="net")["net"]  # type: ignore[union-attr]
    net = net * set_weight("net", st.scales, st.network.shares)  # type: ignore[arg-type]
    n_others = st.feat_moving.shape[0] - net.shape[0]  # type: ignore[union-attr]  (combine's order: mind, net)
    others = _frame_onto_working_grid(st, st.feat_moving[:n_others]) if n_others else None  # type: ignore[index]
    st.feat_moving_w = torch.cat([others, net]) if others is not None else net
    return "MOVING's network features again on the working grid"


def convex_search(st: State) -> str:
    """ConvexAdam's coupled convex search of a displacement on the working grid."""
    cfg, s = st.cfg, st.spacing
    grid = max(1, int(round(cfg.convex_grid_mm / s)))
    radius = max(1, int(round(cfg.convex_range_mm / (grid * s))))
    st.disp = convex_stage(st.feat_fixed, st.feat_moving_w, grid, radius, weight_fixed=st.mask_w,  # type: ignore[arg-type]
                           weight_moving=st.moving_weight_w, inverse_consistent=cfg.inverse_consistent,
                           workers=st.workers)
    return f"search grid {grid * s:g} mm, range {grid * radius * s:g} mm"


def optimise_instance(st: State) -> str:
    """Adam instance optimisation of the displacement, its data term within ``adam_margin_mm`` of
    FIXED's foreground (or mask)."""
    cfg, s = st.cfg, st.spacing
    stride = max(1, int(round(cfg.adam_grid_mm / s)))
    region = None
    if cfg.adam_margin_mm >= 0:
        base = st.mask_w.float() if st.mask_w is not None else (st.foreground_w > 0.5).float()  # type: ignore[operator]
        passes = int(round(cfg.adam_margin_mm / s))
        region = (box3(base[None], passes=passes)[0] > 0) if passes > 0 else base > 0
    stats: dict[str, Any] = {"steps": 0}
    if cfg.adam_iters > 0:
        st.disp = instance_optimise(st.feat_fixed, st.feat_moving_w, st.disp, stride=stride, iters=cfg.adam_iters,  # type: ignore[arg-type]
                                    lr=cfg.adam_lr, lam=cfg.lam, weight_fixed=st.mask_w, weight_moving=st.moving_weight_w,
                                    fold_weight=cfg.fold_weight, region=region, tol=cfg.adam_tol,
                                    patience=cfg.adam_patience, stats=stats, workers=st.workers,
                                    subsample=cfg.adam_subsample)
    st.adam_steps = int(stats["steps"])
    st.feat_moving_w = None
    return f"{st.adam_steps} steps on a {stride * s:g} mm grid"


# ----------------------------------------------------------------------------------------------- check


def keep_the_best(st: State) -> str:
    """Never end worse than the start: the result's feature match against the chosen start's and the
    headers', on the working grid; a worse result gives way to the better of those, with a warning."""
    similarity = functools.partial(_similarity, st.feat_fixed, st.weight, st.feat_moving, st.cover_f,
                                   st.frame.affine, st.grid.affine)  # type: ignore[union-attr]
    sim = st.similarity = dict(zip(("headers", "start", "final"), run_tasks(
        [functools.partial(similarity, np.linalg.inv(st.start)), functools.partial(similarity, np.eye(4)),
         functools.partial(similarity, st.residual, st.disp)], st.workers)))
    st.world = st.start @ st.residual
    if sim["final"] > min(sim["start"], sim["headers"]) + 1e-6:
        st.fallback = "headers" if sim["headers"] < sim["start"] else "start"
        st.warn(f"the registered result matches worse (feature cost {sim['final']:.4g}) than "
                f"{'the headers' if st.fallback == 'headers' else 'its initial transform (' + st.choice + ')'} "
                f"({sim[st.fallback]:.4g}): keeping that instead")
        st.world = np.eye(4) if st.fallback == "headers" else st.start
        st.disp = None
    st.feat_fixed = st.feat_moving = None
    return (f"feature cost {sim['final']:.4g} (start {sim['start']:.4g}, headers {sim['headers']:.4g})"
            + (f": kept the {st.fallback}" if st.fallback else ""))


def _similarity(feat_f: torch.Tensor, weight_f: torch.Tensor, feat_m: torch.Tensor, valid_m: torch.Tensor,
                moving_affine: np.ndarray, working_affine: np.ndarray, residual: np.ndarray,
                disp_w: torch.Tensor | None = None, step: int = 2) -> float:
    """Weighted mean squared feature difference of FIXED and MOVING through ``residual`` (and ``disp_w``).

    The same cost as the affine stage's (points outside MOVING's field of view count as 2), on every
    ``step``-th voxel of the working grid along each axis: fixed voxel ``v`` meets the moving features
    at ``residual(A_w (v + u(v)))``.
    """
    with torch.no_grad():
        if step > 1:
            feat_f = feat_f[:, ::step, ::step, ::step]
            weight_f = weight_f[::step, ::step, ::step]
            disp_w = None if disp_w is None else disp_w[:, ::step, ::step, ::step] / step
            working_affine = np.asarray(working_affine) @ np.diag([step, step, step, 1.0])
        shape = tuple(int(v) for v in feat_f.shape[1:])
        x = world_points(shape, working_affine, device=feat_f.device)  # type: ignore[arg-type]
        if disp_w is not None:
            lin = torch.as_tensor(np.asarray(working_affine)[:3, :3], device=feat_f.device)
            x = x + disp_w.permute(1, 2, 3, 0).double() @ lin.T
        vox = transform_points(x, np.linalg.inv(moving_affine) @ np.asarray(residual)).float()
        mv = sample_at(feat_m, vox, padding="zeros")  # features and cover apart: no copy of MOVING's features
        w = weight_f.float()
        ww = w * sample_at(valid_m[None].float(), vox, padding="zeros")[0]
        sq = (mv - feat_f).pow(2).sum(0)
        return float(((ww * sq).sum() + ((w - ww) * 2.0).sum()) / w.sum().clamp_min(1e-6))


# --------------------------------------------------------------------------------------------- compose


def onto_own_headers(st: State) -> None:
    """FIXED and MOVING back on the affines their files give (``headers``), for the outputs: the
    transform found stays as it is, a map of world points (see the module's notes)."""
    if st.headers is not None:
        st.fixed = Volume(st.fixed.data, st.headers[0])
        st.moving = Volume(st.moving.data, st.headers[1])
        st.headers = None


def compose_outputs(st: State) -> str:
    """The whole map on FIXED's grid, the deformable part alone (applied before the affine), what the
    whole map gives (moved image and labels, folding), and beside them the inverse on MOVING's grid."""
    fixed, moving, labels, world, disp = st.fixed, st.moving, st.moving_labels, st.world, st.disp
    waff = st.grid.affine  # type: ignore[union-attr]

    def forward() -> tuple[Any, ...]:
        deform = (compose_displacement(fixed.shape, fixed.affine, np.eye(4), disp, waff) if disp is not None
                  else torch.zeros((3, *fixed.shape), device=st.device))
        whole = then_affine(deform, fixed.shape, fixed.affine, world)
        moved = apply_displacement(moving, whole, fixed.affine)
        moved_labels = (apply_displacement(Volume(labels.data.to(st.device), labels.affine), whole, fixed.affine,
                                           labels=True) if labels is not None else None)
        return whole, deform, moved, moved_labels, folding_percent(whole, affine=fixed.affine)

    with torch.no_grad():
        # the inverse map on MOVING's grid (the longest task) beside all the others
        forward_out, inverse = run_tasks(
            [forward, lambda: inverse_displacement(moving.shape, moving.affine, world, disp, waff)], st.workers)
    st.outputs = Outputs(*forward_out, inverse)
    return f"folding {st.outputs.folding:.3f}%"
