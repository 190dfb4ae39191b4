"""Finetuning's CPU-minded settings: a wall-clock budget, the head's own learning rate, the Dice
without background, and the defaults per device."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from conftest import two_ellipsoids as layout
from typer.testing import CliRunner

from synthvox import io
from synthvox.cli import app
from synthvox.errors import InputError
from synthvox.segmentation import finetune, read_meta
from synthvox.segmentation.config import DEVICE_DEFAULTS, FinetuneConfig, device_defaults
from synthvox.segmentation.loop import BUDGET_CHECKS, make_loss, make_optimizer
from synthvox.segmentation.modeldir import SegmentationNet
from synthvox.train.checkpointing import list_checkpoints
from synthvox.volume import Volume

AFFINE = np.diag([1.5, 1.5, 1.5, 1.0])


def pair():
    lab = layout()
    g = torch.Generator().manual_seed(0)
    img = torch.zeros(lab.shape)
    img[lab == 7], img[lab == 42] = 80.0, 150.0
    return Volume(img + 5 * torch.randn(lab.shape, generator=g), AFFINE), Volume(lab, AFFINE)


def test_a_minutes_budget_fixes_the_steps_and_holds_the_wall_clock(tmp_path):
    img, lab = pair()
    t = time.perf_counter()
    out = finetune([img, img], [lab, lab], out_dir=tmp_path / "m", init="random", variant="tiny", minutes=0.2,
                   patch_size=32, batch_size=1, device="cpu", progress=False)
    wall = time.perf_counter() - t
    meta = read_meta(out)
    steps = meta.train["steps"]
    assert meta.history["steps"] == steps >= 1 and meta.train["minutes"] == 0.2
    assert meta.train["val_every"] >= 1
    checks = [r for r in (out / "log.csv").read_text().splitlines()[1:] if r.split(",")[3]]
    assert 1 <= len(checks) <= BUDGET_CHECKS + 2
    assert wall < 0.2 * 60 * 1.6 + 5, wall  # the budget (calibration included), with slack for a busy machine
    # a resumed budget run keeps the steps its calibration fixed (nothing left to do: it only rewrites the model)
    latest = list_checkpoints(out / "checkpoints")[-1][0]
    assert latest == steps
    again = finetune([img, img], [lab, lab], out_dir=out, init="random", variant="tiny", minutes=5.0, patch_size=32,
                     batch_size=1, device="cpu", progress=False, resume=True)
    assert read_meta(again).train["steps"] == steps


def test_the_head_learns_faster_and_dice_leaves_background_out():
    from synthvox.models import build_model

    net = SegmentationNet(build_model("tiny", seed=0), 16, 3)
    cfg = FinetuneConfig(head_lr_factor=10.0).resolved()
    opt = make_optimizer(net, list(net.parameters()), cfg)
    head = {id(p) for p in net.head.parameters()}
    factors = {g["lr_factor"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert factors[10.0] == head and not (factors[1.0] & head)
    head_only = make_optimizer(net, list(net.head.parameters()), cfg)
    assert [g["lr_factor"] for g in head_only.param_groups] == [10.0]
    assert make_loss(cfg, has_background=True).dice.include_background is False
    assert make_loss(cfg, has_background=False).dice.include_background is True  # no background class to leave out
    with pytest.raises(InputError, match="head_lr_factor"):
        FinetuneConfig(head_lr_factor=0).resolved()
    with pytest.raises(InputError, match="--minutes"):
        FinetuneConfig(minutes=-1).resolved()


def test_device_defaults_and_the_cli_budget_options(tmp_path):
    assert device_defaults("cuda:1") == DEVICE_DEFAULTS["cuda"] and device_defaults("cuda")["steps"] == 2000
    cpu = device_defaults("cpu")
    assert cpu["minutes"] == 30.0 and cpu["patch_size"] == 48 and cpu["min_spacing"] == 3.0 and cpu["lr"] == 3e-3
    img, lab = pair()
    io.save(img, tmp_path / "img.nii.gz")
    io.save(lab, tmp_path / "lab.nii.gz", labels=True)
    runner = CliRunner()
    base = ["finetune", "--image", str(tmp_path / "img.nii.gz"), "--label", str(tmp_path / "lab.nii.gz"), "--device", "cpu"]
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "bad"), "--minutes", "0"])
    assert r.exit_code != 0 and "--minutes" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "bad").exists()
    # --steps replaces the CPU's minutes budget; the CPU's patch and coarsest spacing still apply
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "m"), "--steps", "2", "--init", "random", "--variant", "tiny", "--patch", "32"])
    assert r.exit_code == 0, r.output
    meta = read_meta(tmp_path / "m")
    assert meta.train["steps"] == 2 and meta.train["minutes"] is None and meta.train["lr"] == 3e-3
    assert meta.spacing == [3.0, 3.0, 3.0]  # 1.5 mm inputs trained at the CPU's 3 mm
