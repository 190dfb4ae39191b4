"""What a weights directory's model card tells registration: the kind --features auto picks, the network's
spacing and share. (The record is decided by benchmarks/decide.py: tests/test_bench_decide.py.)"""

from __future__ import annotations

import json

import pytest

from synthvox.models import load_model, save_model
from synthvox.models.card import auto_features, model_card
from synthvox.models.registry import build_model
from synthvox.registration.network import resolve_features


def test_auto_follows_the_card(tmp_path) -> None:
    md = save_model(build_model("tiny"), tmp_path / "m")
    assert model_card(md).get("registration") is None
    assert auto_features(md) == "mind" and resolve_features("auto", str(md)) == "mind"  # nothing measured: MIND
    cfg = json.loads((md / "config.json").read_text())
    cfg.setdefault("extra", {})["model_card"] = {"registration": {"features_auto": "both"}}
    (md / "config.json").write_text(json.dumps(cfg))
    assert auto_features(md) == "both" and resolve_features("auto", md) == "both"
    assert resolve_features("net", md) == "net"
    assert auto_features(build_model("tiny")) == "mind"  # a network built in memory has no card
    assert auto_features(load_model(md)) == "both"  # a loaded one carries its card


def test_shipped_weights_record_their_choice() -> None:
    from synthvox.models import default_weights_path

    path = default_weights_path()
    if path is None:
        pytest.skip("no shipped weights")
    rec = model_card(path).get("registration")
    assert rec is not None and rec["features_auto"] in ("mind", "net", "both")
    assert auto_features() == rec["features_auto"]


def _card_dir(tmp_path, card: dict):
    md = save_model(build_model("tiny"), tmp_path / "m")
    cfg = json.loads((md / "config.json").read_text())
    cfg.setdefault("extra", {})["model_card"] = card
    (md / "config.json").write_text(json.dumps(cfg))
    return md


def test_the_network_sees_images_at_the_scale_it_was_trained_at(tmp_path) -> None:
    from synthvox.models import load_model
    from synthvox.models.card import network_spacing, training_spacing

    assert training_spacing({"data": {"size": [64, 64, 64], "synth": {"labels": {"fov_mm": 144.0}}}}) == 2.25
    assert training_spacing({"data": {"size": [32, 48, 40], "synth": {"labels": {"fov_mm": 96.0}}}}) == 2.0
    assert training_spacing({"data": {"size": [64, 64, 64], "synth": {}}}) == 2.25  # the engine's default field of view
    for card in ({}, {"data": {}}, {"data": {"size": "x"}}, {"data": {"size": [0, 0, 0]}},
                 {"data": {"size": [64] * 3, "synth": {"labels": {"fov_mm": -1}}}}):
        assert training_spacing(card) is None
    trained = {"data": {"size": [32, 32, 32], "synth": {"labels": {"fov_mm": 64.0}}}}
    md = _card_dir(tmp_path, trained)
    assert network_spacing(md) == 2.0 and network_spacing(str(md)) == 2.0
    assert network_spacing(load_model(md)) == 2.0  # the card travels with the loaded network
    assert network_spacing(build_model("tiny")) is None  # a network built in memory: no card, no rescaling
    # a measured choice in the registration record wins over the training scale
    md2 = _card_dir(tmp_path / "b", {**trained, "registration": {"features_auto": "both", "net_spacing": 1.5}})
    assert network_spacing(md2) == 1.5
    md3 = _card_dir(tmp_path / "c", {**trained, "registration": {"net_spacing": "fine"}})
    assert network_spacing(md3) == 2.0  # an unreadable choice falls back to the training scale


def test_the_card_records_the_network_share(tmp_path) -> None:
    from synthvox.models.card import DEFAULT_NET_SHARE, network_share

    md = _card_dir(tmp_path / "a", {"registration": {"features_auto": "both", "net_spacing": 2.0, "net_share": 0.15}})
    assert network_share(md) == 0.15
    assert network_share(_card_dir(tmp_path / "b", {})) == DEFAULT_NET_SHARE  # nothing measured: one half
    for bad in (0, 1, 1.5, -0.2, "half", True):  # an unreadable or impossible share is not used
        assert network_share(_card_dir(tmp_path / f"c{bad}", {"registration": {"net_share": bad}})) == DEFAULT_NET_SHARE
    assert network_share(build_model("tiny")) == DEFAULT_NET_SHARE
