"""A quality flag per registration of a batch, from what the registrations know (no labels needed).

Each finished pair's ``report.json`` holds the final feature cost of its result (the similarity check
of the ``check`` stage, lower is better), whether that check fell back to the start or the headers,
and the folding. A pair is flagged ``check`` when:

* its final cost is an outlier of the batch's own distribution: more than :data:`Z_LIMIT` robust
  standard deviations (1.4826 x the median absolute deviation, at least :data:`MIN_SPREAD` of the
  median) above the median of the batch's finished pairs (with at least :data:`MIN_PAIRS` of them);
* the registration ended no better than where it started and kept its start or the headers (the
  fallback of the check stage);
* more than :data:`FOLDING_LIMIT` % of the fixed grid folds.

The cost is comparable within a study (one contrast pair, one feature setting), not across studies:
the batch is its own reference, so a user sorts ``results.csv`` and opens the few QC pictures flagged.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Robust z-score of the final cost above which a pair is flagged.
Z_LIMIT = 3.5
#: Smallest spread assumed, as a share of the median cost (a batch of near-identical pairs).
MIN_SPREAD = 0.05
#: Fewest finished pairs for the batch comparison (fewer: only fallback and folding flag).
MIN_PAIRS = 5
#: Folding percentage above which a pair is flagged.
FOLDING_LIMIT = 1.0


@dataclass(frozen=True)
class Flag:
    """One pair's flag: ``"ok"`` or ``"check"``, the reasons, and the robust z-score of its final cost
    against the batch (``None`` with fewer than :data:`MIN_PAIRS` pairs or without a cost)."""

    flag: str
    reasons: list[str] = field(default_factory=list)
    z: float | None = None


def _cost(report: Mapping[str, Any]) -> float | None:
    value = (report.get("similarity") or {}).get("final")
    return float(value) if value is not None and float(value) == float(value) else None


def quality_flags(reports: Sequence[Mapping[str, Any]]) -> list[Flag]:
    """The flag of each report (``report.json`` of finished pairs of one batch), in order."""
    costs = [c for c in map(_cost, reports) if c is not None]
    centre = scale = None
    if len(costs) >= MIN_PAIRS:
        centre = statistics.median(costs)
        mad = statistics.median(abs(c - centre) for c in costs)
        scale = max(1.4826 * mad, MIN_SPREAD * abs(centre), 1e-12)
    flags = []
    for rep in reports:
        reasons = []
        cost = _cost(rep)
        z = None if cost is None or centre is None else (cost - centre) / scale  # type: ignore[operator]
        if z is not None and z > Z_LIMIT:
            reasons.append(f"final feature cost {cost:.4g} is {z:.1f} robust SDs above the batch's median {centre:.4g}")
        if rep.get("fallback"):
            reasons.append(f"the result matched worse than its start: kept the {rep['fallback']}")
        folding = rep.get("folding_percent")
        if folding is not None and float(folding) > FOLDING_LIMIT:
            reasons.append(f"{float(folding):.2f}% of the grid folds")
        flags.append(Flag("check" if reasons else "ok", reasons, None if z is None else round(z, 3)))
    return flags
