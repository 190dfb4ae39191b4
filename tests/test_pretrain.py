"""Pretraining: config, schedule, the loop, resume, checkpoints, learning on synthetic pairs."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from synthvox.errors import InputError
from synthvox.models import load_model
from synthvox.train.checkpointing import (
    list_checkpoints,
    load_checkpoint,
    load_latest,
    save_checkpoint,
    strip_optimizer,
)
from synthvox.train.config import PretrainConfig, config_from_dict, dump_yaml, resolve_config, to_dict
from synthvox.train.objective import build_module, sample_indices
from synthvox.train.pretrain import REWARM_STEPS, lr_at, pretrain


@dataclass
class Pairs:
    labels: torch.Tensor
    view1: torch.Tensor
    view2: torch.Tensor


class BlobPairs:
    """A stand-in for the data engine: blob label maps (argmax of smooth random fields) rendered twice,
    each view with its own random order of intensity levels plus noise. Sample i depends on (seed, i)."""

    def __init__(self, size=(32, 32, 32), n_labels: int = 5, seed: int = 0, coarse: int = 3) -> None:
        self.size, self.k, self.seed, self.coarse = tuple(size), n_labels, seed, coarse
        self.nan_at: set[int] = set()

    def one(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100003 + i)
        c = self.coarse
        fields = F.interpolate(torch.randn(1, self.k, c, c, c, generator=g), size=self.size, mode="trilinear", align_corners=True)
        lab = fields.argmax(1)
        views = []
        for _ in range(2):
            levels = (torch.randperm(self.k, generator=g).float() + 0.5) / self.k + 0.1 * (torch.rand(self.k, generator=g) - 0.5)
            views.append((levels[lab] + 0.03 * torch.randn(lab.shape, generator=g)).clamp(0, 1))
        if i in self.nan_at:
            views[0] = views[0] * float("nan")
        return lab, views[0], views[1]

    def batch(self, indices) -> Pairs:
        out = [self.one(int(i)) for i in indices]
        return Pairs(*(torch.stack([o[j] for o in out]) for j in range(3)))


def tiny_cfg(*overrides: str) -> PretrainConfig:
    return resolve_config("tiny", ["tensorboard=false", "progress=false", *overrides])


# ---------------------------------------------------------------------------------------------- config


def test_presets_overrides_and_round_trip(tmp_path) -> None:
    cfg = resolve_config("tiny", ["optim.lr=1e-3", "batch_pairs=3", "data.size=48", "loss.layers=out,dec1", "grad_clip=2", "data.synth.labels.n_templates=[5, 9]"], seed=7)
    assert cfg.optim.lr == 1e-3 and cfg.batch_pairs == 3 and cfg.data.size == (48, 48, 48)
    assert cfg.loss.layers == ("out", "dec1") and cfg.optim.grad_clip == 2.0 and cfg.seed == 7
    assert cfg.data.synth.labels.n_templates == (5, 9) and cfg.model.variant == "tiny"
    assert resolve_config("default").data.size == (128, 128, 128)
    again = config_from_dict(to_dict(cfg))
    assert again == cfg
    y = tmp_path / "c.yaml"
    y.write_text(dump_yaml(cfg))
    assert resolve_config(str(y)) == cfg
    y.write_text("optim:\n  lr: 1e-4\nsteps: 20\n")
    from_file = resolve_config(str(y), ["steps=30"])
    assert from_file.optim.lr == 1e-4 and from_file.steps == 30


@pytest.mark.parametrize(
    "overrides",
    [["optim.lrr=1"], ["bogus=1"], ["steps=abc"], ["steps=1.5"], ["amp=maybe"], ["loss.layers=enc7"], ["model.variant=huge"], ["optim.decay=step"], ["nokey"], ["data.size=[1,2]"]],
)
def test_bad_config_is_one_line_input_error(overrides) -> None:
    with pytest.raises(InputError) as e:
        resolve_config("tiny", overrides)
    assert "\n" not in str(e.value)


@dataclass
class _Inner:
    n: tuple[int, int] = (1, 2)


@dataclass
class _Outer:
    inner: _Inner | None = None
    seed: int = 0


def test_unknown_preset_and_engine_key() -> None:
    with pytest.raises(InputError):
        resolve_config("medium")
    from synthvox.config import apply_overrides

    obj = _Outer(inner=_Inner())
    new = apply_overrides(obj, {"inner.n": [3, 4], "seed": 5})
    assert new.inner.n == (3, 4) and new.seed == 5 and obj.inner.n == (1, 2)
    assert apply_overrides(obj, ["inner.n=[7, 8]"]).inner.n == (7, 8)
    with pytest.raises(InputError, match=r"unknown config key 'inner\.m'"):  # the whole key, quoted once
        apply_overrides(obj, {"inner.m": 1})
    with pytest.raises(InputError, match=r"unknown config key 'data\.synth\.labels\.bogus'"):
        resolve_config("tiny", ["data.synth.labels.bogus=1"])


@pytest.mark.parametrize(
    "overrides",
    [["data.synth.labels.fov_mm=-3"], ["data.synth.labels.bogus=1"], ["data.synth.labels.n_templates=[5,1]"],
     ["data.synth.labels.size=32"], ["data.synth.use_bank=false"], ["data.synth.appearance.nope=1"],
     ["data.synth.cube_size=2"], ["data.synth.labels.affine.bogus=1"], ["loss.sampling=stratified"],
     ["loss.head=big"], ["loss.layer_weights={enc9: 1}"], ["loss.layer_weights={out: -1}"], ["model.padding=circular"],
     ["loss.taps=after"]],
)
def test_engine_and_recipe_settings_are_checked_when_resolved(overrides, tmp_path) -> None:
    """The engine's settings are a typed part of the config: a wrong one fails before a run folder exists."""
    with pytest.raises(InputError) as e:
        resolve_config("tiny", overrides)
    assert "\n" not in str(e.value)
    from typer.testing import CliRunner

    from synthvox.cli import app

    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["pretrain", "--config", "tiny", "--out", str(run), *overrides])
    assert res.exit_code == 2 and not run.exists(), res.output


