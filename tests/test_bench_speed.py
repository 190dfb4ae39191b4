"""The speed benchmark harness end to end, in its quick mode (small sizes, a few repetitions)."""

from __future__ import annotations

import json

import pytest
from conftest import skip_or_fail

from benchmarks import common, speed


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and x > 0


def test_quick_run_times_every_stage(tmp_path, one_thread):
    from synthvox.models import build_model, save_model

    weights = save_model(build_model("tiny", seed=2), tmp_path / "weights")
    payload = speed.main(["--quick", "--threads", "1", "--weights", str(weights), "--out", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "speed.json").read_text())
    assert saved["benchmark"] == "speed" and saved["quick"] is True and saved["machine"]["cores"] >= 1
    assert saved["machine"]["torch_threads"] == 1 and len(saved["load_avg_before_after"]) == 2
    st = saved["stages"]
    assert set(st) == set(speed.STAGES)

    e = st["engine"]
    assert e["size"] == 32 and _positive(e["s_per_pair"]) and _positive(e["baseline_s_per_pair"])
    assert e["speedup"] == pytest.approx(e["baseline_s_per_pair"] / e["s_per_pair"])
    p = st["pretrain"]
    assert p["config"] == "tiny"
    for k in ("synthesis_s_per_step", "network_s_per_step", "baseline_s_per_step", "voxels_per_s"):
        assert _positive(p[k]), k
    assert p["s_per_step"] == pytest.approx(p["synthesis_s_per_step"] + p["network_s_per_step"])
    assert 0 < p["synthesis_share"] < 1

    table = (tmp_path / "out" / "speed.md").read_text()
    assert "| stage | what | synthvox | baseline | speed-up |" in table
    if not common.has_shared_data():
        for name in ("features", "registration", "segmentation"):
            assert "not found" in st[name]["skipped"]
        skip_or_fail(f"nichart_dev not found under {common.eval_dir()}: data stages skipped (engine and pretrain checked)")

    f = st["features"]
    assert _positive(f["s_per_volume"]) and f["variant"] == "tiny" and "random" in f["weights"]
    r = st["registration"]
    for kind in ("mind", "net"):  # net features with the weights given
        assert _positive(r[kind]["s_per_pair"]), kind
        stages = r[kind]["stages_s"]
        assert {"init", "features", "affine", "convex", "adam", "compose", "total"} <= set(stages)
        assert all(v >= 0 for v in stages.values()) and stages["total"] <= r[kind]["s_per_pair"] + 1e-6
        assert 0.0 <= r[kind]["mean_dice_14"] <= 1.0
    s = st["segmentation"]
    assert _positive(s["finetune_s_per_step"]) and _positive(s["inference_s_per_volume"])
    assert s["inference_shape"] == [106, 127, 135]  # the label map comes back on the 2 mm T1 grid
    assert payload["stages"]["engine"]["s_per_pair"] == e["s_per_pair"]
    for line in ("engine", "pretrain", "features", "registration", "segmentation"):
        assert f"| {line} |" in table


def test_unknown_stage_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown stage"):
        speed.main(["--quick", "--stages", "engine,warp", "--out", str(tmp_path)])
