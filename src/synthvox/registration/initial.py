"""Initialisation: the named starts and the choice among them.

:func:`initial_candidates` names the starts: the headers, a translation of the foregrounds' centres of
mass onto each other (``"com"``) and the four rotations of their principal axes onto each other
(``"moments"``); :func:`score_candidates` refines each by an exhaustive translation search (+-64 mm)
and a short affine on coarse MIND features, and scores it by the features' match plus the prior against
rotations far from the headers' (:mod:`synthvox.registration.rotation`), so headers tens of millimetres
off are handled and an elongated, nearly symmetric object does not come out flipped.

Every transform is a 4x4 matrix mapping FIXED's world (RAS, mm) to MOVING's world.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import torch

from synthvox.errors import InputError
from synthvox.registration.affine import affine_cost, fit_affine, improves
from synthvox.registration.descriptors import robust_unit_range, total_std
from synthvox.registration.foreground import foreground
from synthvox.registration.fov import FOV_MARGIN, edge_margins, fov_weight, inner_box
from synthvox.registration.grids import extended_grid, resample_through
from synthvox.registration.mind import mind_ssc
from synthvox.registration.parallel import run_tasks
from synthvox.registration.rotation import PRIOR_WEIGHT, rotation_angle_deg, rotation_part, rotation_prior
from synthvox.volume import Volume, grid_for_spacing, resample_to_grid, spacing_of

INIT_METHODS = ("none", "com", "moments")


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


#: Candidates that get the short affine after all were scored by the translation search alone: on all
#: 15 evaluation pairs (11 brain, 3 spine, MR -> CT) the one the short affine chose was among the best
#: two of the search, and two tasks fill two threads in one round.
REFINE = 2


def score_candidates(fixed_w: Volume, weight_w: torch.Tensor, moving: Volume, candidates: list[Candidate],
                     *, search_mm: float = 64.0, factor: int = 2, iters: int = 30,
                     prior_weight: float = PRIOR_WEIGHT, workers: int = 1, refine: int = REFINE,
                     rigid_only: bool = False) -> list[dict]:
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
        rigid_only: the short fit is rigid (a rotation and a translation), for a rigid registration.

    Returns:
        One dict per candidate, in order: ``name``, ``start`` (the candidate), ``matrix`` (after the
        search, or the short affine), ``cost``, ``rotation_deg`` (of ``matrix``, relative to the
        headers), ``score``, ``search_score`` (the score after the translation search) and ``refined``
        (whether it got the short affine).
    """
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
                       start_rotation=rotation_part(frame), prior_weight=prior_weight, rigid_only=rigid_only, **kw)
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
