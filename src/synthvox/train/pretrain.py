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
learning rate is a function of the step. A run resumed from a checkpoint (weights, heads, AdamW
state, step) therefore continues exactly as if it had not stopped.

Run folder::

    RUN/config.yaml        resolved config
    RUN/checkpoints/       step_XXXXXXXX.safetensors (the last ``keep_last``)
    RUN/log.csv            step, loss, lr, grad norm, synthesis / network seconds, skipped, ...
    RUN/tensorboard/       TensorBoard events (when tensorboard is installed)
    RUN/model/             the network alone (synthvox.models.save_model), written at the end
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from synthvox.errors import InputError
from synthvox.models.checkpoint import save_model
from synthvox.train import rundir
from synthvox.train.checkpointing import (
    checkpoint_card,
    checkpoint_name,
    list_checkpoints,
    load_latest,
    load_optimizer,
    optimizer_tensors,
    prune_checkpoints,
    save_checkpoint,
)
from synthvox.train.config import PretrainConfig, dump_yaml, to_dict
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


class _StopFlag:
    """Set by SIGTERM/SIGINT while installed (main thread only); the loop checkpoints and stops."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopFlag]:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, h in self._old.items():
                signal.signal(s, h)
            self._old.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signum = signum


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


def prepare_run_dir(out: Path, resume: bool, force: bool) -> None:
    """Refuse to overwrite a run unless ``force`` (then clear its outputs); nothing to do on resume.

    A folder that cannot be written is refused here, before the network or the data engine is built
    (:func:`synthvox.train.rundir.prepare_run_dir`).
    """
    rundir.prepare_run_dir(out, RUN_ENTRIES, resume, force, what="a run")


def _clean_up_on_failure(fn: Any) -> Any:
    """Make a failed run leave nothing behind unless it wrote a checkpoint to resume from.

    When :func:`pretrain` raises (out of memory, a bad value, a second Ctrl-C) and the run folder
    holds no checkpoint, what this call added there (``config.yaml``, ``log.csv``, ``tensorboard/``,
    an empty ``checkpoints/``) is removed, and so is the folder itself when this call created it,
    so the next run does not find a "run" that blocks it.
    """
    import inspect

    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from synthvox.io import cleanup_on_failure

        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        out = Path(bound.arguments["out"])
        info = bound.arguments["dist_info"] or DistInfo()
        with cleanup_on_failure(out, keep=lambda: not info.is_main or bool(list_checkpoints(out / "checkpoints"))):
            return fn(*args, **kwargs)

    return wrapper


@_clean_up_on_failure
def pretrain(
    cfg: PretrainConfig,
    out: str | os.PathLike,
    device: torch.device | str = "cpu",
    resume: bool = False,
    force: bool = False,
    source: PairSource | None = None,
    dist_info: DistInfo | None = None,
    max_steps: int | None = None,
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

    Returns:
        A :class:`PretrainResult`.
    """
    device = torch.device(device)
    info = dist_info or DistInfo()
    out = Path(out)
    if info.is_main:
        prepare_run_dir(out, resume, force)
    barrier(info)
    ckpt_dir = out / "checkpoints"

    module = build_module(cfg, device)
    optimizer = make_optimizer(module, cfg)
    start, skipped, samples, rewarm_from = 0, 0, 0, None
    if resume:
        latest = load_latest(ckpt_dir, device)
        if latest is not None:
            path, tensors, state = latest
            _load_module_tensors(module, tensors, str(path))
            start = int(state["step"])
            skipped = int(state.get("skipped", 0))
            samples = int(state.get("samples_seen", 0))
            rewarm_from = state.get("rewarm_from")
            if "optimizer" in state and any(k.startswith("optim.") for k in tensors):
                load_optimizer(optimizer, tensors, state["optimizer"])
            else:
                rewarm_from = start
                if info.is_main:
                    warnings.warn(f"{path.name} has no optimizer state: AdamW restarts with a {REWARM_STEPS}-step warm-up", stacklevel=2)
            del tensors
    if source is None:
        source = build_engine(cfg, device)
    train_module: nn.Module = module
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        if cfg.model.norm == "batch" and device.type == "cuda":
            module.net = nn.SyncBatchNorm.convert_sync_batchnorm(module.net)
        train_module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)

    log = tb = bar = None
    if info.is_main:
        from synthvox.io import atomic_path

        with atomic_path(out / "config.yaml") as tmp:
            tmp.write_text(dump_yaml(cfg))
        log = rundir.RunLog(out / "log.csv", LOG_FIELDS + [f"loss_{n}" for n in cfg.loss.layers], start if resume else None)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                tb = SummaryWriter(str(out / "tensorboard"), purge_step=start if start else None)
            except ImportError:
                tb = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=start, desc="pretrain", unit="step", dynamic_ncols=True, file=sys.stderr, mininterval=1.0)

    params = [p for p in train_module.parameters() if p.requires_grad]
    stop = _StopFlag()
    step = start
    last_ckpt: Path | None = None
    last_loss = float("nan")
    acc = {"loss": 0.0, "n": 0, "synth": 0.0, "net": 0.0, "gnorm": 0.0}
    acc_parts: dict[str, float] = {n: 0.0 for n in cfg.loss.layers}
    t_start = time.perf_counter()
    end = cfg.steps if max_steps is None else min(cfg.steps, start + int(max_steps))
    per_step_samples = cfg.batch_pairs * info.world_size

    def state_dict_json() -> dict[str, Any]:
        return {
            "step": step,
            "samples_seen": samples,
            "skipped": skipped,
            "world_size": info.world_size,
            "rewarm_from": rewarm_from,
            "config": to_dict(cfg),
            "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def write_checkpoint() -> Path | None:
        if not info.is_main:
            return None
        tensors = _module_tensors(module)
        opt_t, opt_meta = optimizer_tensors(optimizer)
        tensors.update(opt_t)
        st = state_dict_json()
        st["optimizer"] = opt_meta
        p = save_checkpoint(ckpt_dir / checkpoint_name(step), tensors, st)
        prune_checkpoints(ckpt_dir, cfg.keep_last)
        return p

    train_module.train()
    try:
        with stop.installed():
            while step < end:
                if any_flag(stop.signum is not None, info, device):
                    break
                t0 = time.perf_counter()
                indices = sample_indices(step, info.rank, info.world_size, cfg.batch_pairs)
                batch = source.batch(indices)
                _sync(device)
                t1 = time.perf_counter()
                lr = lr_at(step, cfg, rewarm_from)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                loss, parts = train_module(
                    batch.view1.to(device, non_blocking=True),
                    batch.view2.to(device, non_blocking=True),
                    batch.labels.to(device, non_blocking=True),
                    pair_generators(indices, cfg.seed, device),
                )
                del batch
                loss.backward()
                clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
                gnorm = torch.nn.utils.clip_grad_norm_(params, clip)
                loss_mean = all_reduce_mean(loss.detach().float(), info)
                lv, gv = float(loss_mean), float(gnorm)
                if math.isfinite(lv) and math.isfinite(gv):
                    optimizer.step()
                    last_loss = lv
                    acc["loss"] += lv
                    acc["gnorm"] += gv
                    acc["n"] += 1
                    for n, v in parts.items():
                        acc_parts[n] += float(v)
                else:
                    skipped += 1
                optimizer.zero_grad(set_to_none=True)
                _sync(device)
                t2 = time.perf_counter()
                acc["synth"] += t1 - t0
                acc["net"] += t2 - t1
                step += 1
                samples += per_step_samples
                if bar is not None:
                    bar.update(1)
                    if acc["n"]:
                        bar.set_postfix(loss=f"{acc['loss'] / acc['n']:.4f}", skipped=skipped, refresh=False)
                if step % cfg.log_every == 0 or step == end:
                    if log is not None:
                        n = max(acc["n"], 1)
                        row = [
                            step,
                            f"{acc['loss'] / n:.6f}" if acc["n"] else "nan",
                            f"{lr:.6g}",
                            f"{acc['gnorm'] / n:.4f}" if acc["n"] else "nan",
                            f"{acc['synth']:.4f}",
                            f"{acc['net']:.4f}",
                            skipped,
                            samples,
                            f"{time.perf_counter() - t_start:.2f}",
                        ] + [f"{acc_parts[k] / n:.6f}" if acc["n"] else "nan" for k in cfg.loss.layers]
                        log.append(row)
                        if tb is not None and acc["n"]:
                            tb.add_scalar("loss/total", acc["loss"] / n, step)
                            for k in cfg.loss.layers:
                                tb.add_scalar(f"loss/{k}", acc_parts[k] / n, step)
                            tb.add_scalar("lr", lr, step)
                            tb.add_scalar("grad_norm", acc["gnorm"] / n, step)
                            tb.add_scalar("time/synthesis_s", acc["synth"], step)
                            tb.add_scalar("time/network_s", acc["net"], step)
                            tb.add_scalar("skipped", skipped, step)
                    acc = {"loss": 0.0, "n": 0, "synth": 0.0, "net": 0.0, "gnorm": 0.0}
                    acc_parts = {k: 0.0 for k in cfg.loss.layers}
                if step % cfg.ckpt_every == 0 and step < end:
                    last_ckpt = write_checkpoint() or last_ckpt
            interrupted = stop.signum is not None and step < end
            finished = step >= cfg.steps
            if not list_checkpoints(ckpt_dir) or list_checkpoints(ckpt_dir)[-1][0] != step:
                last_ckpt = write_checkpoint() or last_ckpt
            else:
                last_ckpt = list_checkpoints(ckpt_dir)[-1][1] if info.is_main else None
            model_dir = None
            if info.is_main and finished:
                model_dir = save_model(
                    module.net,
                    out / "model",
                    extra={
                        "trained_by": "synthvox pretrain",
                        "world_size": info.world_size,
                        "variant": cfg.model.variant,
                        "config": to_dict(cfg),
                        "model_card": checkpoint_card(state_dict_json(), str(device)),
                    },
                )
            barrier(info)
    finally:
        if bar is not None:
            bar.close()
        if tb is not None:
            tb.close()
        if log is not None:
            log.close()
    return PretrainResult(step, skipped, interrupted, last_loss, last_ckpt, model_dir, stop.signum)
