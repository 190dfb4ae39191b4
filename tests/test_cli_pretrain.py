"""``synthvox pretrain`` and ``synthvox features`` through Typer's runner, with the real data engine."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from conftest import require_module
from typer.testing import CliRunner

import synthvox.synth.engine  # noqa: F401  (the real data engine: an ImportError must fail, not skip)
from synthvox import io
from synthvox.cli import app
from synthvox.models import load_model
from synthvox.train.checkpointing import list_checkpoints, load_checkpoint
from synthvox.volume import Volume

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    res = _run("pretrain", "--config", "tiny", "steps=3", "ckpt_every=2", "log_every=1", "progress=false", "--out", str(run), "--device", "cpu", "--seed", "3")
    assert res.exit_code == 0, res.output
    return run


def test_pretrain_cli_writes_a_run(tiny_run) -> None:
    run = tiny_run
    assert (run / "config.yaml").is_file() and "seed: 3" in (run / "config.yaml").read_text()
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2, 3]
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and all(float(r["synth_s"]) > 0 for r in rows)
    net = load_model(run / "model")
    assert net.config()["base_channels"] == 4
    require_module("tensorboard")  # a test dependency: required in CI
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_pretrain_cli_refuses_overwrite_then_resumes(tiny_run) -> None:
    res = _run("pretrain", "--config", "tiny", "steps=3", "--out", str(tiny_run), "--device", "cpu")
    assert res.exit_code == 2 and "already holds a run" in res.output
    res = _run("pretrain", "--out", str(tiny_run), "--resume", "steps=4", "progress=false", "--device", "cpu")
    assert res.exit_code == 0, res.output
    _, state = load_checkpoint(list_checkpoints(tiny_run / "checkpoints")[-1][1])
    assert state["step"] == 4 and state["config"]["seed"] == 3  # the saved config was the base


def test_pretrain_cli_bad_input_is_one_line(tmp_path) -> None:
    for args in (["optim.nope=1"], ["steps=-1"], ["--config", "nonexistent.yaml"], ["--config", "medium"]):
        res = _run("pretrain", *args, "--out", str(tmp_path / "r"), "--device", "cpu")
        assert res.exit_code == 2, res.output
        assert res.output.startswith("error: ") and res.output.count("\n") == 1


def test_features_cli(tmp_path) -> None:
    from synthvox.models import build_model, save_model

    save_model(build_model("tiny", seed=1), tmp_path / "model")
    affine = np.array([[0.0, 0.0, 2.0, -10.0], [1.2, 0.0, 0.0, 5.0], [0.0, -1.0, 0.0, 3.0], [0, 0, 0, 1]])
    img = torch.rand(1, 20, 18, 12) * 400
    io.save(Volume(img, affine), tmp_path / "img.nii.gz")
    out = tmp_path / "feats.nii.gz"
    res = _run("features", str(tmp_path / "img.nii.gz"), "--out", str(out), "--weights", str(tmp_path / "model"), "--device", "cpu")
    assert res.exit_code == 0, res.output
    feats = io.load(out, allow_4d=True)
    assert feats.data.shape == (16, 20, 18, 12) and np.allclose(feats.affine, affine, atol=1e-5)
    res = _run("features", str(tmp_path / "img.nii.gz"), "--out", str(out), "--weights", str(tmp_path / "model"))
    assert res.exit_code == 2 and "--force" in res.output
    res = _run("features", str(tmp_path / "img.nii.gz"), "--out", str(tmp_path / "f2.nii.gz"), "--weights", str(tmp_path / "nothing"))
    assert res.exit_code == 2 and "not found" in res.output
    res = _run("features", str(tmp_path / "img.nii.gz"), "--out", str(tmp_path / "f3.nii.gz"), "--weights", "random", "--ct-window", "a,b")
    assert res.exit_code == 2 and "--ct-window" in res.output


def test_the_trained_network_carries_its_training_scale(tiny_run, tmp_path) -> None:
    """The run's model directory, a checkpoint exported by benchmarks/research/checkpoints.py and one exported by
    scripts/weights.py all record the scale registration lets the network see images at."""
    import subprocess
    import sys
    from pathlib import Path

    from synthvox.models.card import model_card, network_spacing

    root = Path(__file__).resolve().parents[1]
    voxel_mm = 144.0 / 32  # the tiny preset: 32^3 label maps over the engine's 144 mm
    assert network_spacing(tiny_run / "model") == voxel_mm
    assert model_card(tiny_run / "model")["training_steps"] >= 3
    from benchmarks.research import checkpoints

    exported = checkpoints.export_checkpoints(tiny_run, tmp_path / "each")
    assert exported and all(network_spacing(md) == voxel_mm for md in exported)
    res = subprocess.run([sys.executable, str(root / "scripts" / "weights.py"), "export", str(tiny_run), "--model",
                          str(tmp_path / "m")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert network_spacing(tmp_path / "m") == voxel_mm
    # a chosen checkpoint, not the newest; a step the run does not have is a one-line error
    oldest = list_checkpoints(tiny_run / "checkpoints")[0][0]
    res = subprocess.run([sys.executable, str(root / "scripts" / "weights.py"), "export", str(tiny_run), "--step",
                          str(oldest), "--model", str(tmp_path / "m2")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert model_card(tmp_path / "m2")["training_steps"] == oldest
    res = subprocess.run([sys.executable, str(root / "scripts" / "weights.py"), "export", str(tiny_run), "--step", "70",
                          "--model", str(tmp_path / "m7")], capture_output=True, text=True)
    assert res.returncode == 1 and res.stderr.startswith("error: no checkpoint of step 70") and res.stderr.count("\n") == 1
    assert not (tmp_path / "m7").exists()
