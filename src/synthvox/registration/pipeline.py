"""``register``: the whole registration of MOVING onto FIXED, from volumes to a warp and moved images.

Stages (each timed in the report):

1. **Working grid.** FIXED's field of view and axes at an isotropic spacing (2 mm by default, or
   FIXED's own spacing when coarser; capped at ``max_size`` voxels per axis, and fine enough for
   ``min_size`` voxels along the longest axis).
2. **Initialisation** (``init``): named candidates (headers, centres of mass, principal axes), each
   scored after a coarse translation search, the best ``init_refine`` (two) again after a short coarse
   affine, with a prior against rotations far from the headers'.
3. **Features** of FIXED on the working grid and of MOVING on a grid with the same axes covering all of
   MOVING: MIND-SSC, the network's, or both.
4. **Affine** (optional): translation search then a coarse-to-fine Adam fit on the features.
5. **Deformable** (optional): ConvexAdam's coupled convex search then Adam instance optimisation
   with diffusion regularisation and a folding penalty (on a grid of about ``adam_grid_mm``, its data
   term near FIXED's foreground on half the points per step, stopped when its loss stops falling).
6. **Check**: the result's feature match against the chosen start's and the headers'; a worse result
   is replaced by the better start, with a warning.
7. **Composition** into one displacement field on FIXED's grid (ITK/ANTs convention), the deformable
   part alone and the inverse on MOVING's grid, moved image and labels, the Jacobian folding and Dice.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synthvox.errors import InputError
from synthvox.metrics import dice_per_label, folding_percent
from synthvox.models.card import network_share, network_spacing
from synthvox.registration import affine as aff
from synthvox.registration.convex import box3, convex_stage
from synthvox.registration.features import (
    FeatureExtractor,
    combine,
    feature_model,
    feature_scales,
)
from synthvox.registration.instance import instance_optimise
from synthvox.registration.parallel import run_tasks, single_op_threads
from synthvox.registration.warp import (
    apply_displacement,
    compose_displacement,
    inverse_displacement,
    then_affine,
    warp_to_itk_volume,
)
from synthvox.volume import Volume, grid_for_spacing, resample_to_grid, same_grid, spacing_of


@dataclass(frozen=True)
class RegistrationConfig:
    """Settings of the solver (distances in mm, converted to working-grid voxels).

    Attributes:
        spacing: working spacing; FIXED's finest spacing is used instead when coarser. 2.5 mm: on the 11
            consecutive brain pairs of benchmarks/registration.py mean Dice 0.730 in 0.43x the time of
            ANTs SyN, and 0.730 in 0.63x on 2 mm (the same run, 2 threads).
        max_size: largest number of working voxels along an axis (the spacing grows to fit).
        min_size: fewest working voxels along the longest axis (the spacing shrinks to fit, down to
            FIXED's own): a small field of view (a spinal cord, 77 mm) is not registered on 20 voxels.
        affine_levels: pyramid pooling factors of the affine stage, coarse to fine.
        affine_iters: Adam steps per affine level.
        search_mm: half-width of the affine stage's translation search.
        init_search_mm: half-width of the translation search that picks the initial transform.
        init_iters: Adam steps of the short coarse affine that scores the best initial candidates.
        init_refine: how many of the candidates, ranked by their translation search, get that short
            affine (0: all of them); only those can be chosen.
        rotation_prior: weight of the prior against rotations far from the headers' (initial scoring
            and affine stage; see :data:`synthvox.registration.affine.PRIOR_WEIGHT`).
        convex_grid_mm: control-point spacing of the discrete search.
        convex_range_mm: capture range of the discrete search.
        adam_grid_mm: spacing of the field optimised by Adam.
        adam_iters: most Adam steps of the instance optimisation.
        adam_tol: early stop of the instance optimisation: stop when the loss fell by less than this
            (relative) over the last ``adam_patience`` steps (0: always ``adam_iters`` steps).
        adam_patience: the window of that early stop.
        adam_margin_mm: the instance optimisation's data term is evaluated within this distance of
            FIXED's foreground (or mask) only (negative: everywhere); the field is regularised everywhere.
        adam_subsample: each Adam step evaluates the data term on every n-th of those points, the
            next step on the next share (see :func:`synthvox.registration.instance.instance_optimise`).
        lam: diffusion regularisation weight.
        adam_lr: Adam learning rate of the instance optimisation.
        fold_weight: weight of the penalty on Jacobian determinants near or below zero in the Adam
            stage (see :func:`synthvox.registration.instance.folding_penalty`).
        inverse_consistent: make the coarse stage inverse consistent.
        net_spacing: the spacing in mm at which the network sees both images (``net`` and ``both``);
            its features are resampled onto the working grid. None: what the weights' card says (see
            :func:`synthvox.models.card.network_spacing`: the voxel size they were trained at).
        net_share: with ``both``, the network's share of the total feature variance (MIND-SSC gets the
            rest), in (0, 1). None: what the weights' card says (:func:`synthvox.models.card.network_share`:
            a measured choice, else one half).
    """

    spacing: float = 2.5
    max_size: int = 192
    min_size: int = 64
    affine_levels: tuple[int, ...] = (4, 2)
    affine_iters: tuple[int, ...] = (80, 40)
    search_mm: float = 16.0
    init_search_mm: float = 64.0
    init_iters: int = 30
    init_refine: int = aff.REFINE
    rotation_prior: float = aff.PRIOR_WEIGHT
    convex_grid_mm: float = 8.0
    convex_range_mm: float = 24.0
    adam_grid_mm: float = 4.0
    adam_iters: int = 80
    adam_tol: float = 0.03
    adam_patience: int = 10
    adam_margin_mm: float = 8.0
    adam_subsample: int = 2
    lam: float = 1.25
    adam_lr: float = 1.0
    fold_weight: float = 50.0
    inverse_consistent: bool = True
    net_spacing: float | None = None
    net_share: float | None = None

    def __post_init__(self) -> None:
        if self.net_spacing is not None and not (self.net_spacing > 0 and math.isfinite(self.net_spacing)):
            raise InputError(f"net_spacing must be a positive number of mm, got {self.net_spacing}")
        if self.net_share is not None and not 0 < self.net_share < 1:
            raise InputError(f"net_share must be between 0 and 1 (exclusive), got {self.net_share}")

    def network_mm(self, model: Any) -> float | None:
        """The spacing at which ``model`` sees the images: :attr:`net_spacing`, else its card's
        (None without a network, or for one with no card: the working grid as it is)."""
        if model is None:
            return None
        return self.net_spacing if self.net_spacing is not None else network_spacing(model)

    def shares(self, features: str, model: Any) -> dict[str, float] | None:
        """Each feature set's share of the variance with ``features`` (None unless ``"both"``): the
        network gets :attr:`net_share`, else what ``model``'s card says, and MIND-SSC the rest."""
        if features != "both":
            return None
        s = self.net_share if self.net_share is not None else network_share(model)
        return {"net": s, "mind": 1.0 - s}


