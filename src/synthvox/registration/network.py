"""The network a registration uses, resolved once before its stages run.

``--weights`` is read here and nowhere else: :func:`resolve_features` says what ``--features auto``
means for them (the one place that resolves it), and :func:`resolve_network` loads the network a
feature kind needs (or takes the one passed in), reads what its model card says about registration
(:mod:`synthvox.models.card`: the spacing at which it sees the images, its share of the features with
``both``) unless the :class:`~synthvox.registration.config.RegistrationConfig` sets them, and records
where the weights came from. The stages get a :class:`FeatureNetwork` of plain values; nothing after
this reads the card. Atlas segmentation resolves one for all its registrations.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from synthvox.errors import InputError
from synthvox.models.card import auto_features, network_share, network_spacing
from synthvox.registration.config import RegistrationConfig
from synthvox.registration.descriptors import FEATURE_KINDS


@dataclass(frozen=True)
class FeatureNetwork:
    """A feature kind with everything its weights decide.

    Attributes:
        kind: ``"mind"``, ``"net"`` or ``"both"``.
        model: the network on the registration's device in eval mode (``None`` for ``"mind"``).
        spacing_mm: the spacing at which the network sees the images (``None``: the working grid as it
            is; always ``None`` without a network).
        shares: each feature set's share of the variance with ``"both"`` (``None`` otherwise).
        weights: where the weights came from, for the report (``None`` for ``"mind"``).
    """

    kind: str
    model: Any = None
    spacing_mm: float | None = None
    shares: dict[str, float] | None = None
    weights: dict[str, Any] | None = None

    @property
    def share(self) -> float | None:
        """The network's share with ``"both"`` (``None`` otherwise)."""
        return self.shares["net"] if self.shares else None


#: What ``--features`` accepts: ``auto`` and the feature kinds.
FEATURE_CHOICES = ("auto", *FEATURE_KINDS)


def resolve_features(features: str, weights: Any = None) -> str:
    """The feature kind ``features`` means with ``weights``: ``"auto"`` -> what the weights' model card
    records as measured best (:func:`synthvox.models.card.auto_features`; ``mind`` without a record),
    any other kind as it is. Every entry point that takes ``--features`` resolves it here.

    Args:
        features: ``"auto"``, ``"mind"``, ``"net"`` or ``"both"``.
        weights: as for :func:`resolve_network` (a resolved :class:`FeatureNetwork`: its kind).

    Raises:
        InputError: an unknown feature kind.
    """
    if features not in FEATURE_CHOICES:
        raise InputError(f"unknown --features {features!r}: use one of {', '.join(FEATURE_CHOICES)}")
    if features != "auto":
        return features
    if isinstance(weights, FeatureNetwork):
        return weights.kind
    return auto_features(weights)


def resolve_network(features: str, weights: Any, config: RegistrationConfig, device: torch.device) -> FeatureNetwork:
    """Resolve ``features`` (:func:`resolve_features`), load the network it needs and read what its
    card says, once.

    Args:
        features: ``"auto"``, ``"mind"``, ``"net"`` or ``"both"``.
        weights: a model directory, a network in memory (its card is its ``model_card`` attribute, set
            by :func:`synthvox.models.load_model`), ``None`` for the shipped default weights, or a
            :class:`FeatureNetwork` already resolved (returned as it is: a batch of pairs loads the
            network once, and every pair's report still names the weights' file).
        config: its ``net_spacing`` and ``net_share``, when set, win over the card.
        device: where the network runs.

    Raises:
        InputError: an unknown feature kind, or ``net``/``both`` without weights.
    """
    features = resolve_features(features, weights)
    if isinstance(weights, FeatureNetwork):
        if weights.kind != features:
            raise InputError(f"a network resolved for --features {weights.kind} was given for --features {features}")
        return weights
    model = feature_model(features, weights, device)
    if model is None:
        return FeatureNetwork(features)
    spacing = config.net_spacing if config.net_spacing is not None else network_spacing(model)
    shares = None
    if features == "both":
        s = config.net_share if config.net_share is not None else network_share(model)
        shares = {"net": s, "mind": 1.0 - s}
    return FeatureNetwork(features, model, spacing, shares, _weights_record(weights, model))


def feature_model(features: str, weights: Any, device: torch.device) -> Any:
    """The network a feature kind (``"mind"``, ``"net"`` or ``"both"``) needs, on ``device`` in eval
    mode (``None`` for ``"mind"``).

    ``weights`` is a model in memory, a weights path, or ``None`` for the shipped default weights.
    """
    if features not in FEATURE_KINDS:
        raise InputError(f"unknown feature kind {features!r}: use one of {', '.join(FEATURE_KINDS)}")
    if features == "mind":
        return None
    if weights is not None and not isinstance(weights, (str, Path)):
        return weights.to(device).eval()
    from synthvox.models import default_weights_path, load_model

    path = weights if weights is not None else default_weights_path()
    if path is None:
        raise InputError(f"--features {features} needs network weights, and no default weights ship yet: pass --weights MODEL_DIR or use --features mind")
    return load_model(path, device).eval()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _weights_record(weights: Any, model: Any) -> dict[str, Any]:
    """Which weights the features come from: path and sha256 of the weights file (of the parameters'
    bytes for a network passed in memory)."""
    if weights is None or isinstance(weights, (str, Path)):
        from synthvox.models import default_weights_path

        path = Path(weights) if weights is not None else default_weights_path()
        assert path is not None
        file = path if path.is_file() else path / "model.safetensors"
        if file.is_file():
            return {"path": str(path), "file": file.name, "sha256": _sha256_file(file)}
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return {"path": None, "file": None, "sha256": h.hexdigest(), "of": "float32 parameters in memory"}
