"""What --features auto picks: the decision recorded in the weights' model card, from a measured benchmark."""

from __future__ import annotations

import json

import pytest

from synthvox.demo import resolve_features
from synthvox.models import save_model
from synthvox.models.card import auto_features, decide, registration_record
from synthvox.models.registry import build_model


def _result(mind: float, net: float, both: float) -> dict:
    per = {k: {"summary": {"mean_dice": v}} for k, v in (("mind", mind), ("net", net), ("both", both), ("ants", 0.6))}
    return {"date": "2026-12-01", "commit": "abc", "pairs": 11, "results": {"nichart": per, "ctmr": {"mind": {"summary": {"mean_dice": 0.5}}}}}


@pytest.mark.parametrize("figures,choice", [((0.72, 0.47, 0.68), "mind"), ((0.70, 0.66, 0.73), "both"), ((0.70, 0.75, 0.73), "net")])
def test_decide_picks_the_measured_best(figures, choice) -> None:
    rec = decide(_result(*figures))
    assert rec["features_auto"] == choice
    assert rec["mean_dice"]["nichart"]["ants"] == 0.6 and rec["mean_dice"]["ctmr"]["mind"] == 0.5


def test_decide_needs_all_three_kinds() -> None:
    res = _result(0.7, 0.6, 0.65)
    del res["results"]["nichart"]["both"]
    with pytest.raises(ValueError):
        decide(res)


def test_auto_follows_the_card(tmp_path) -> None:
    md = save_model(build_model("tiny"), tmp_path / "m")
    assert registration_record(md) is None
    assert auto_features(md) == "mind" and resolve_features("auto", str(md)) == "mind"  # nothing measured: MIND
    cfg = json.loads((md / "config.json").read_text())
    cfg.setdefault("extra", {})["model_card"] = {"registration": decide(_result(0.70, 0.66, 0.73))}
    (md / "config.json").write_text(json.dumps(cfg))
    assert auto_features(md) == "both" and resolve_features("auto", md) == "both"
    assert resolve_features("net", md) == "net"
    assert auto_features(build_model("tiny")) == "mind"  # a loaded network has no card


def test_shipped_weights_record_their_choice() -> None:
    from synthvox.models import default_weights_path

    path = default_weights_path()
    if path is None:
        pytest.skip("no shipped weights")
    rec = registration_record(path)
    assert rec is not None and rec["features_auto"] in ("mind", "net", "both")
    assert rec["features_auto"] == max(("mind", "net", "both"), key=lambda k: rec["mean_dice"]["nichart"][k])
    assert auto_features() == rec["features_auto"]