@dataclass
class RegistrationResult:
    """What :func:`register` returns.

    Attributes:
        moved: MOVING resampled onto FIXED's grid.
        warp: ITK/ANTs displacement field (LPS, mm) on FIXED's grid, 3 channels; save with
            ``io.save(warp, path, vector=True)``.
        moved_labels: MOVING's labels on FIXED's grid (nearest neighbour), when given.
        world_affine: the affine part, 4x4, fixed world to moving world.
        displacement: ``(3, X, Y, Z)`` the same field as ``warp`` in RAS.
        report: times per stage, folding %, Dice per label, initial candidates and the choice, the
            similarity check, warnings, settings, synthvox version and the weights' sha256.
        deformable_warp: the deformable stage alone (ITK convention, on FIXED's grid), applied before
            ``world_affine``.
        inverse_warp: the moving -> fixed map on MOVING's grid (ITK convention).
        fixed: the fixed image (for the QC picture).
        fixed_labels: the fixed label map, when given.
    """

    moved: Volume
    warp: Volume
    moved_labels: Volume | None
    world_affine: np.ndarray
    displacement: torch.Tensor
    report: dict[str, Any] = field(default_factory=dict)
    deformable_warp: Volume | None = None
    inverse_warp: Volume | None = None
    fixed: Volume | None = None
    fixed_labels: Volume | None = None

    def save(self, out: str | Path, *, force: bool = False, title: str | None = None) -> list[Path]:
        """Write every output into the folder ``out`` as ``synthvox register`` does (see
        :func:`synthvox.registration.outputs.save`); returns the paths written."""
        from synthvox.registration.outputs import save

        return save(self, out, force=force, title=title)


