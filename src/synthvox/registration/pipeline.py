"""``register``: the whole registration of MOVING onto FIXED, from volumes to a warp and moved images.

Stages (each timed in the report):

1. **Working grid.** FIXED's field of view and axes at an isotropic spacing (2 mm by default, or
   FIXED's own spacing when coarser; capped at ``max_size`` voxels per axis).
2. **Initialisation** (``init``): headers only, centres of mass, or moments of the foregrounds.
3. **Features** of FIXED on the working grid and of MOVING on a grid with the same axes covering all of
   MOVING: MIND-SSC, the network's, or both.
4. **Affine** (optional): translation search then a coarse-to-fine Adam fit on the features.
5. **Deformable** (optional): ConvexAdam's coupled convex search then Adam instance optimisation.
6. **Composition** into one displacement field on FIXED's grid (ITK/ANTs convention), moved image and
   labels, the Jacobian folding and Dice.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synthvox.errors import InputError
from synthvox.metrics import dice_per_label, folding_percent
from synthvox.registration import affine as aff
from synthvox.registration.convex import box3, convex_stage
from synthvox.registration.features import FEATURE_KINDS, FeatureExtractor, combine, feature_scales
from synthvox.registration.instance import instance_optimise
from synthvox.registration.warp import apply_displacement, compose_displacement, warp_to_itk_volume
from synthvox.volume import Volume, grid_for_spacing, resample_to_grid, same_grid, spacing_of


@dataclass(frozen=True)
class RegistrationConfig:
    """Settings of the solver (distances in mm, converted to working-grid voxels).

    Attributes:
        spacing: working spacing; FIXED's finest spacing is used instead when coarser.
        max_size: largest number of working voxels along an axis (the spacing grows to fit).
        affine_levels: pyramid pooling factors of the affine stage, coarse to fine.
        affine_iters: Adam steps per affine level.
        search_mm: half-width of the affine stage's translation search.
        init_search_mm: half-width of the translation search that picks the initial transform.
        convex_grid_mm: control-point spacing of the discrete search.
        convex_range_mm: capture range of the discrete search.
        adam_grid_mm: spacing of the field optimised by Adam.
        adam_iters: Adam steps of the instance optimisation.
        lam: diffusion regularisation weight.
        adam_lr: Adam learning rate of the instance optimisation.
        inverse_consistent: make the coarse stage inverse consistent.
    """

    spacing: float = 2.0
    max_size: int = 192
    affine_levels: tuple[int, ...] = (4, 2)
    affine_iters: tuple[int, ...] = (80, 40)
    search_mm: float = 16.0
    init_search_mm: float = 64.0
    convex_grid_mm: float = 6.0
    convex_range_mm: float = 24.0
    adam_grid_mm: float = 4.0
    adam_iters: int = 80
    lam: float = 1.25
    adam_lr: float = 1.0
    inverse_consistent: bool = True


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
        report: times per stage, folding %, Dice per label, settings.
    """

    moved: Volume
    warp: Volume
    moved_labels: Volume | None
    world_affine: np.ndarray
    displacement: torch.Tensor
    report: dict[str, Any] = field(default_factory=dict)


def working_grid(fixed: Volume, spacing: float = 2.0, max_size: int = 192) -> tuple[tuple[int, int, int], np.ndarray]:
    """FIXED's field of view and axes at an isotropic spacing (see :class:`RegistrationConfig`)."""
    s = max(float(spacing), float(spacing_of(fixed.affine).min()))
    extent = np.asarray(fixed.shape) * spacing_of(fixed.affine)
    s = max(s, float(extent.max()) / max_size)
    return grid_for_spacing(fixed.shape, fixed.affine, s)


def _check_single(vol: Volume, what: str) -> Volume:
    if vol.data.shape[0] != 1:
        raise InputError(f"{what} must have one channel, got {vol.data.shape[0]}")
    return vol


def _check_on_grid(vol: Volume | None, image: Volume, what: str, image_what: str) -> None:
    if vol is not None and not same_grid(vol, image):
        raise InputError(f"{what} is not on the grid of the {image_what} (shape {vol.shape} vs {image.shape}, or a different affine)")


