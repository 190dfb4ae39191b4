"""Contrastive pretraining of the UNet on synthetic pairs made on the fly (DESIGN.md step 4).

One step (:mod:`synthvox.train.objective`): the data engine renders ``batch_pairs`` label maps with
two views each, on the training device; the UNet sees both views;
:class:`~synthvox.losses.MultiLayerContrastiveLoss` pulls voxels of the same structure together
across views at several layers. AdamW with warm-up and cosine decay,
gradient clipping, bf16 autocast and channels-last on CUDA, optional ``torch.compile``. Under
``torchrun`` the same code runs DDP; each rank draws its own samples and only rank 0 writes.

Randomness is a pure function of ``(seed, sample index)``: sample indices come from
``(step, rank, position in the batch)`` and the engine makes sample ``i`` of seed ``s`` the same
everywhere; the voxel sampling of the loss uses a generator seeded from the same index. The
learning rate is a function of the step. The loop, checkpoints, log, resume and the stop signal
are the training runner's (:class:`synthvox.train.runner.Runner`, shared with finetuning); this
module supplies the step (:class:`_Pretraining`). A run resumed from a checkpoint (weights, heads, AdamW
state, step) therefore continues exactly as if it had not stopped.

Run folder::

    RUN/config.yaml        resolved config
    RUN/checkpoints/       step_XXXXXXXX.safetensors (the last ``keep_last``)
    RUN/log.csv            step, loss, lr, grad norm, synthesis / network seconds, skipped, ...
    RUN/tensorboard/       TensorBoard events (when tensorboard is installed)
    RUN/model/             the network alone (synthvox.models.save_model), written at the end
"""

from __future__ import annotations

import functools
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from synthvox.errors import InputError
from synthvox.models.weightsdir import save_model
from synthvox.train.checkpointing import checkpoint_card, load_latest
from synthvox.train.config import PretrainConfig, apply_overrides, dump_yaml, to_dict, validate
from synthvox.train.distributed import DistInfo, all_reduce_mean, any_flag, barrier
from synthvox.train.objective import (
    PairSource,
    PretrainModule,
    build_engine,
    build_module,
    make_optimizer,
    pair_generators,
    sample_indices,
)
from synthvox.train.runner import Runner, Task, run_folder
from synthvox.train.schedule import REWARM_STEPS, warmup_decay

LOG_FIELDS = ["step", "loss", "lr", "grad_norm", "synth_s", "net_s", "skipped", "samples", "elapsed_s"]
def lr_at(step: int, cfg: PretrainConfig, rewarm_from: int | None = None) -> float:
    """Learning rate of optimisation step ``step`` (0-based): linear warm-up, then decay
    (:func:`synthvox.train.schedule.warmup_decay` with ``cfg.optim``).

    ``rewarm_from``: the step at which AdamW was restarted (checkpoint without optimizer state); the
    rate then ramps up again over :data:`REWARM_STEPS` steps.
    """
    o = cfg.optim
    return warmup_decay(step, o.lr, cfg.steps, o.warmup, o.decay, o.final_lr_ratio, rewarm_from, REWARM_STEPS)


@dataclass
class PretrainResult:
    """What a call to :func:`pretrain` did."""

    step: int
    skipped: int
    interrupted: bool
    last_loss: float
    checkpoint: Path | None
    model_dir: Path | None
    signal: int | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _module_tensors(module: PretrainModule) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in module.net.state_dict().items()}
    out.update({f"heads.{k}": v for k, v in module.loss.heads.state_dict().items()})
    return {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in out.items()}


def _load_module_tensors(module: PretrainModule, tensors: dict[str, torch.Tensor], where: str) -> None:
    net_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    head_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("heads.")}
    try:
        module.net.load_state_dict(net_sd, strict=True)
        module.loss.heads.load_state_dict(head_sd, strict=True)
    except RuntimeError as exc:
        raise InputError(f"checkpoint {where} does not fit this config's network: {' '.join(str(exc).split())[:200]}") from None


#: The entries of a run folder that belong to the run (what ``--force`` removes).
RUN_ENTRIES = ("config.yaml", "checkpoints", "log.csv", "tensorboard", "model")