def working_grid(fixed: Volume, spacing: float = 2.0, max_size: int = 192,
                 min_size: int = 64) -> tuple[tuple[int, int, int], np.ndarray]:
    """FIXED's field of view and axes at an isotropic spacing (see :class:`RegistrationConfig`)."""
    extent = np.asarray(fixed.shape) * spacing_of(fixed.affine)
    s = min(float(spacing), float(extent.max()) / max(min_size, 1))
    s = max(s, float(spacing_of(fixed.affine).min()))
    s = max(s, float(extent.max()) / max_size)
    return grid_for_spacing(fixed.shape, fixed.affine, s)


def _check_single(vol: Volume, what: str) -> Volume:
    if vol.data.shape[0] != 1:
        raise InputError(f"{what} must have one channel, got {vol.data.shape[0]}")
    return vol


def _check_on_grid(vol: Volume | None, image: Volume, what: str, image_what: str) -> None:
    if vol is not None and not same_grid(vol, image):
        raise InputError(f"{what} is not on the grid of the {image_what} (shape {vol.shape} vs {image.shape}, or a different affine)")


class _Progress:
    """One line per stage (and every warning) through ``log``; warnings also land in the report."""

    def __init__(self, log: Callable[[str], None] | None) -> None:
        self.log = log
        self.warnings: list[str] = []

    def stage(self, name: str, seconds: float, detail: str = "") -> None:
        if self.log is not None:
            self.log(f"  {name:<9s}{seconds:6.1f} s  {detail}".rstrip())

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        (self.log or (lambda m: print(m, file=sys.stderr)))(f"warning: {message}")


def _similarity(feat_f: torch.Tensor, weight_f: torch.Tensor, feat_m: torch.Tensor, valid_m: torch.Tensor,
                moving_affine: np.ndarray, working_affine: np.ndarray, residual: np.ndarray,
                disp_w: torch.Tensor | None = None, step: int = 2) -> float:
    """Weighted mean squared feature difference of FIXED and MOVING through ``residual`` (and ``disp_w``).

    The same cost as the affine stage's (points outside MOVING's field of view count as 2), on every
    ``step``-th voxel of the working grid along each axis: fixed voxel ``v`` meets the moving features
    at ``residual(A_w (v + u(v)))``.
    """
    from synthvox.registration.warp import transform_points, world_points
    from synthvox.volume import sample_at

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


def _version() -> str:
    from synthvox import __version__

    return __version__


def _sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _weights_info(features: str, weights: Any, model: Any) -> dict[str, Any] | None:
    """Which network weights the features came from: path and sha256 of the weights file (of the
    parameters' bytes for a network passed in memory); ``None`` for MIND alone."""
    import hashlib

    if model is None:
        return None
    if weights is None or isinstance(weights, (str, Path)):
        from synthvox.models import default_weights_path

        path = Path(weights) if weights is not None else default_weights_path()
        assert path is not None
        file = path if path.is_file() else path / "model.safetensors"
        if file.is_file():
            return {"path": str(path), "file": file.name, "sha256": _sha256_file(file)}
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return {"path": None, "file": None, "sha256": h.hexdigest(), "of": "float32 parameters in memory"}


