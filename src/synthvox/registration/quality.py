"""A quality flag per registration of a batch, from what the registrations know (no labels needed).

Each finished pair's ``report.json`` holds the final feature cost of its result (the similarity check
of the ``check`` stage: a mean squared difference of the features, lower is better), whether that
check fell back to the start or the headers, the folding, and the affine part of the map. A pair is
flagged ``check`` when:

* its final cost is more than :data:`COST_EXCESS` above the median of the batch's finished pairs
  (with at least :data:`MIN_PAIRS` of them): the batch is its own reference, since the cost of a good
  registration depends on the contrasts and the feature setting (on the nichart dev batch, T1 onto
  FLAIR, the good pairs were at most 6% above their median and the failed ones 19-25% above it;
  the threshold was chosen on that batch);
* the affine part turns MOVING more than :data:`ROTATION_LIMIT` degrees away from its header (a head
  in a scanner is rarely turned more than tens of degrees; a wrong header or a failed initial search
  shows up here);
* the registration ended no better than where it started and kept its start or the headers (the
  fallback of the check stage);
* more than :data:`FOLDING_LIMIT` % of the fixed grid folds.

A user sorts ``results.csv`` and opens the few QC pictures flagged.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Share above the batch's median final cost from which a pair is flagged.
COST_EXCESS = 0.15
#: Fewest finished pairs for the batch comparison (fewer: only the other checks).
MIN_PAIRS = 5
#: Rotation away from MOVING's header (degrees) above which a pair is flagged.
ROTATION_LIMIT = 45.0
#: Folding percentage above which a pair is flagged.
FOLDING_LIMIT = 1.0


@dataclass(frozen=True)
class Flag:
    """One pair's flag: ``"ok"`` or ``"check"``, the reasons, its final cost over the batch's median
    (``None`` with fewer than :data:`MIN_PAIRS` pairs or without a cost) and its rotation away from the
    headers in degrees (``None`` without an affine in the report)."""

    flag: str
    reasons: list[str] = field(default_factory=list)
    cost_ratio: float | None = None
    rotation_deg: float | None = None


def _cost(report: Mapping[str, Any]) -> float | None:
    value = (report.get("similarity") or {}).get("final")
    return float(value) if value is not None and float(value) == float(value) else None


def rotation_from_headers(world_affine: Any) -> float | None:
    """The angle (degrees) of the rotation in a fixed-world to moving-world affine (its polar part):
    how far the registration turned MOVING away from where its header puts it."""
    try:
        a = np.asarray(world_affine, float)[:3, :3]
    except (TypeError, ValueError, IndexError):
        return None
    if a.shape != (3, 3) or not np.isfinite(a).all():
        return None
    u, _, vt = np.linalg.svd(a)
    r = u @ vt
    return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0))))


def quality_flags(reports: Sequence[Mapping[str, Any]]) -> list[Flag]:
    """The flag of each report (``report.json`` of finished pairs of one batch), in order."""
    costs = [c for c in map(_cost, reports) if c is not None]
    centre = statistics.median(costs) if len(costs) >= MIN_PAIRS else None
    flags = []
    for rep in reports:
        reasons = []
        cost = _cost(rep)
        ratio = None if cost is None or centre is None or centre <= 0 else cost / centre
        if ratio is not None and ratio > 1.0 + COST_EXCESS:
            reasons.append(f"final feature cost {cost:.4g} is {100 * (ratio - 1):.0f}% above the batch's median {centre:.4g}")
        rotation = rotation_from_headers(rep.get("world_affine")) if rep.get("world_affine") is not None else None
        if rotation is not None and rotation > ROTATION_LIMIT:
            reasons.append(f"MOVING turned {rotation:.0f} degrees away from its header: check the orientation")
        if rep.get("fallback"):
            reasons.append(f"the result matched worse than its start: kept the {rep['fallback']}")
        folding = rep.get("folding_percent")
        if folding is not None and float(folding) > FOLDING_LIMIT:
            reasons.append(f"{float(folding):.2f}% of the grid folds")
        flags.append(Flag("check" if reasons else "ok", reasons, None if ratio is None else round(ratio, 4),
                          None if rotation is None else round(rotation, 1)))
    return flags