def test_engine_settings_round_trip_and_old_dotted_form() -> None:
    cfg = resolve_config("cpu")
    assert cfg.data.synth.labels.fov_mm == 144.0 and cfg.loss.layer_weights["out"] == 3.0 and cfg.loss.sampling == "uniform"
    assert cfg.model.padding == "reflect"
    gpu = resolve_config("gpu")  # the same recipe at the method's size
    assert gpu.loss == cfg.loss and gpu.model == cfg.model and gpu.data.size == resolve_config("default").data.size
    assert config_from_dict(to_dict(cfg)) == cfg
    old = {"data": {"size": [64, 64, 64], "use_bank": True, "synth": {"labels.fov_mm": 100}}}  # checkpoints before the typed form
    assert config_from_dict(old).data.synth.labels.fov_mm == 100.0
    assert config_from_dict({"data": {"synth": {}}}).data.synth == resolve_config("default").data.synth


def test_learning_rate_schedule() -> None:
    cfg = tiny_cfg("steps=100", "optim.warmup=10", "optim.lr=1.0", "optim.final_lr_ratio=0.1")
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)
    assert lr_at(50, cfg, rewarm_from=50) == pytest.approx(lrs[50] / REWARM_STEPS)


def test_sample_indices_are_disjoint_across_steps_and_ranks() -> None:
    seen = [i for step in range(5) for rank in range(3) for i in sample_indices(step, rank, 3, 4)]
    assert len(seen) == len(set(seen)) == 60 and sorted(seen) == list(range(60))


# ---------------------------------------------------------------------------------------------- the loop


def _final_tensors(run: Path) -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(list_checkpoints(run / "checkpoints")[-1][1])
    return tensors