def register(
    fixed: Volume,
    moving: Volume,
    *,
    features: str = "mind",
    weights: Any = None,
    device: torch.device | str = "cpu",
    moving_labels: Volume | None = None,
    fixed_labels: Volume | None = None,
    fixed_mask: Volume | None = None,
    moving_mask: Volume | None = None,
    init: str = "moments",
    affine: bool = True,
    deformable: bool = True,
    modality_fixed: str = "auto",
    modality_moving: str = "auto",
    ct_window: tuple[float, float] | None = None,
    config: RegistrationConfig | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    label_names: Mapping[int, str] | None = None,
) -> RegistrationResult:
    """Register MOVING onto FIXED.

    On the CPU it runs with one intra-op torch thread and spreads independent tasks over as many
    threads as ``torch.get_num_threads()`` allowed (restored afterwards; see
    :mod:`synthvox.registration.parallel`): the result does not depend on the number of threads.

    Args:
        fixed: the reference image, any grid.
        moving: the image to align, any grid, spacing and orientation.
        features: ``"mind"`` (MIND-SSC, needs no network), ``"net"`` or ``"both"``.
        weights: a model directory, or a loaded network (``None``: the default weights).
        device: where to compute.
        moving_labels: MOVING's label map (same grid as MOVING), carried onto FIXED's grid.
        fixed_labels: FIXED's label map (same grid as FIXED): Dice of every label id found in both
            label maps in the report (ids in only one of them are listed, not scored).
        fixed_mask: region of FIXED to match (same grid as FIXED).
        moving_mask: region of MOVING to match (same grid as MOVING).
        init: ``"none"``, ``"com"`` or ``"moments"``.
        affine: run the affine stage.
        deformable: run the deformable stage.
        modality_fixed: intensity normalisation for the network: ``"auto"``, ``"mr"`` or ``"ct"``.
        modality_moving: the same for MOVING.
        ct_window: optional CT window ``(low, high)`` in HU for the network.
        config: solver settings.
        seed: recorded in the report; every stage is deterministic (no random sampling).
        log: called with one line per stage (progress) and per warning; ``None``: warnings go to
            stderr, progress nowhere.
        label_names: label id -> name, recorded in the report (and Dice by name).

    Returns:
        A :class:`RegistrationResult`.

    Raises:
        InputError: multi-channel images, label maps or masks off their image's grid, constant images,
            no overlap after initialisation, net features without weights.
    """
    dev = torch.device(device)
    # one intra-op thread, independent tasks side by side instead (see registration.parallel)
    with single_op_threads(dev) as workers:
        return _register(fixed, moving, features=features, weights=weights, dev=dev, moving_labels=moving_labels,
                         fixed_labels=fixed_labels, fixed_mask=fixed_mask, moving_mask=moving_mask, init=init,
                         affine=affine, deformable=deformable, modality_fixed=modality_fixed,
                         modality_moving=modality_moving, ct_window=ct_window, cfg=config or RegistrationConfig(),
                         seed=seed, log=log, label_names=label_names, workers=workers)


