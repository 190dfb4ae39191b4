"""benchmarks/decide.py: what --features auto picks, decided on a registration benchmark's result and
recorded in the weights' model card (which the package then only reads)."""

from __future__ import annotations

import json

import pytest

from benchmarks.decide import decide, main
from synthvox.models import save_model
from synthvox.models.card import auto_features, model_card, network_share, network_spacing
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


def test_the_shipped_choice_follows_the_rule_on_its_own_figures() -> None:
    from synthvox.models import default_weights_path

    path = default_weights_path()
    if path is None:
        pytest.skip("no shipped weights")
    rec = model_card(path).get("registration")
    assert rec is not None
    measured = {ds: {k: {"summary": {"mean_dice": v}} for k, v in per.items()} for ds, per in rec["mean_dice"].items()}
    assert rec["features_auto"] == decide({"results": measured})["features_auto"]


def test_the_card_records_the_network_settings_the_benchmark_measured(tmp_path) -> None:
    res = {**_result(0.70, 0.62, 0.72), "synthvox_config": {"set": ["net_spacing=2", "net_share=0.15"]}}
    rec = decide(res)
    assert rec["net_spacing"] == 2.0 and rec["net_share"] == 0.15 and rec["features_auto"] == "both"
    # figures measured with a setting a card cannot carry, or quick ones, decide nothing
    for config in ({"set": ["spacing=2"]}, {"set": ["net_share=half"]}, {"spacing": 3.0, "set": []}):
        with pytest.raises(ValueError):
            decide({**_result(0.70, 0.62, 0.72), "synthvox_config": config})
    assert "net_share" not in decide({**_result(0.7, 0.6, 0.72), "synthvox_config": "RegistrationConfig() defaults"})


def test_the_command_writes_the_record_the_package_reads(tmp_path, capsys) -> None:
    """``python -m benchmarks.decide MODEL JSON``: the card then gives auto, the spacing and the share
    the result was measured with; a result that decides nothing leaves the card as it was.
    (Shown to fail with the record written under another key of the card: auto_features said mind.)"""
    md = save_model(build_model("tiny"), tmp_path / "m")
    result = tmp_path / "registration.json"
    result.write_text(json.dumps({**_result(0.70, 0.62, 0.72), "synthvox_config": {"set": ["net_spacing=2", "net_share=0.15"]}}))
    main([str(md), str(result)])
    assert "--features auto -> both" in capsys.readouterr().out
    assert auto_features(md) == "both" and network_spacing(md) == 2.0 and network_share(md) == 0.15
    before = (md / "config.json").read_text()
    result.write_text(json.dumps(_result(0.70, 0.62, 0.72) | {"synthvox_config": {"set": ["spacing=2"]}}))
    with pytest.raises(SystemExit) as exc:
        main([str(md), str(result)])
    assert "error: " in str(exc.value.code) and "spacing=2" in str(exc.value.code)
    assert (md / "config.json").read_text() == before