def _resolve_model(features: str, weights: Any, device: torch.device) -> Any:
    if features not in FEATURE_KINDS:
        raise InputError(f"unknown --features {features!r}: use one of {', '.join(FEATURE_KINDS)}")
    if features == "mind":
        return None
    if weights is not None and not isinstance(weights, (str, Path)):
        return weights.to(device).eval()
    from synthvox.models import default_weights_path, load_model

    path = weights if weights is not None else default_weights_path()
    if path is None:
        raise InputError(f"--features {features} needs network weights, and no default weights ship yet: pass --weights MODEL_DIR or use --features mind")
    return load_model(path, device).eval()


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
) -> RegistrationResult:
    """Register MOVING onto FIXED.

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

    Returns:
        A :class:`RegistrationResult`.

    Raises:
        InputError: multi-channel images, label maps or masks off their image's grid, constant images,
            no overlap after initialisation, net features without weights.
    """
    cfg = config or RegistrationConfig()
    dev = torch.device(device)
    _check_single(fixed, "the fixed image")
    _check_single(moving, "the moving image")
    _check_on_grid(fixed_labels, fixed, "the fixed label map", "fixed image")
    _check_on_grid(moving_labels, moving, "the moving label map", "moving image")
    _check_on_grid(fixed_mask, fixed, "the fixed mask", "fixed image")
    _check_on_grid(moving_mask, moving, "the moving mask", "moving image")
    times: dict[str, float] = {}
    t_start = time.perf_counter()
    model = _resolve_model(features, weights, dev)
    fixed = Volume(fixed.data.float().to(dev), fixed.affine)
    moving = Volume(moving.data.float().to(dev), moving.affine)
    times["load_model"] = time.perf_counter() - t_start

    # 1-2. working grid and initialisation
    t = time.perf_counter()
    wshape, waff = working_grid(fixed, cfg.spacing, cfg.max_size)
    s = float(spacing_of(waff)[0])
    fmask_full = fixed_mask.data[0].to(dev) > 0 if fixed_mask is not None else None
    mmask_full = moving_mask.data[0].to(dev) > 0 if moving_mask is not None else None
    for m, what in ((fmask_full, "fixed"), (mmask_full, "moving")):
        if m is not None and not bool(m.any()):
            raise InputError(f"the {what} mask is empty")
    fixed_fg = fmask_full if fmask_full is not None else aff.foreground(fixed.data)
    moving_fg = mmask_full if mmask_full is not None else aff.foreground(moving.data)
    candidates = aff.initial_candidates(fixed, moving, init, fixed_fg, moving_fg)
    fixed_w = resample_to_grid(fixed, wshape, waff)
    fg_w = resample_to_grid(Volume(fixed_fg[None].float(), fixed.affine), wshape, waff).data[0]
    if init == "none":
        world0 = candidates[0]
    else:
        world0 = aff.choose_initial(fixed_w, fg_w, moving, candidates, search_mm=cfg.init_search_mm)
    if not aff.bounding_boxes_overlap(fixed.shape, fixed.affine, moving.shape, moving.affine, world0):
        raise InputError(f"the fixed and moving images do not overlap in world space after --init {init} (check their headers, or use --init com/moments)")
    fmask_w = None
    if fmask_full is not None:
        fmask_w = fg_w > 0.5
    eshape, eaff = aff.extended_grid(waff, moving, world0, max_size=max(cfg.max_size, 256))
    moving_e = aff.resample_through(moving, world0, eshape, eaff)
    mmask_e = None
    if mmask_full is not None:
        mmask_e = aff.resample_through(Volume(mmask_full[None].float(), moving.affine), world0, eshape, eaff).data[0] > 0.5
    times["init"] = time.perf_counter() - t

    # 3. features
    t = time.perf_counter()
    extractor = FeatureExtractor(kind=features, model=model, device=dev, modality_fixed=modality_fixed,
                                 modality_moving=modality_moving, ct_window=ct_window)
    raw_f = extractor.raw(fixed_w.data, "fixed")
    raw_m = extractor.raw(moving_e.data, "moving")
    scales = feature_scales(raw_f, fg_w > 0.5)
    feat_f = combine(raw_f, scales)
    feat_m = combine(raw_m, scales)
    del raw_f, raw_m
    times["features"] = time.perf_counter() - t

    # 4. affine
    t = time.perf_counter()
    weight_f = fmask_w.float() if fmask_w is not None else box3((fg_w > 0.5).float()[None], passes=2)[0].gt(0).float()
    residual = np.eye(4)
    if affine:
        residual = aff.fit_affine(feat_f, waff, feat_m, eaff, weight_fixed=weight_f,
                                  weight_moving=mmask_e.float() if mmask_e is not None else None,
                                  levels=cfg.affine_levels, iters=cfg.affine_iters, search_mm=cfg.search_mm)
    world = world0 @ residual
    times["affine"] = time.perf_counter() - t

    # 5. deformable
    disp_w = None
    if deformable:
        t = time.perf_counter()
        to_w = np.linalg.inv(residual) @ eaff
        feat_mw = resample_to_grid(Volume(feat_m, to_w), wshape, waff).data
        mmask_w = None
        if mmask_e is not None:
            mmask_w = resample_to_grid(Volume(mmask_e[None].float(), to_w), wshape, waff).data[0]
        grid = max(1, int(round(cfg.convex_grid_mm / s)))
        radius = max(1, int(round(cfg.convex_range_mm / (grid * s))))
        disp_w = convex_stage(feat_f, feat_mw, grid, radius, weight_fixed=fmask_w, weight_moving=mmask_w,
                              inverse_consistent=cfg.inverse_consistent)
        times["convex"] = time.perf_counter() - t
        t = time.perf_counter()
        if cfg.adam_iters > 0:
            stride = max(1, int(round(cfg.adam_grid_mm / s)))
            disp_w = instance_optimise(feat_f, feat_mw, disp_w, stride=stride, iters=cfg.adam_iters, lam=cfg.lam,
                                       lr=cfg.adam_lr, weight_fixed=fmask_w, weight_moving=mmask_w)
        times["adam"] = time.perf_counter() - t
        del feat_mw

    # 6. composition and outputs
    t = time.perf_counter()
    with torch.no_grad():
        disp = compose_displacement(fixed.shape, fixed.affine, world, disp_w, waff)
        moved = apply_displacement(moving, disp, fixed.affine)
        moved_labels = None
        if moving_labels is not None:
            moved_labels = apply_displacement(Volume(moving_labels.data.to(dev), moving_labels.affine), disp,
                                              fixed.affine, labels=True)
        fold = folding_percent(disp, affine=fixed.affine)
    times["compose"] = time.perf_counter() - t
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
        "world_affine": np.asarray(world).round(6).tolist(),
        "seconds": {k: round(v, 3) for k, v in times.items()},
        "folding_percent": fold,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
    }
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
    return RegistrationResult(
        moved=Volume(moved.data.cpu(), moved.affine),
        warp=warp_to_itk_volume(disp.cpu(), fixed.affine),
        moved_labels=None if moved_labels is None else Volume(moved_labels.data.cpu(), moved_labels.affine),
        world_affine=np.asarray(world),
        displacement=disp.cpu(),
        report=report,
    )
