"""``register``: the whole registration of MOVING onto FIXED, from volumes to a warp and moved images.

:func:`register` checks its inputs, resolves the network once (:mod:`synthvox.registration.network`:
the model, its spacing and its share, from ``weights`` and the config), runs the stages of
:mod:`synthvox.registration.stages` over one state (init, features, affine, convex, adam, check,
compose; each timed in the report) and turns the state into a :class:`RegistrationResult` with its
report.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synthvox.errors import InputError
from synthvox.metrics import dice_per_label
from synthvox.registration.config import RegistrationConfig
from synthvox.registration.network import resolve_network
from synthvox.registration.parallel import single_op_threads
from synthvox.registration.stages import State, run_stages, stages, use_start
from synthvox.registration.warp import warp_to_itk_volume
from synthvox.volume import Volume, check_world_matrix, same_grid, snap_affine


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
        jacobian: the Jacobian determinant of the whole map on FIXED's grid (asked with
            ``jacobian=True``); its share of values ``<= 0`` is the report's ``folding_percent``.
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
    jacobian: Volume | None = None

    def save(self, out: str | Path, *, force: bool = False, title: str | None = None) -> list[Path]:
        """Write every output into the folder ``out`` as ``synthvox register`` does (see
        :func:`synthvox.registration.outputs.save`); returns the paths written."""
        from synthvox.registration.outputs import save

        return save(self, out, force=force, title=title)


def _check_inputs(fixed: Volume, moving: Volume, fixed_labels: Volume | None, moving_labels: Volume | None,
                  fixed_mask: Volume | None, moving_mask: Volume | None) -> None:
    """Refuse multi-channel images, and label maps or masks off their image's grid."""
    for vol, what in ((fixed, "the fixed image"), (moving, "the moving image")):
        if vol.data.shape[0] != 1:
            raise InputError(f"{what} must have one channel, got {vol.data.shape[0]}")
    for vol, image, what, image_what in ((fixed_labels, fixed, "the fixed label map", "fixed image"),
                                         (moving_labels, moving, "the moving label map", "moving image"),
                                         (fixed_mask, fixed, "the fixed mask", "fixed image"),
                                         (moving_mask, moving, "the moving mask", "moving image")):
        if vol is not None and not same_grid(vol, image):
            raise InputError(f"{what} is not on the grid of the {image_what} (shape {vol.shape} vs {image.shape}, or a different affine)")


def _mask(mask: Volume | None, device: torch.device, what: str) -> torch.Tensor | None:
    """A mask as a boolean ``(X, Y, Z)`` on ``device``; an empty one is refused."""
    if mask is None:
        return None
    m = mask.data[0].to(device) > 0
    if not bool(m.any()):
        raise InputError(f"the {what} mask is empty")
    return m


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