def _register(fixed: Volume, moving: Volume, *, features: str, weights: Any, dev: torch.device,
              moving_labels: Volume | None, fixed_labels: Volume | None, fixed_mask: Volume | None,
              moving_mask: Volume | None, init: str, affine: bool, deformable: bool, modality_fixed: str,
              modality_moving: str, ct_window: tuple[float, float] | None, cfg: RegistrationConfig, seed: int,
              log: Callable[[str], None] | None, label_names: Mapping[int, str] | None,
              workers: int) -> RegistrationResult:
    """:func:`register`'s work, with ``workers`` threads for independent tasks."""
    _check_single(fixed, "the fixed image")
    _check_single(moving, "the moving image")
    _check_on_grid(fixed_labels, fixed, "the fixed label map", "fixed image")
    _check_on_grid(moving_labels, moving, "the moving label map", "moving image")
    _check_on_grid(fixed_mask, fixed, "the fixed mask", "fixed image")
    _check_on_grid(moving_mask, moving, "the moving mask", "moving image")
    times: dict[str, float] = {}
    progress = _Progress(log)
    t_start = time.perf_counter()
    model = feature_model(features, weights, dev)
    fixed = Volume(fixed.data.float().to(dev), fixed.affine)
    moving = Volume(moving.data.float().to(dev), moving.affine)
    times["load_model"] = time.perf_counter() - t_start

    # 1-2. working grid and initialisation
    t = time.perf_counter()
    wshape, waff = working_grid(fixed, cfg.spacing, cfg.max_size, cfg.min_size)
    s = float(spacing_of(waff)[0])
    fmask_full = fixed_mask.data[0].to(dev) > 0 if fixed_mask is not None else None
    mmask_full = moving_mask.data[0].to(dev) > 0 if moving_mask is not None else None
    for m, what in ((fmask_full, "fixed"), (mmask_full, "moving")):
        if m is not None and not bool(m.any()):
            raise InputError(f"the {what} mask is empty")
    fixed_fg, moving_fg = run_tasks([lambda: fmask_full if fmask_full is not None else aff.foreground(fixed.data),
                                     lambda: mmask_full if mmask_full is not None else aff.foreground(moving.data)],
                                    workers)
    candidates = aff.initial_candidates(fixed, moving, init, fixed_fg, moving_fg)
    # edge values continued beyond both fields of view (as MIND pads): an image meets its own features
    fixed_w = resample_to_grid(fixed, wshape, waff, padding="border")
    fg_w = resample_to_grid(Volume(fixed_fg[None].float(), fixed.affine), wshape, waff).data[0]
    scored: list[dict[str, Any]] = []
    if init == "none":
        world0, choice = candidates[0][1], "headers"
    else:
        scored = aff.score_candidates(fixed_w, fg_w, moving, candidates, search_mm=cfg.init_search_mm,
                                      iters=cfg.init_iters, prior_weight=cfg.rotation_prior, workers=workers,
                                      refine=cfg.init_refine)
        best = min((c for c in scored if c["refined"]), key=lambda c: c["score"])
        world0, choice = best["matrix"], best["name"]
    if not aff.bounding_boxes_overlap(fixed.shape, fixed.affine, moving.shape, moving.affine, world0):
        raise InputError(f"the fixed and moving images do not overlap in world space after --init {init} (check their headers, or use --init com/moments)")
    fmask_w = None
    if fmask_full is not None:
        fmask_w = fg_w > 0.5
    align = int(np.lcm.reduce([int(v) for v in cfg.affine_levels])) if cfg.affine_levels else 1
    eshape, eaff = aff.extended_grid(waff, moving, world0, max_size=max(cfg.max_size, 256), align=align)
    # MOVING through the start, and where its features are its own (not padding): the weight of the
    # moving side everywhere
    moving_e, valid_e = run_tasks([
        lambda: aff.resample_through(moving, world0, eshape, eaff, padding="border"),
        lambda: aff.fov_weight(moving, world0, eshape, eaff, aff.edge_margins(wshape, aff.FOV_MARGIN))], workers)
    if mmask_full is not None:
        mmask_e = aff.resample_through(Volume(mmask_full[None].float(), moving.affine), world0, eshape, eaff).data[0] > 0.5
        valid_e = valid_e * mmask_e.float()
    times["init"] = time.perf_counter() - t
    progress.stage("init", times["init"], f"{len(candidates)} candidates, chose {choice}"
                   + (f" (rotation {aff.rotation_angle_deg(world0):.0f} deg from the headers)" if scored else ""))

    # 3. features
    t = time.perf_counter()
    net_mm = cfg.network_mm(model)
    extractor = FeatureExtractor(kind=features, model=model, device=dev, modality_fixed=modality_fixed,
                                 modality_moving=modality_moving, ct_window=ct_window,
                                 net_zoom=s / net_mm if net_mm else 1.0)
    raw_f, raw_m = run_tasks([lambda: extractor.raw(fixed_w.data, "fixed"),
                              lambda: extractor.raw(moving_e.data, "moving")], workers)
    scales = feature_scales(raw_f, fg_w > 0.5)
    shares = cfg.shares(features, model)
    net_share = shares["net"] if shares else None
    feat_f = combine(raw_f, scales, shares)
    feat_m = combine(raw_m, scales, shares)
    del raw_f, raw_m
    times["features"] = time.perf_counter() - t
    progress.stage("features", times["features"], f"{features} on {'x'.join(map(str, wshape))} at {s:g} mm"
                   + (f" (the network at {net_mm:g} mm)" if net_mm else "")
                   + (f", the network's share {net_share:g}" if net_share is not None else ""))

    # 4. affine
    t = time.perf_counter()
    weight_f = fmask_w.float() if fmask_w is not None else box3((fg_w > 0.5).float()[None], passes=2)[0].gt(0).float()
    weight_f = weight_f * aff.inner_box(wshape, aff.edge_margins(wshape, aff.FOV_MARGIN, 1), device=dev)
    residual = np.eye(4)
    if affine:
        # half a coarsest cell more: no pooled fixed point starts on the moving edge
        weight_fit = weight_f * aff.inner_box(wshape, aff.edge_margins(wshape, aff.FOV_MARGIN, max(cfg.affine_levels) // 2),
                                              device=dev)
        pooled: dict = {}  # the pooled moving features of each level, made once for the fit and the costs
        residual = aff.fit_affine(feat_f, waff, feat_m, eaff, weight_fixed=weight_fit, weight_moving=valid_e,
                                  levels=cfg.affine_levels, iters=cfg.affine_iters, search_mm=cfg.search_mm,
                                  start_rotation=aff.rotation_part(world0), prior_weight=cfg.rotation_prior,
                                  cache=pooled, workers=workers)
        # keep the start exactly when the fit did not improve on it (an image onto itself: the identity)
        finest = min(cfg.affine_levels)
        cost_fit = aff.affine_cost(feat_f, waff, feat_m, eaff, residual, weight_fixed=weight_fit,
                                   weight_moving=valid_e, factor=finest, cache=pooled, workers=workers)
        cost_0 = aff.affine_cost(feat_f, waff, feat_m, eaff, np.eye(4), weight_fixed=weight_fit,
                                 weight_moving=valid_e, factor=finest, cache=pooled, workers=workers)
        del pooled
        if not aff.improves(cost_0 + aff.rotation_prior(world0, cfg.rotation_prior),
                            cost_fit + aff.rotation_prior(world0 @ residual, cfg.rotation_prior)):
            residual = np.eye(4)
    world = world0 @ residual
    times["affine"] = time.perf_counter() - t
    if affine:
        progress.stage("affine", times["affine"], f"rotation {aff.rotation_angle_deg(world):.1f} deg from the headers")

    # 5. deformable
    disp_w = None
    adam_stats: dict[str, Any] = {"steps": 0}
    if deformable:
        t = time.perf_counter()
        to_w = np.linalg.inv(residual) @ eaff
        feat_mw = resample_to_grid(Volume(feat_m, to_w), wshape, waff).data
        valid_w = resample_to_grid(Volume(valid_e[None], to_w), wshape, waff).data[0]
        inside = valid_w[weight_f > 0]
        partial = inside.numel() > 0 and float(inside.min()) < 0.999  # MOVING does not cover all of FIXED
        mmask_w = valid_w if mmask_full is not None or partial else None
        grid = max(1, int(round(cfg.convex_grid_mm / s)))
        radius = max(1, int(round(cfg.convex_range_mm / (grid * s))))
        disp_w = convex_stage(feat_f, feat_mw, grid, radius, weight_fixed=fmask_w, weight_moving=mmask_w,
                              inverse_consistent=cfg.inverse_consistent, workers=workers)
        times["convex"] = time.perf_counter() - t
        progress.stage("convex", times["convex"], f"search grid {grid * s:g} mm, range {grid * radius * s:g} mm")
        t = time.perf_counter()
        stride = max(1, int(round(cfg.adam_grid_mm / s)))
        region = None
        if cfg.adam_margin_mm >= 0:
            base = fmask_w.float() if fmask_w is not None else (fg_w > 0.5).float()
            passes = int(round(cfg.adam_margin_mm / s))
            region = (box3(base[None], passes=passes)[0] > 0) if passes > 0 else base > 0
        if cfg.adam_iters > 0:
            disp_w = instance_optimise(feat_f, feat_mw, disp_w, stride=stride, iters=cfg.adam_iters, lam=cfg.lam,
                                       lr=cfg.adam_lr, weight_fixed=fmask_w, weight_moving=mmask_w,
                                       fold_weight=cfg.fold_weight, region=region, tol=cfg.adam_tol, patience=cfg.adam_patience,
                                       stats=adam_stats, workers=workers,
                                       subsample=cfg.adam_subsample)
        times["adam"] = time.perf_counter() - t
        progress.stage("adam", times["adam"], f"{adam_stats['steps']} steps on a {stride * s:g} mm grid")
        del feat_mw

    # 5b. never end worse than the start: compare the similarity of the result with the chosen
    # candidate's start and with the headers, on the working grid's features; keep the best
    t = time.perf_counter()
    similarity = functools.partial(_similarity, feat_f, weight_f, feat_m, valid_e, eaff, waff)
    sim = dict(zip(("headers", "start", "final"), run_tasks(
        [functools.partial(similarity, np.linalg.inv(world0)), functools.partial(similarity, np.eye(4)),
         functools.partial(similarity, residual, disp_w)], workers)))
    del similarity
    fallback = None
    if sim["final"] > min(sim["start"], sim["headers"]) + 1e-6:
        fallback = "headers" if sim["headers"] < sim["start"] else "start"
        progress.warn(f"the registered result matches worse (feature cost {sim['final']:.4g}) than "
                      f"{'the headers' if fallback == 'headers' else 'its initial transform (' + choice + ')'} "
                      f"({sim[fallback]:.4g}): keeping that instead")
        world = np.eye(4) if fallback == "headers" else world0
        disp_w = None
    del feat_m, feat_f
    times["check"] = time.perf_counter() - t
    progress.stage("check", times["check"], f"feature cost {sim['final']:.4g} (start {sim['start']:.4g}, "
                   f"headers {sim['headers']:.4g})" + (f": kept the {fallback}" if fallback else ""))

    # 6. composition and outputs
    t = time.perf_counter()
    def forward_outputs() -> tuple[Any, ...]:
        """The whole map, the deformable stage alone (applied before the affine), and what the whole map gives."""
        deform = (compose_displacement(fixed.shape, fixed.affine, np.eye(4), disp_w, waff) if disp_w is not None
                  else torch.zeros((3, *fixed.shape), device=dev))
        disp = then_affine(deform, fixed.shape, fixed.affine, world)
        moved = apply_displacement(moving, disp, fixed.affine)
        moved_labels = (apply_displacement(Volume(moving_labels.data.to(dev), moving_labels.affine), disp,
                                           fixed.affine, labels=True) if moving_labels is not None else None)
        return disp, deform, moved, moved_labels, folding_percent(disp, affine=fixed.affine)

    with torch.no_grad():
        # the inverse map on MOVING's grid (the longest task) beside all the others
        (disp, deform, moved, moved_labels, fold), inverse = run_tasks([
            forward_outputs, lambda: inverse_displacement(moving.shape, moving.affine, world, disp_w, waff)], workers)
    times["compose"] = time.perf_counter() - t
    progress.stage("compose", times["compose"], f"folding {fold:.3f}%")
    times["total"] = time.perf_counter() - t_start
    report: dict[str, Any] = {
        "features": features,
        "init": init,
        "affine": bool(affine),
        "deformable": bool(deformable),
        "device": str(dev),
        "seed": int(seed),
        "working_spacing_mm": s,
        "working_shape": list(wshape),
        "network_spacing_mm": net_mm,
        "network_share": net_share,
        "world_affine": np.asarray(world).round(6).tolist(),
        "seconds": {k: round(v, 3) for k, v in times.items()},
        "folding_percent": fold,
        "adam_steps": int(adam_stats["steps"]),
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
        "initial_candidates": [{"name": c["name"], "score": round(c["score"], 6), "cost": round(c["cost"], 6),
                                "rotation_deg": round(c["rotation_deg"], 2), "search_score": round(c["search_score"], 6),
                                "refined": bool(c["refined"])} for c in scored],
        "initial_choice": choice,
        "similarity": {k: round(v, 6) for k, v in sim.items()},
        "fallback": fallback,
        "warnings": progress.warnings,
        "synthvox_version": _version(),
        "weights": _weights_info(features, weights, model),
    }
    if label_names:
        report["label_names"] = {str(int(k)): str(v) for k, v in sorted(label_names.items())}
    if moved_labels is not None and fixed_labels is not None:
        # score the labels both maps have (the moving map's ids before warping: a small structure may
        # vanish on a coarser fixed grid and then rightly scores 0); ids in one map only are listed
        ids_f = {int(i) for i in torch.unique(fixed_labels.data).tolist()} - {0}
        ids_m = {int(i) for i in torch.unique(moving_labels.data).tolist()} - {0}
        shared = sorted(ids_f & ids_m)
        report["dice"] = dice_per_label(moved_labels.data.cpu(), fixed_labels.data.cpu(), shared)
        report["labels_only_in_fixed"] = sorted(ids_f - ids_m)
        report["labels_only_in_moving"] = sorted(ids_m - ids_f)
        vals = [v for v in report["dice"].values() if v == v]
        report["mean_dice"] = float(np.mean(vals)) if vals else float("nan")
        if label_names:
            report["dice_by_name"] = {label_names.get(int(k), k): v for k, v in report["dice"].items()}
    return RegistrationResult(
        moved=Volume(moved.data.cpu(), moved.affine),
        warp=warp_to_itk_volume(disp.cpu(), fixed.affine),
        moved_labels=None if moved_labels is None else Volume(moved_labels.data.cpu(), moved_labels.affine),
        world_affine=np.asarray(world),
        displacement=disp.cpu(),
        report=report,
        deformable_warp=warp_to_itk_volume(deform.cpu(), fixed.affine),
        inverse_warp=warp_to_itk_volume(inverse.cpu(), moving.affine),
        fixed=Volume(fixed.data.cpu(), fixed.affine),
        fixed_labels=fixed_labels,
    )