def _in_run_folder(fn: Any) -> Any:
    """Run :func:`pretrain` inside its run folder (:func:`synthvox.train.runner.run_folder`): prepared
    (``--force`` / ``--resume`` checked, before the network or the data engine is built), and when the
    run fails (out of memory, a bad value, a second Ctrl-C) before any checkpoint, what this call
    added there (``config.yaml``, ``log.csv``, ``tensorboard/``, an empty ``checkpoints/``) removed, and
    the folder itself when this call created it."""
    import inspect

    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if a["overrides"]:  # checked before the run folder is touched
            a["cfg"] = validate(apply_overrides(a["cfg"], dict(a["overrides"]), "pretraining setting"))
            a["overrides"] = {}
        info = a["dist_info"] or DistInfo()
        with run_folder(Path(a["out"]), RUN_ENTRIES, a["resume"], a["force"], "a run", writer=info.is_main):
            return fn(*bound.args, **bound.kwargs)

    return wrapper


@_in_run_folder
def pretrain(
    cfg: PretrainConfig,
    out: str | os.PathLike,
    device: torch.device | str = "cpu",
    resume: bool = False,
    force: bool = False,
    source: PairSource | None = None,
    dist_info: DistInfo | None = None,
    max_steps: int | None = None,
    **overrides: Any,
) -> PretrainResult:
    """Train (or continue training) the UNet with the contrastive loss; see the module docstring.

    Args:
        cfg: resolved configuration.
        out: the run folder.
        device: training device (under DDP, this process's device).
        resume: continue from the newest intact checkpoint in ``out/checkpoints`` (start fresh when
            there is none).
        force: start over in a folder that already holds a run.
        source: pair source (default: the data engine built from ``cfg.data``).
        dist_info: rank information (default: one process; the process group must already exist
            when it says more than one).
        max_steps: stop (with a checkpoint) after this many steps in this call, e.g. to split a run.
        **overrides: settings replacing those of ``cfg``, by dotted key as ``synthvox pretrain``'s
            ``key=value`` (``steps=200``, ``**{"optim.lr": 1e-3}``), checked as the command's are.

    Returns:
        A :class:`PretrainResult`.
    """
    device = torch.device(device)
    info = dist_info or DistInfo()
    out = Path(out)
    barrier(info)  # rank 0 has prepared the folder (see _in_run_folder)

    module = build_module(cfg, device)
    optimizer = make_optimizer(module, cfg)
    task = _Pretraining(cfg, module, optimizer, info, device)
    run = Runner(task, out, optimizer, task.lr, cfg.steps, LOG_FIELDS + [f"loss_{n}" for n in cfg.loss.layers],
                 cfg.ckpt_every, cfg.keep_last, "pretrain", progress=cfg.progress, writer=info.is_main,
                 any_stop=lambda flag: any_flag(flag, info, device))
    if resume:
        run.restore(load_latest(run.checkpoint_dir, device))
    task.source = source if source is not None else build_engine(cfg, device)
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        if cfg.model.norm == "batch" and device.type == "cuda":
            module.net = nn.SyncBatchNorm.convert_sync_batchnorm(module.net)
        task.train_module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
    task.params = [p for p in task.train_module.parameters() if p.requires_grad]

    if info.is_main:
        from synthvox.files import atomic_path

        with atomic_path(out / "config.yaml") as tmp:
            tmp.write_text(dump_yaml(cfg))
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                task.tb = SummaryWriter(str(out / "tensorboard"), purge_step=run.start if run.start else None)
            except ImportError:
                task.tb = None
    end = cfg.steps if max_steps is None else min(cfg.steps, run.start + int(max_steps))
    task.t_start = time.perf_counter()
    task.train_module.train()
    try:
        result = run.run(end)
        model_dir = None
        if info.is_main and result.step >= cfg.steps:
            model_dir = save_model(
                module.net,
                out / "model",
                extra={
                    "trained_by": "synthvox pretrain",
                    "world_size": info.world_size,
                    "variant": cfg.model.variant,
                    "config": to_dict(cfg),
                    "model_card": checkpoint_card({"step": result.step, **task.state()}, str(device)),
                },
            )
        barrier(info)
    finally:
        if task.tb is not None:
            task.tb.close()
    return PretrainResult(result.step, task.skipped, result.signal is not None, task.last_loss, result.checkpoint,
                          model_dir, result.signal)