def register(
    fixed: Volume,
    moving: Volume,
    config: RegistrationConfig | None = None,
    *,
    features: str = "mind",
    weights: Any = None,
    device: torch.device | str = "cpu",
    moving_labels: Volume | None = None,
    fixed_labels: Volume | None = None,
    fixed_mask: Volume | None = None,
    moving_mask: Volume | None = None,
    init: str = "moments",
    initial_transform: np.ndarray | None = None,
    affine: bool = True,
    deformable: bool = True,
    modality_fixed: str = "auto",
    modality_moving: str = "auto",
    ct_window: tuple[float, float] | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    label_names: Mapping[int, str] | None = None,
    jacobian: bool = False,
    fixed_points: np.ndarray | None = None,
    moving_points: np.ndarray | None = None,
    point_labels: list[str] | None = None,
    **overrides: Any,
) -> RegistrationResult:
    """Register MOVING onto FIXED.

    The network is resolved first (:func:`synthvox.registration.network.resolve_network`, which also
    says what ``features="auto"`` means for the weights), then the stages of
    :mod:`synthvox.registration.stages` run in order.

    On the CPU it runs with one intra-op torch thread and spreads independent tasks over as many
    threads as ``torch.get_num_threads()`` allowed (restored afterwards; see
    :mod:`synthvox.registration.parallel`): the result does not depend on the number of threads.

    Args:
        fixed: the reference image, any grid.
        moving: the image to align, any grid, spacing and orientation.
        config: the solver's settings (:class:`~synthvox.registration.config.RegistrationConfig`;
            ``None``: its defaults), with ``overrides`` on top.
        features: ``"mind"`` (MIND-SSC, needs no network), ``"net"``, ``"both"`` or ``"auto"`` (what
            the weights' model card records as measured best: :func:`synthvox.registration.network.resolve_features`).
        weights: a model directory, or a loaded network (``None``: the default weights).
        device: where to compute.
        moving_labels: MOVING's label map (same grid as MOVING), carried onto FIXED's grid.
        fixed_labels: FIXED's label map (same grid as FIXED): Dice of every label id found in both
            label maps in the report (ids in only one of them are listed, not scored).
        fixed_mask: region of FIXED to match (same grid as FIXED).
        moving_mask: region of MOVING to match (same grid as MOVING).
        init: ``"none"``, ``"com"`` or ``"moments"``.
        initial_transform: a 4x4 fixed-world to moving-world (RAS) matrix to start from instead of the
            ``init`` search (:func:`synthvox.io.load_transform` reads ITK/ANTs files into one).
        affine: run the affine stage (rigid with ``config.transform == "rigid"``).
        deformable: run the deformable stage (only with ``config.transform == "deformable"``, the
            default: ``"rigid"`` and ``"affine"`` stop after the affine stage).
        modality_fixed: intensity normalisation for the network: ``"auto"``, ``"mr"`` or ``"ct"``.
        modality_moving: the same for MOVING.
        ct_window: optional CT window ``(low, high)`` in HU for the network.
        seed: recorded in the report; every stage is deterministic (no random sampling).
        log: called with one line per stage (progress) and per warning; ``None``: warnings go to
            stderr, progress nowhere.
        label_names: label id -> name, recorded in the report (and Dice by name).
        jacobian: also return the whole map's Jacobian determinant on FIXED's grid.
        fixed_points: ``(N, 3)`` landmarks in FIXED's world (RAS mm), with ``moving_points`` the
            corresponding ones in MOVING's: the report's ``landmarks`` holds the target registration
            error before (the headers) and after, mean and per point (see
            :mod:`synthvox.registration.landmarks`).
        moving_points: ``(N, 3)`` the corresponding landmarks in MOVING's world.
        point_labels: the landmarks' names, for the report.
        **overrides: :class:`~synthvox.registration.config.RegistrationConfig` fields replacing those
            of ``config`` (``transform="affine"``, ``adam_iters=40``, ``spacing=2.0``...;
            :meth:`RegistrationConfig.with_settings`).

    Returns:
        A :class:`RegistrationResult`.

    Raises:
        InputError: an unknown setting or feature kind, multi-channel images, label maps or masks off
            their image's grid, constant images, no overlap after initialisation, net features without
            weights.
    """
    dev = torch.device(device)
    cfg = (config or RegistrationConfig()).with_settings(**overrides)
    start = None if initial_transform is None else check_world_matrix(initial_transform)
    deformable = deformable and cfg.transform == "deformable"
    _check_inputs(fixed, moving, fixed_labels, moving_labels, fixed_mask, moving_mask)
    if (fixed_points is None) != (moving_points is None) or (
            fixed_points is not None and np.shape(fixed_points) != np.shape(moving_points)):
        raise InputError("landmarks need both fixed and moving points, as many of each (in the same order)")
    progress = _Progress(log)
    # one intra-op thread, independent tasks side by side instead (see registration.parallel)
    with single_op_threads(dev) as workers:
        t_start = time.perf_counter()
        network = resolve_network(features, weights, cfg, dev)
        # the search sees the affines snapped, the outputs the images' own (see registration.stages)
        st = State(fixed=Volume(fixed.data.float().to(dev), snap_affine(fixed.affine)),
                   moving=Volume(moving.data.float().to(dev), snap_affine(moving.affine)),
                   headers=(np.asarray(fixed.affine, np.float64), np.asarray(moving.affine, np.float64)),
                   fixed_mask=_mask(fixed_mask, dev, "fixed"), moving_mask=_mask(moving_mask, dev, "moving"),
                   moving_labels=moving_labels, network=network, cfg=cfg, init=init,
                   modality_fixed=modality_fixed, modality_moving=modality_moving, ct_window=ct_window,
                   device=dev, workers=workers, warn=progress.warn)
        st.times["load_model"] = time.perf_counter() - t_start
        run_stages(st, stages(affine, deformable, start=None if start is None else use_start(start)), progress.stage)
        st.times["total"] = time.perf_counter() - t_start
        landmarks = None
        if fixed_points is not None:
            from synthvox.registration.landmarks import map_points_through, tre_report

            mapped = map_points_through(fixed_points, st.world, st.outputs.deformable, st.fixed.affine)  # type: ignore[union-attr]
            landmarks = tre_report(fixed_points, moving_points, mapped, point_labels)  # type: ignore[arg-type]
        return _result(st, _report(st, affine=affine, deformable=deformable, seed=seed, warnings=progress.warnings),
                       moving_labels, fixed_labels, label_names, jacobian=jacobian,
                       landmarks=landmarks)


