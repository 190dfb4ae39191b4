"""Finetuning's CPU-minded settings: a wall-clock budget, the head's own learning rate, the Dice
without background, and the defaults per device."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import two_ellipsoids as layout
from typer.testing import CliRunner

import synthvox.segmentation.loop as loop
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


class FakeClock:
    """``time.perf_counter`` for the finetuning loop: each optimisation step takes ``step_s`` seconds
    (``slow_s`` from step ``slow_from`` of the run on, counting from 1), each check ``check_s``, nothing else any time.
    The machine's real speed (shared, busy) then cannot make the test pass or fail."""

    def __init__(self, step_s: float, check_s: float, slow_s: float | None = None, slow_from: int = 0) -> None:
        self.now, self.step_s, self.check_s = 1000.0, step_s, check_s
        self.slow_s, self.slow_from, self.steps = slow_s, slow_from, 0

    def perf_counter(self) -> float:
        return self.now

    def install(self, monkeypatch) -> None:
        real_step, real_check = loop.optimisation_step, loop.validate

        def step(*args, **kwargs):
            self.steps += 1
            run_step = self.steps - loop.CALIBRATION_STEPS  # the calibration's steps come first: 1 is the run's first
            slow = self.slow_s is not None and run_step >= self.slow_from
            self.now += self.slow_s if slow else self.step_s
            return real_step(*args, **kwargs)

        def check(*args, **kwargs):
            self.now += self.check_s
            return real_check(*args, **kwargs)

        monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=self.perf_counter, strftime=time.strftime))
        monkeypatch.setattr(loop, "optimisation_step", step)
        monkeypatch.setattr(loop, "validate", check)


def budget_run(out, minutes: float, **kw):
    img, lab = pair()
    return finetune([img, img], [lab, lab], FinetuneConfig(), out_dir=out, init="random", variant="tiny", minutes=minutes,
                    patch_size=32, batch_size=1, device="cpu", progress=False, **kw)


def test_a_minutes_budget_fixes_the_steps_and_holds_the_wall_clock(tmp_path, monkeypatch):
    """On a fake clock (1 s a step, 2 s a check), 0.5 minutes: the calibration (4 steps and a check,
    6 s) plans (30 - 6 - 5 checks x 2 s) / 1 s = 14 steps with a check every 14 // 5 = 2, the first
    check replans from the pace with its checks (2 s a step: 12 steps), and the run ends at the budget,
    not over it. Measured: 12 steps, 6 checks, 30.0 s. (The test timed the real wall clock before, with
    slack for a busy machine: flaky, and blind to an overrun smaller than the slack.)"""
    clock = FakeClock(step_s=1.0, check_s=2.0)
    clock.install(monkeypatch)
    out = budget_run(tmp_path / "m", 0.5)
    meta = read_meta(out)
    steps = meta.train["steps"]
    assert meta.history["steps"] == steps and 10 <= steps <= 14 and meta.train["minutes"] == 0.5
    assert meta.train["val_every"] == 14 // BUDGET_CHECKS  # fixed by the calibration's 14 steps
    checks = [r for r in (out / "log.csv").read_text().splitlines()[1:] if r.split(",")[3]]
    assert len(checks) == steps // meta.train["val_every"]
    spent = clock.now - 1000.0
    assert 0.9 * 30 <= spent <= 30, spent  # the budget used, and not overrun
    assert not meta.history["stopped"]
    # a resumed budget run keeps the steps its calibration fixed (nothing left to do: it only rewrites the model)
    latest = list_checkpoints(out / "checkpoints")[-1][0]
    assert latest == steps
    again = budget_run(out, 5.0, resume=True)
    assert read_meta(again).train["steps"] == steps


def test_a_machine_that_slows_down_replans_at_each_check(tmp_path, monkeypatch):
    """The machine gets 4 times slower after the calibration (1 s a step there, 4 s after): the first
    check plans the steps again from the pace, and the run still ends within the budget. Measured: 4
    steps (14 planned), 26 s of 30."""
    clock = FakeClock(step_s=1.0, check_s=2.0, slow_s=4.0, slow_from=1)
    clock.install(monkeypatch)
    meta = read_meta(budget_run(tmp_path / "m", 0.5))
    assert meta.history["steps"] == meta.train["steps"] < 14 and not meta.history["stopped"]
    assert clock.now - 1000.0 <= 30


