"""The solver's settings: :class:`RegistrationConfig`, plain data (what depends on the network's
weights is resolved from them by :func:`synthvox.registration.network.resolve_network`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from synthvox.config import apply_overrides, check_names
from synthvox.errors import InputError
from synthvox.registration.grids import MAX_WORKING_SIZE, MIN_WORKING_SIZE, WORKING_SPACING
from synthvox.registration.initial import REFINE
from synthvox.registration.rotation import PRIOR_WEIGHT

#: How far a registration goes (``--transform``): the start and a rigid fit, the start and an affine
#: fit, or those and the deformable stages.
TRANSFORM_KINDS = ("rigid", "affine", "deformable")
#: Which of MOVING's features the deformable stages compute again on the working grid (``matched_fov``).
MATCHED_FOV = ("network", "all", "none")


@dataclass(frozen=True)
class RegistrationConfig:
    """Settings of the solver (distances in mm, converted to working-grid voxels).

    Attributes:
        transform: how far to go (``--transform``): ``"rigid"`` (the start, then a rigid fit),
            ``"affine"`` (the start, then an affine fit) or ``"deformable"`` (those and the deformable
            stages). The outputs are the same files; the warp then holds the rigid or affine map.
        spacing: working spacing; FIXED's finest spacing is used instead when coarser (default
            :data:`~synthvox.registration.grids.WORKING_SPACING`, the one default of every entry point
            but atlas segmentation's :data:`~synthvox.segmentation.atlas.ATLAS_SPACING`).
        max_size: largest number of working voxels along an axis (the spacing grows to fit).
        min_size: fewest working voxels along the longest axis (the spacing shrinks to fit, down to
            FIXED's own; see :data:`~synthvox.registration.grids.MIN_WORKING_SIZE`).
        affine_levels: pyramid pooling factors of the affine stage, coarse to fine.
        affine_iters: Adam steps per affine level.
        search_mm: half-width of the affine stage's translation search.
        init_search_mm: half-width of the translation search that picks the initial transform.
        init_iters: Adam steps of the short coarse affine that scores the best initial candidates.
        init_refine: how many of the candidates, ranked by their translation search, get that short
            affine (0: all of them); only those can be chosen.
        rotation_prior: weight of the prior against rotations far from the headers' (initial scoring
            and affine stage; see :data:`synthvox.registration.rotation.PRIOR_WEIGHT`).
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
            :func:`synthvox.models.card.network_spacing`: the voxel size they were trained at), read
            once by :func:`synthvox.registration.network.resolve_network`.
        net_share: with ``both``, the network's share of the total feature variance (MIND-SSC gets the
            rest), in (0, 1). None: what the weights' card says (:func:`synthvox.models.card.network_share`:
            a measured choice, else one half), read there too.
        matched_fov: with the network (``net``, ``both``), compute MOVING's features for the deformable
            stages again, on the working grid after the start and the affine, so that both feature sets
            come from the same field of view (a network whose features depend on what else the volume
            holds then sees the same window twice; one more network pass): ``"all"`` (the default)
            every feature set of MOVING, ``"network"`` the network's channels only, ``"none"`` neither
            (each image's features on its own field of view, resampled). benchmarks/README.md has the
            figures.
    """

    transform: str = "deformable"
    spacing: float = WORKING_SPACING
    max_size: int = MAX_WORKING_SIZE
    min_size: int = MIN_WORKING_SIZE
    affine_levels: tuple[int, ...] = (4, 2)
    affine_iters: tuple[int, ...] = (80, 40)
    search_mm: float = 16.0
    init_search_mm: float = 64.0
    init_iters: int = 30
    init_refine: int = REFINE
    rotation_prior: float = PRIOR_WEIGHT
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
    matched_fov: str = "all"

    def __post_init__(self) -> None:
        if self.matched_fov not in MATCHED_FOV:
            raise InputError(f"matched_fov must be one of {', '.join(MATCHED_FOV)}, got {self.matched_fov!r}")
        if self.transform not in TRANSFORM_KINDS:
            raise InputError(f"unknown transform {self.transform!r}: use one of {', '.join(TRANSFORM_KINDS)}")
        if self.net_spacing is not None and not (self.net_spacing > 0 and math.isfinite(self.net_spacing)):
            raise InputError(f"net_spacing must be a positive number of mm, got {self.net_spacing}")
        if self.net_share is not None and not 0 < self.net_share < 1:
            raise InputError(f"net_share must be between 0 and 1 (exclusive), got {self.net_share}")

    def with_settings(self, **settings: Any) -> RegistrationConfig:
        """A copy with ``settings`` (field names: ``adam_iters=40``, ``spacing=2.0``...) replacing these
        fields, each checked against its type and the checks above, as ``--set KEY=VALUE`` is.

        Raises:
            InputError: a setting that is not a field (one line, with the closest field's name), or a
                value of the wrong type or out of range.
        """
        if not settings:
            return self
        check_names(settings, [f.name for f in dataclasses.fields(self)], "registration setting")
        return apply_overrides(self, settings, "registration settings")
