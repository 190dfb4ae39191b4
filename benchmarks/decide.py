"""Record in a weights directory's model card what ``--features auto`` picks, decided on the
registration benchmark's result (``benchmarks/registration.py``'s ``registration.json``, run with
those weights).

The rule: the feature kind with the highest mean Dice on the brain pairs (nichart), where ``net`` or
``both`` must beat MIND-SSC by :data:`MARGIN` and not fall below it on any other dataset measured.
The record (``config.json`` -> ``extra.model_card.registration``) keeps every figure behind the
choice and the network settings the benchmark ran with (``--set net_spacing=MM``, ``--set
net_share=S``); the package only reads it (:mod:`synthvox.models.card`).

    python -m benchmarks.decide src/synthvox/data/weights/default benchmarks/results/registration.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from synthvox.models.card import CARD_SETTINGS, KINDS

#: The benchmark dataset that decides.
DECIDING_DATASET = "nichart"
#: How much better than MIND-SSC on the brain pairs ``auto`` asks of the network's features.
MARGIN = 0.02


def measured_settings(results: dict[str, Any]) -> dict[str, float]:
    """The :data:`~synthvox.models.card.CARD_SETTINGS` a registration benchmark result was measured
    with (its ``--set``).

    Raises:
        ValueError: it was measured with another setting changed, which a card cannot carry (its
            figures would not be those of the defaults), or with a value that is not a number.
    """
    config = results.get("synthvox_config")
    pairs = config.get("set", []) if isinstance(config, dict) else []
    if isinstance(config, dict) and set(config) - {"set"}:
        raise ValueError("the registration result was measured with the quick settings: decide on a full run")
    out: dict[str, float] = {}
    for kv in pairs:
        key, _, value = str(kv).partition("=")
        key = key.strip()
        if key not in CARD_SETTINGS:
            raise ValueError(f"the registration result was measured with --set {kv}, which a model card cannot "
                             f"record (only {', '.join(CARD_SETTINGS)})")
        try:
            out[key] = float(value)
        except ValueError:
            raise ValueError(f"--set {kv} in the registration result is not a number") from None
    return out


def decide(results: dict[str, Any]) -> dict[str, Any]:
    """The record to store from a registration benchmark result (its parsed ``registration.json``).

    ``auto`` leaves MIND-SSC only for a kind that beats it by :data:`MARGIN` mean Dice on the brain
    pairs and is not below it on any other dataset the result holds (the spine, MR -> CT): the
    network's features are meant for any anatomy, and a user of ``auto`` (``synthvox demo`` among them)
    registers more than brains. Among those, the highest brain figure.

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

    def holds(kind: str) -> bool:
        others = [per for ds, per in figures.items() if ds != DECIDING_DATASET and "mind" in per and kind in per]
        return means[kind] >= means["mind"] + MARGIN and all(per[kind] >= per["mind"] for per in others)

    chosen = max([k for k in KINDS if k == "mind" or holds(k)], key=lambda k: means[k])
    return {
        **measured_settings(results),
        "features_auto": chosen,
        "decided_on": (f"{DECIDING_DATASET} mean Dice, highest of {', '.join(KINDS)}, where net or both must beat mind "
                       f"by {MARGIN} and not fall below it on any other dataset measured"),
        "mean_dice": figures,
        "pairs": results.get("pairs"),
        "benchmark": "benchmarks/registration.py",
        "date": results.get("date"),
        "commit": results.get("commit"),
    }


def record(model: Path, registration_json: Path) -> dict[str, Any]:
    """Decide on ``registration_json`` and write the record into ``model``'s card (atomically).

    Raises:
        InputError: ``model`` is not a readable model directory.
        OSError, ValueError: the result cannot be read or decides nothing (see :func:`decide`).
    """
    from synthvox.files import atomic_path
    from synthvox.models.weightsdir import read_model_config

    model, cfg = read_model_config(model)
    rec = decide(json.loads(Path(registration_json).read_text(encoding="utf-8")))
    cfg.setdefault("extra", {}).setdefault("model_card", {})["registration"] = rec
    with atomic_path(model / "config.json") as tmp:
        tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    (model / "config.json").chmod(0o644)
    return rec


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="the weights directory whose card gets the record")
    ap.add_argument("registration_json", type=Path, help="benchmarks/registration.py's result, run with those weights")
    args = ap.parse_args(argv)
    from synthvox.errors import InputError

    try:
        rec = record(args.model, args.registration_json)
    except (InputError, OSError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    print(f"--features auto -> {rec['features_auto']} ({rec['decided_on']}: {rec['mean_dice'].get('nichart')})")


if __name__ == "__main__":
    main()
