"""What a weights directory's model card says about registration: which features ``--features auto``
uses, at which spacing the network sees the images, and its share of the features with ``both``.

The decision is measured, not assumed: ``scripts/weights.py decide MODEL_DIR REGISTRATION_JSON`` reads
the output of ``benchmarks/registration.py`` run with those weights, picks the feature kind with the
highest mean Dice on the brain pairs (nichart), and records the choice with every figure behind it in
the card (``config.json`` -> ``extra.model_card.registration``), with the network settings the benchmark
ran with (``--set net_spacing=MM``, ``--set net_share=S``), which registration then uses for these
weights. Weights without such a record get MIND-SSC, the choice that needs no trust in the network.

The network's features depend on the scale it was trained at (the synthetic label maps span the
engine's field of view on ``data.size`` voxels); registration computes them at that spacing and
resamples them onto its working grid (:func:`network_spacing`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

#: Feature kinds ``auto`` can resolve to.
KINDS = ("mind", "net", "both")
#: The benchmark dataset that decides.
DECIDING_DATASET = "nichart"
#: How much better than MIND-SSC on the brain pairs ``auto`` asks of the network's features.
MARGIN = 0.02
#: Registration settings a card records when the benchmark measured them (``--set KEY=VALUE``).
CARD_SETTINGS = ("net_spacing", "net_share")


def model_card(path: str | os.PathLike) -> dict[str, Any]:
    """The model card of a model directory (see :func:`synthvox.models.checkpoint.card_in`)."""
    from synthvox.models.checkpoint import card_in, read_model_config

    return card_in(read_model_config(path)[1])


def training_spacing(card: dict[str, Any]) -> float | None:
    """The voxel size in mm a card's network was trained at: the label maps' field of view (the
    engine's default when the card records no engine settings) over the longest training size; None
    when the card has no training size."""
    from synthvox.synth.labels import LabelConfig

    data = card.get("data") if isinstance(card.get("data"), dict) else {}
    synth = data.get("synth") if isinstance(data.get("synth"), dict) else {}
    labels = synth.get("labels") if isinstance(synth.get("labels"), dict) else {}
    fov, size = labels.get("fov_mm", LabelConfig.fov_mm), data.get("size")
    try:
        mm = float(fov) / max(int(v) for v in size)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return mm if mm > 0 and math.isfinite(mm) else None


#: The network's share of the feature variance with ``--features both`` when a card records none.
DEFAULT_NET_SHARE = 0.5


def _card_of(weights: Any) -> dict[str, Any]:
    """The card of a model directory, of a loaded network (its ``model_card`` attribute), or of the
    shipped weights (None); empty when there is none."""
    from synthvox.models.checkpoint import default_weights_path

    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        card = getattr(weights, "model_card", None)
        return card if isinstance(card, dict) else {}
    path = Path(weights) if weights is not None else default_weights_path()
    return model_card(path) if path is not None else {}


def _recorded(card: dict[str, Any], key: str, upper: float = math.inf) -> float | None:
    """A number the card's registration record chose for ``key``, in (0, ``upper``); None when it
    records none or an unreadable one."""
    rec = card.get("registration") if isinstance(card.get("registration"), dict) else {}
    v = rec.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < upper and math.isfinite(v):
        return float(v)
    return None


def network_spacing(weights: Any = None) -> float | None:
    """The spacing in mm at which registration lets a network see the images.

    What the weights' registration record chose (``net_spacing``, measured), else the voxel size they
    were trained at; ``None`` (the working grid as it is) when the card records neither, or for a
    network that was not loaded from a directory. ``weights``: a model directory, a network (its
    ``model_card`` attribute, set by :func:`synthvox.models.load_model`), or None for the shipped weights.
    """
    card = _card_of(weights)
    chosen = _recorded(card, "net_spacing")
    return chosen if chosen is not None else training_spacing(card)


def network_share(weights: Any = None) -> float:
    """The network's share of the total feature variance with ``--features both`` (MIND-SSC gets the
    rest): what the weights' registration record chose (``net_share``, measured), else
    :data:`DEFAULT_NET_SHARE`. ``weights`` as for :func:`network_spacing`."""
    chosen = _recorded(_card_of(weights), "net_share", upper=1.0)
    return chosen if chosen is not None else DEFAULT_NET_SHARE


def auto_features(weights: Any = None) -> str:
    """What ``--features auto`` means for ``weights`` (as for :func:`network_spacing`): the feature
    kind the card's registration record chose, else ``mind`` (also for a network with no card)."""
    rec = _card_of(weights).get("registration")
    choice = rec.get("features_auto") if isinstance(rec, dict) else None
    return choice if choice in KINDS else "mind"


def measured_settings(results: dict[str, Any]) -> dict[str, float]:
    """The :data:`CARD_SETTINGS` a ``benchmarks/registration.py`` result was measured with (its ``--set``).

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
    """The record to store from a ``benchmarks/registration.py`` result (its parsed ``registration.json``).

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