def test_a_run_over_its_budget_stops_with_its_model(tmp_path, monkeypatch):
    """Step 3 takes 30 s, after the first check planned 12 steps at 2 s: 34 s since the calibration is
    past ``BUDGET_SLACK`` times the 30 s budget, so the run stops there, says so, and writes its model
    and a checkpoint to resume from."""
    clock = FakeClock(step_s=1.0, check_s=2.0, slow_s=30.0, slow_from=3)
    clock.install(monkeypatch)
    out = budget_run(tmp_path / "m", 0.5)
    meta = read_meta(out)
    assert meta.history["steps"] == 3 and meta.history["stopped"].startswith("stopped at the 0.5-minute budget after 3 of")
    assert list_checkpoints(out / "checkpoints")[-1][0] == 3 and (out / "segmentation.json").is_file()


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
    assert r.exit_code == 2 and "--minutes" in r.output and "Traceback" not in r.output  # the README's status
    assert not (tmp_path / "bad").exists()
    # --steps replaces the CPU's minutes budget; the CPU's patch and coarsest spacing still apply
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "m"), "--steps", "2", "--init", "random", "--variant", "tiny", "--patch", "32"])
    assert r.exit_code == 0, r.output
    meta = read_meta(tmp_path / "m")
    assert meta.train["steps"] == 2 and meta.train["minutes"] is None and meta.train["lr"] == 3e-3
    assert meta.spacing == [3.0, 3.0, 3.0]  # 1.5 mm inputs trained at the CPU's 3 mm
    # the API, given what the command was given, resolves the same settings (the device's defaults are the API's)
    api = finetune([img], [lab], out_dir=tmp_path / "api", device="cpu", progress=False, steps=2, init="random",
                   variant="tiny", patch_size=32)
    assert read_meta(api).train == meta.train and read_meta(api).spacing == meta.spacing


def test_the_api_applies_the_device_budget(tmp_path, monkeypatch):
    """Without a config, finetune on a CPU gets the CPU's 30-minute budget of 48³ patches at 3 mm or coarser
    (FinetuneConfig.for_device), as the command does; a step count alone replaces the minutes."""
    img, lab = pair()
    planned = []

    def calibration(cfg0, *args, **kwargs):
        planned.append(cfg0)
        raise KeyboardInterrupt  # stop before 30 minutes of training

    monkeypatch.setattr(loop, "budget_config", calibration)
    with pytest.raises(KeyboardInterrupt):
        finetune([img], [lab], out_dir=tmp_path / "m", device="cpu", init="random", variant="tiny", progress=False)
    (cfg0,) = planned
    assert cfg0.minutes == 30.0 and cfg0.patch_size == [48] * 3 and cfg0.lr == 3e-3 and cfg0.min_spacing == 3.0
    assert cfg0.spacing == [3.0] * 3  # 1.5 mm inputs at the CPU's coarsest
    assert not (tmp_path / "m").exists()  # nothing written before the run
    # steps alone: no budget (no calibration), the CPU's other defaults kept
    meta = read_meta(finetune([img], [lab], out_dir=tmp_path / "s", device="cpu", init="random", variant="tiny",
                              progress=False, steps=2, patch_size=32))
    assert meta.train["steps"] == 2 and meta.train["minutes"] is None and meta.train["lr"] == 3e-3
    assert len(planned) == 1
    # the same settings on a GPU: the method's 2000 steps of 96³ patches at the inputs' spacing
    gpu = FinetuneConfig.for_device("cuda:0")
    assert (gpu.steps, gpu.minutes, gpu.patch_size, gpu.min_spacing, gpu.lr) == (2000, None, 96, None, 1e-3)


def test_settings_on_top_of_a_config():
    cpu = FinetuneConfig.for_device("cpu")
    assert cpu.minutes == 30.0 and cpu.min_spacing == 3.0
    assert FinetuneConfig.for_device("cpu", steps=300).minutes is None  # a step count replaces the budget
    ten = FinetuneConfig.for_device("cpu", minutes=10)
    assert ten.minutes == 10 and ten.steps >= 100_000  # the budget alone fixes the steps
    assert FinetuneConfig.for_device("cpu", steps=None, minutes=None) == cpu  # None: not given (an option left out)
    assert FinetuneConfig.for_device("cpu", min_spacing=None).min_spacing is None  # any other None is a value
    mine = FinetuneConfig(steps=50, minutes=5.0, patch_size=[40, 40, 40])
    assert mine.with_settings(steps=80) == FinetuneConfig(steps=80, patch_size=[40, 40, 40])
    assert mine.with_settings(patch_size=32).checked().patch_size == [32] * 3 and mine.patch_size == [40] * 3
    with pytest.raises(InputError, match="setting lr must be a number"):
        FinetuneConfig.for_device("cpu", lr=None).checked()


def test_an_unknown_setting_is_a_one_line_error(tmp_path):
    img, lab = pair()
    with pytest.raises(InputError) as err:
        finetune([img], [lab], out_dir=tmp_path / "m", device="cpu", stepz=3, progress=False)
    assert "unknown finetuning setting(s): stepz (did you mean steps?)" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputError, match="unknown finetuning setting.*patch"):
        finetune([img], [lab], FinetuneConfig(), out_dir=tmp_path / "m", patch=32)
    with pytest.raises(InputError, match="config must be a FinetuneConfig"):
        finetune([img], [lab], {"steps": 3}, out_dir=tmp_path / "m")
    assert not (tmp_path / "m").exists()