def test_resume_equals_uninterrupted(tmp_path) -> None:
    src = BlobPairs((32, 32, 32))
    cfg = tiny_cfg("steps=6", "ckpt_every=3", "log_every=1", "optim.warmup=2")
    full = pretrain(cfg, tmp_path / "a", "cpu", source=src)
    part = pretrain(cfg, tmp_path / "b", "cpu", source=src, max_steps=3)
    assert part.step == 3 and part.model_dir is None
    rest = pretrain(cfg, tmp_path / "b", "cpu", source=src, resume=True)
    assert full.step == rest.step == 6
    a, b = _final_tensors(tmp_path / "a"), _final_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the exported network is the checkpoint's
    net = load_model(tmp_path / "a" / "model")
    assert torch.equal(net.state_dict()["stem.0.weight"], a["model.stem.0.weight"])
    # log: one row per step, no duplicate rows after the resume
    rows = list(csv.DictReader(open(tmp_path / "b" / "log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "synth_s", "net_s", "skipped", "loss_out"} <= set(rows[0])
    assert (tmp_path / "b" / "config.yaml").is_file()
    # a run folder is not overwritten without --force
    with pytest.raises(InputError, match="already holds a run"):
        pretrain(cfg, tmp_path / "a", "cpu", source=src)


def test_non_finite_loss_is_skipped_and_counted(tmp_path) -> None:
    src = BlobPairs((32, 32, 32))
    src.nan_at = {1}  # sample 1 = step 1 with one pair per step
    cfg = tiny_cfg("steps=3", "ckpt_every=1", "keep_last=5", "optim.warmup=0")
    res = pretrain(cfg, tmp_path / "r", "cpu", source=src)
    assert res.skipped == 1 and res.step == 3 and res.last_loss == res.last_loss  # finite
    ck = {s: load_checkpoint(p)[0] for s, p in list_checkpoints(tmp_path / "r" / "checkpoints")}
    w = "model.stem.0.weight"
    assert torch.equal(ck[1][w], ck[2][w]) and not torch.equal(ck[2][w], ck[3][w])
    assert all(torch.isfinite(t).all() for t in ck[3].values() if t.is_floating_point())


def test_corrupt_checkpoints_give_clear_errors_and_resume_falls_back(tmp_path) -> None:
    src = BlobPairs((32, 32, 32))
    cfg = tiny_cfg("steps=4", "ckpt_every=2", "keep_last=3")
    pretrain(cfg, tmp_path / "r", "cpu", source=src, max_steps=4)
    (s2, p2), (s4, p4) = list_checkpoints(tmp_path / "r" / "checkpoints")
    assert (s2, s4) == (2, 4)
    data = p4.read_bytes()
    p4.write_bytes(data[: len(data) // 3])  # truncated
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_checkpoint(p4)
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # one damaged byte in the tensor data
    p4.write_bytes(bytes(flipped))
    with pytest.raises(InputError, match="corrupt"):
        load_checkpoint(p4)
    (tmp_path / "r" / "checkpoints" / ".step_00000006.safetensors.999.tmp").write_bytes(b"half-written")
    with pytest.warns(UserWarning, match="skipped damaged"):
        path, _, state = load_latest(tmp_path / "r" / "checkpoints")
    assert path == p2 and state["step"] == 2
    p2.write_bytes(b"garbage")
    with pytest.raises(InputError, match="no intact checkpoint"):
        load_latest(tmp_path / "r" / "checkpoints")


def test_resume_from_weights_only_checkpoint(tmp_path) -> None:
    src = BlobPairs((32, 32, 32))
    cfg = tiny_cfg("steps=4", "ckpt_every=2")
    pretrain(cfg, tmp_path / "a", "cpu", source=src, max_steps=2)
    (_, p), = list_checkpoints(tmp_path / "a" / "checkpoints")
    dst = tmp_path / "b" / "checkpoints" / p.name
    strip_optimizer(p, dst)
    assert dst.stat().st_size < 0.6 * p.stat().st_size
    with pytest.warns(UserWarning, match="no optimizer state"):
        res = pretrain(cfg, tmp_path / "b", "cpu", source=src, resume=True)
    assert res.step == 4 and res.model_dir is not None
    _, state = load_checkpoint(list_checkpoints(tmp_path / "b" / "checkpoints")[-1][1])
    assert state["rewarm_from"] == 2 and state["samples_seen"] == 4


def _transfer_accuracy(net: torch.nn.Module, src: BlobPairs, indices, n_ref: int = 1000) -> float:
    """Nearest-neighbour label transfer view1 -> view2 on whole feature maps (cosine similarity)."""
    net.eval()
    acc = []
    with torch.no_grad():
        for i in indices:
            b = src.batch([i])
            f1 = F.normalize(net(b.view1)[0].flatten(1).T, dim=1)
            f2 = F.normalize(net(b.view2)[0].flatten(1).T, dim=1)
            lab = b.labels[0, 0].flatten()
            ref = torch.randperm(lab.numel(), generator=torch.Generator().manual_seed(i))[:n_ref]
            acc.append(float((lab[ref][(f2 @ f1[ref].T).argmax(1)] == lab).float().mean()))
    return sum(acc) / len(acc)


@pytest.mark.parametrize("taps,gain", [("block", 0.15), ("prenorm", 0.02)])
def test_training_makes_same_structure_features_closer_across_views(tmp_path, taps, gain) -> None:
    """With the loss on each level's output, or on its last convolution before normalisation (which
    learns more slowly here: measured 0.31 -> 0.35 in these 100 steps)."""
    src = BlobPairs((16, 16, 16))
    cfg = tiny_cfg("steps=100", "data.size=16", "ckpt_every=100", f"loss.taps={taps}")
    held_out = range(10_000, 10_006)
    before = _transfer_accuracy(build_module(cfg, torch.device("cpu")).net, src, held_out)
    res = pretrain(cfg, tmp_path / "r", "cpu", source=src)
    after = _transfer_accuracy(load_model(res.model_dir), src, held_out)
    assert after > before + gain, (before, after)


# ---------------------------------------------------------------------------------------------- signals

_SCRIPT = textwrap.dedent(
    """
    from test_pretrain import BlobPairs, tiny_cfg
    from synthvox.train.pretrain import pretrain
    cfg = tiny_cfg("steps=10000", "ckpt_every=2", "keep_last=2", "log_every=1")
    r = pretrain(cfg, {run!r}, "cpu", resume=True, source=BlobPairs((32, 32, 32)))
    print("STOPPED", r.step, r.signal, flush=True)
    """
)


def _wait_for_checkpoint(run: Path, min_step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not list_checkpoints(run / "checkpoints") or list_checkpoints(run / "checkpoints")[-1][0] < min_step:
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "no checkpoint written in time"
        time.sleep(0.2)


def test_sigterm_checkpoints_and_sigkill_never_breaks_one(tmp_path) -> None:
    run = tmp_path / "r"
    script = _SCRIPT.format(run=str(run))
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)  # the child imports this file
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for_checkpoint(run, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    step = int(out.split("STOPPED")[1].split()[0])
    assert f"{int(signal.SIGTERM)}" == out.split()[-1]
    assert list_checkpoints(run / "checkpoints")[-1][0] == step  # written at the stop
    # SIGKILL at an arbitrary moment (checkpoints every 2 steps): every checkpoint left is intact
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for_checkpoint(run, step + 2, proc)
    time.sleep(0.3)
    proc.kill()
    proc.communicate(timeout=60)
    found = list_checkpoints(run / "checkpoints")
    assert found and found[-1][0] > step
    for _, p in found:
        load_checkpoint(p)


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch) -> None:
    import safetensors.torch

    p = tmp_path / "step_00000001.safetensors"
    save_checkpoint(p, {"a": torch.ones(3)}, {"step": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(p, {"a": torch.zeros(3)}, {"step": 1})
    tensors, state = load_checkpoint(p)  # the old file is untouched, no temporary left behind
    assert torch.equal(tensors["a"], torch.ones(3)) and state["step"] == 1
    assert [q.name for q in tmp_path.iterdir()] == [p.name]
