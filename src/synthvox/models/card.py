"""What a weights directory's model card says about registration: which features ``--features auto`` uses.

The decision is measured, not assumed: ``scripts/weights.py decide MODEL_DIR REGISTRATION_JSON`` reads
the output of ``benchmarks/registration.py`` run with those weights, picks the feature kind with the
highest mean Dice on the brain pairs (nichart), and records the choice with every figure behind it in
the card (``config.json`` -> ``extra.model_card.registration``). Weights without such a record get
MIND-SSC, the choice that needs no trust in the network.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: Feature kinds ``auto`` can resolve to.
KINDS = ("mind", "net", "both")
#: The benchmark dataset that decides.
DECIDING_DATASET = "nichart"


def registration_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``registration`` record of a model directory's card, or None when it has none."""
    from synthvox.models.checkpoint import read_model_config

    _, cfg = read_model_config(path)
    extra = cfg.get("extra") if isinstance(cfg.get("extra"), dict) else {}
    card = extra.get("model_card") if isinstance(extra.get("model_card"), dict) else {}
    rec = card.get("registration")
    return rec if isinstance(rec, dict) else None


def auto_features(weights: Any = None) -> str:
    """What ``--features auto`` means for ``weights`` (a model directory; None: the shipped weights).

    A loaded network (no card to read) or weights whose card records no measured choice give ``mind``.
    """
    from synthvox.models.checkpoint import default_weights_path

    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        return "mind"
    path = Path(weights) if weights is not None else default_weights_path()
    if path is None:
        return "mind"
    rec = registration_record(path)
    choice = rec.get("features_auto") if rec else None
    return choice if choice in KINDS else "mind"


def decide(results: dict[str, Any]) -> dict[str, Any]:
    """The record to store from a ``benchmarks/registration.py`` result (its parsed ``registration.json``).

    Raises:
        ValueError: the result lacks the deciding dataset or any of mind, net and both.
    """
    res = results.get("results", {}).get(DECIDING_DATASET, {})
    means = {k: res[k]["summary"]["mean_dice"] for k in KINDS if k in res and "summary" in res[k]}
    missing = [k for k in KINDS if k not in means]
    if missing:
        raise ValueError(f"the registration result has no {DECIDING_DATASET} figures for {', '.join(missing)}")
    figures = {ds: {m: round(float(r["summary"]["mean_dice"]), 4) for m, r in per.items() if "summary" in r}
               for ds, per in results.get("results", {}).items()}
    return {
        "features_auto": max(KINDS, key=lambda k: means[k]),
        "decided_on": f"{DECIDING_DATASET} mean Dice, highest of {', '.join(KINDS)}",
        "mean_dice": figures,
        "pairs": results.get("pairs"),
        "benchmark": "benchmarks/registration.py",
        "date": results.get("date"),
        "commit": results.get("commit"),
    }
