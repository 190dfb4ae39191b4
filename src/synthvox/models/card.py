"""What a weights directory's model card says about registration: which features ``--features auto``
uses, at which spacing the network sees the images, and its share of the features with ``both``.

The package only reads the card's record (``config.json`` -> ``extra.model_card.registration``): the
feature kind ``auto`` means, and the network settings (``net_spacing``, ``net_share``) registration
then uses for these weights. The record is decided outside the package, on a measured registration
benchmark (``python -m benchmarks.decide MODEL_DIR REGISTRATION_JSON``); weights without one get
MIND-SSC, the choice that needs no trust in the network.

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
#: Registration settings a card's record can hold (measured with the benchmark's ``--set KEY=VALUE``).
CARD_SETTINGS = ("net_spacing", "net_share")


def model_card(path: str | os.PathLike) -> dict[str, Any]:
    """The model card of a model directory (see :func:`synthvox.models.weightsdir.card_in`)."""
    from synthvox.models.weightsdir import card_in, read_model_config

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
    from synthvox.models.weightsdir import default_weights_path

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
