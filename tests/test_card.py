"""What --features auto picks: the decision recorded in the weights' model card, from a measured benchmark."""

from __future__ import annotations

import json

import pytest

from synthvox.demo import resolve_features
from synthvox.models import load_model, save_model
from synthvox.models.card import auto_features, decide, model_card
from synthvox.models.registry import build_model


def _result(mind: float, net: float, both: float, off_brain: dict | None = None) -> dict:
    per = {k: {"summary": {"mean_dice": v}} for k, v in (("mind", mind), ("net", net), ("both", both), ("ants", 0.6))}
    ctmr = {k: {"summary": {"mean_dice": v}} for k, v in (off_brain or {"mind": 0.5}).items()}
    return {"date": "2026-12-01", "commit": "abc", "pairs": 11, "results": {"nichart": per, "ctmr": ctmr}}


@pytest.mark.parametrize("figures,choice", [((0.72, 0.47, 0.68), "mind"), ((0.70, 0.66, 0.73), "both"), ((0.70, 0.75, 0.73), "net"),
                                            ((0.7295, 0.678, 0.7318), "mind")])  # 2026-12-07: both 0.002 above mind
def test_decide_picks_the_measured_best(figures, choice) -> None:
    rec = decide(_result(*figures))
    assert rec["features_auto"] == choice
    assert rec["mean_dice"]["nichart"]["ants"] == 0.6 and rec["mean_dice"]["ctmr"]["mind"] == 0.5


def test_decide_keeps_mind_when_the_network_loses_off_the_brain() -> None:
    assert decide(_result(0.70, 0.66, 0.75, {"mind": 0.53, "both": 0.52}))["features_auto"] == "mind"
    assert decide(_result(0.70, 0.66, 0.75, {"mind": 0.53, "both": 0.55}))["features_auto"] == "both"


def test_decide_needs_all_three_kinds() -> None:
    res = _result(0.7, 0.6, 0.65)
    del res["results"]["nichart"]["both"]
    with pytest.raises(ValueError):
        decide(res)


def test_auto_follows_the_card(tmp_path) -> None:
    md = save_model(build_model("tiny"), tmp_path / "m")
    assert model_card(md).get("registration") is None
    assert auto_features(md) == "mind" and resolve_features("auto", str(md)) == "mind"  # nothing measured: MIND
    cfg = json.loads((md / "config.json").read_text())
    cfg.setdefault("extra", {})["model_card"] = {"registration": decide(_result(0.70, 0.66, 0.73))}
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
    measured = {ds: {k: {"summary": {"mean_dice": v}} for k, v in per.items()} for ds, per in rec["mean_dice"].items()}
    assert rec["features_auto"] == decide({"results": measured})["features_auto"]  # the rule, on its own figures
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


def test_the_card_records_the_network_settings_the_benchmark_measured(tmp_path) -> None:
    from synthvox.models.card import DEFAULT_NET_SHARE, network_share

    res = {**_result(0.70, 0.62, 0.72), "synthvox_config": {"set": ["net_spacing=2", "net_share=0.15"]}}
    rec = decide(res)
    assert rec["net_spacing"] == 2.0 and rec["net_share"] == 0.15 and rec["features_auto"] == "both"
    md = _card_dir(tmp_path / "a", {"registration": rec})
    assert network_share(md) == 0.15
    assert network_share(_card_dir(tmp_path / "b", {})) == DEFAULT_NET_SHARE  # nothing measured: one half
    for bad in (0, 1, 1.5, -0.2, "half", True):  # an unreadable or impossible share is not used
        assert network_share(_card_dir(tmp_path / f"c{bad}", {"registration": {"net_share": bad}})) == DEFAULT_NET_SHARE
    assert network_share(build_model("tiny")) == DEFAULT_NET_SHARE
    # figures measured with a setting a card cannot carry, or quick ones, decide nothing
    for config in ({"set": ["spacing=2"]}, {"set": ["net_share=half"]}, {"spacing": 3.0, "set": []}):
        with pytest.raises(ValueError):
            decide({**_result(0.70, 0.62, 0.72), "synthvox_config": config})
    assert "net_share" not in decide({**_result(0.7, 0.6, 0.72), "synthvox_config": "RegistrationConfig() defaults"})