class _Pretraining(Task):
    """Pretraining's part of a run (:class:`synthvox.train.runner.Task`): the contrastive step on the
    engine's pairs, the log row every ``log_every`` steps (means over them), the samples seen and the
    skipped steps, AdamW's re-warm-up after a checkpoint without optimizer state."""

    kind = "pretrain"

    def __init__(self, cfg: PretrainConfig, module: PretrainModule, optimizer: torch.optim.Optimizer, info: DistInfo,
                 device: torch.device) -> None:
        self.cfg, self.module, self.optimizer, self.info, self.device = cfg, module, optimizer, info, device
        self.train_module: nn.Module = module
        self.source: PairSource | None = None
        self.params: list[nn.Parameter] = []
        self.tb: Any = None
        self.skipped, self.samples, self.rewarm_from = 0, 0, None
        self.last_loss = float("nan")
        self.t_start = time.perf_counter()
        self._reset()

    def _reset(self) -> None:
        self.acc = {"loss": 0.0, "n": 0, "synth": 0.0, "net": 0.0, "gnorm": 0.0}
        self.acc_parts = {n: 0.0 for n in self.cfg.loss.layers}

    def lr(self, step: int) -> float:
        return lr_at(step, self.cfg, self.rewarm_from)

    def tensors(self) -> dict[str, torch.Tensor]:
        return _module_tensors(self.module)

    def state(self) -> dict[str, Any]:
        return {
            "samples_seen": self.samples,
            "skipped": self.skipped,
            "world_size": self.info.world_size,
            "rewarm_from": self.rewarm_from,
            "config": to_dict(self.cfg),
            "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def load(self, path: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        _load_module_tensors(self.module, tensors, str(path))
        self.skipped = int(state.get("skipped", 0))
        self.samples = int(state.get("samples_seen", 0))
        self.rewarm_from = state.get("rewarm_from")

    def without_optimizer(self, path: Path, step: int) -> None:
        self.rewarm_from = step
        if self.info.is_main:
            warnings.warn(f"{path.name} has no optimizer state: AdamW restarts with a {REWARM_STEPS}-step warm-up", stacklevel=2)

    def step(self, step: int, lr: float, run: Runner) -> list[Any] | None:
        cfg, info, device, acc = self.cfg, self.info, self.device, self.acc
        t0 = time.perf_counter()
        indices = sample_indices(step, info.rank, info.world_size, cfg.batch_pairs)
        batch = self.source.batch(indices)  # type: ignore[union-attr]
        _sync(device)
        t1 = time.perf_counter()
        loss, parts = self.train_module(
            batch.view1.to(device, non_blocking=True),
            batch.view2.to(device, non_blocking=True),
            batch.labels.to(device, non_blocking=True),
            pair_generators(indices, cfg.seed, device),
        )
        del batch
        loss.backward()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        loss_mean = all_reduce_mean(loss.detach().float(), info)
        lv, gv = float(loss_mean), float(gnorm)
        if math.isfinite(lv) and math.isfinite(gv):
            self.optimizer.step()
            self.last_loss = lv
            acc["loss"] += lv
            acc["gnorm"] += gv
            acc["n"] += 1
            for n, v in parts.items():
                self.acc_parts[n] += float(v)
        else:
            self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        _sync(device)
        t2 = time.perf_counter()
        acc["synth"] += t1 - t0
        acc["net"] += t2 - t1
        self.samples += cfg.batch_pairs * info.world_size
        if acc["n"]:
            run.show(loss=f"{acc['loss'] / acc['n']:.4f}", skipped=self.skipped)
        done = step + 1
        if not (done % cfg.log_every == 0 or done == run.end):
            return None
        n = max(acc["n"], 1)
        row = [
            done,
            f"{acc['loss'] / n:.6f}" if acc["n"] else "nan",
            f"{lr:.6g}",
            f"{acc['gnorm'] / n:.4f}" if acc["n"] else "nan",
            f"{acc['synth']:.4f}",
            f"{acc['net']:.4f}",
            self.skipped,
            self.samples,
            f"{time.perf_counter() - self.t_start:.2f}",
        ] + [f"{self.acc_parts[k] / n:.6f}" if acc["n"] else "nan" for k in cfg.loss.layers]
        if self.tb is not None and acc["n"]:
            tb = self.tb
            tb.add_scalar("loss/total", acc["loss"] / n, done)
            for k in cfg.loss.layers:
                tb.add_scalar(f"loss/{k}", self.acc_parts[k] / n, done)
            tb.add_scalar("lr", lr, done)
            tb.add_scalar("grad_norm", acc["gnorm"] / n, done)
            tb.add_scalar("time/synthesis_s", acc["synth"], done)
            tb.add_scalar("time/network_s", acc["net"], done)
            tb.add_scalar("skipped", self.skipped, done)
        self._reset()
        return row if info.is_main else None