def _result(st: State, report: dict[str, Any], moving_labels: Volume | None, fixed_labels: Volume | None,
            label_names: Mapping[int, str] | None, jacobian: bool = False,
            landmarks: dict[str, Any] | None = None) -> RegistrationResult:
    """The result of a registration's state (on the CPU), its report with the labels' names and Dice,
    and with ``jacobian`` the whole map's Jacobian determinant (as the folding was measured)."""
    out = st.outputs
    assert out is not None
    if landmarks is not None:
        report["landmarks"] = landmarks
    det = None
    if jacobian:
        with torch.no_grad():
            det = jacobian_volume(out.displacement, st.fixed.affine)
    if label_names:
        report["label_names"] = {str(int(k)): str(v) for k, v in sorted(label_names.items())}
    if out.moved_labels is not None and fixed_labels is not None:
        report.update(_dice(out.moved_labels, fixed_labels, moving_labels, label_names))  # type: ignore[arg-type]
    return RegistrationResult(
        moved=Volume(out.moved.data.cpu(), out.moved.affine),
        warp=warp_to_itk_volume(out.displacement.cpu(), st.fixed.affine),
        moved_labels=None if out.moved_labels is None else Volume(out.moved_labels.data.cpu(), out.moved_labels.affine),
        world_affine=np.asarray(st.world),
        displacement=out.displacement.cpu(),
        report=report,
        deformable_warp=warp_to_itk_volume(out.deformable.cpu(), st.fixed.affine),
        inverse_warp=warp_to_itk_volume(out.inverse.cpu(), st.moving.affine),
        fixed=Volume(st.fixed.data.cpu(), st.fixed.affine),
        fixed_labels=fixed_labels,
        jacobian=det,
    )


def jacobian_volume(displacement: torch.Tensor, affine: np.ndarray) -> Volume:
    """The Jacobian determinant of ``x -> x + d(x)`` (RAS displacement on the grid ``affine``) as a
    float32 volume on the CPU whose values ``<= 0`` are exactly those of
    :func:`synthvox.metrics.folding_percent` (a positive determinant too small for float32 stays positive)."""
    from synthvox.metrics import jacobian_determinant

    det = jacobian_determinant(displacement, affine=affine)
    out = det.float()
    out = torch.where((det > 0) & (out <= 0), torch.finfo(torch.float32).tiny, out)
    return Volume(out.cpu()[None], np.asarray(affine, np.float64).copy())


def _report(st: State, *, affine: bool, deformable: bool, seed: int, warnings: list[str]) -> dict[str, Any]:
    """The report of a registration's state: settings, times, the transform and the checks."""
    from synthvox import __version__

    return {
        "features": st.network.kind,
        "init": st.init if st.choice != "given" else "given",
        "transform": st.cfg.transform,
        "affine": bool(affine),
        "deformable": bool(deformable),
        "device": str(st.device),
        "seed": int(seed),
        "working_spacing_mm": st.spacing,
        "working_shape": list(st.grid.shape),  # type: ignore[union-attr]
        "network_spacing_mm": st.network.spacing_mm,
        "network_share": st.network.share,
        "world_affine": np.asarray(st.world).round(6).tolist(),
        "seconds": {k: round(v, 3) for k, v in st.times.items()},
        "folding_percent": st.outputs.folding,  # type: ignore[union-attr]
        "adam_steps": st.adam_steps,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(st.cfg).items()},
        "initial_candidates": [{"name": c["name"], "score": round(c["score"], 6), "cost": round(c["cost"], 6),
                                "rotation_deg": round(c["rotation_deg"], 2), "search_score": round(c["search_score"], 6),
                                "refined": bool(c["refined"])} for c in st.scored],
        "initial_choice": st.choice,
        "similarity": {k: round(v, 6) for k, v in st.similarity.items()},
        "fallback": st.fallback,
        "warnings": warnings,
        "synthvox_version": __version__,
        "weights": st.network.weights,
    }


def _dice(moved_labels: Volume, fixed_labels: Volume, moving_labels: Volume,
          label_names: Mapping[int, str] | None) -> dict[str, Any]:
    """Dice of the labels both maps have (the moving map's ids before warping: a small structure may
    vanish on a coarser fixed grid and then rightly scores 0); ids in one map only are listed."""
    ids_f = {int(i) for i in torch.unique(fixed_labels.data).tolist()} - {0}
    ids_m = {int(i) for i in torch.unique(moving_labels.data).tolist()} - {0}
    dice = dice_per_label(moved_labels.data.cpu(), fixed_labels.data.cpu(), sorted(ids_f & ids_m))
    vals = [v for v in dice.values() if v == v]
    out: dict[str, Any] = {"dice": dice, "labels_only_in_fixed": sorted(ids_f - ids_m),
                           "labels_only_in_moving": sorted(ids_m - ids_f),
                           "mean_dice": float(np.mean(vals)) if vals else float("nan")}
    if label_names:
        out["dice_by_name"] = {label_names.get(int(k), k): v for k, v in dice.items()}
    return out
