"""The finetuning loop: one to a few labelled volumes in, a self-describing model directory out.

The (pretrained) UNet gets a 1x1x1 head and learns from augmented patches (:mod:`.data`) with
MONAI's Dice + cross-entropy under AdamW and the schedule pretraining uses
(:func:`synthvox.train.schedule.warmup_decay`). The model directory is a run folder like
pretraining's (:mod:`synthvox.train.rundir`: ``--force``/``--resume``, ``log.csv`` appended per step
and cut back to the checkpoint on resume) and keeps its checkpoints in the one training format
(:mod:`synthvox.train.checkpointing`: safetensors with a digest, written atomically). Step ``i`` of seed
``s`` draws the same patches in every run, so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from synthvox.errors import InputError
from synthvox.segmentation.backbone import build_backbone, feature_channels, trainable_parameters
from synthvox.segmentation.config import FinetuneConfig
from synthvox.segmentation.data import (
    Subject,
    check_pair,
    common_spacing,
    draw_batch,
    label_ids_of,
    prepare_subject,
)
from synthvox.segmentation.infer import resolve_normalisation
from synthvox.segmentation.modeldir import (
    BACKBONE_DIR,
    HEAD_NAME,
    META_NAME,
    SegmentationMeta,
    SegmentationNet,
    save_model_dir,
    write_json,
)
from synthvox.segmentation.validation import ValidationPlan, plan_validation, validate
from synthvox.train.checkpointing import (
    checkpoint_name,
    list_checkpoints,
    load_latest,
    load_optimizer,
    optimizer_tensors,
    prune_checkpoints,
    save_checkpoint,
)
from synthvox.train.rundir import RunLog, check_run_dir, prepare_run_dir
from synthvox.train.schedule import warmup_decay
from synthvox.volume import Volume

CHECKPOINT_DIR = "checkpoints"
LOG_NAME = "log.csv"
LOG_FIELDS = ["step", "loss", "lr", "val_dice", "seconds", "val_on"]
#: The entries of a model directory that belong to the run (what ``--force`` removes).
RUN_ENTRIES = (META_NAME, HEAD_NAME, BACKBONE_DIR, "finetune.json", LOG_NAME, CHECKPOINT_DIR)


def lr_at(step: int, cfg: FinetuneConfig) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up to ``cfg.lr``, then cosine decay to zero."""
    return warmup_decay(step, cfg.lr, cfg.steps, int(cfg.warmup or 0), "cosine", 0.0)


def make_optimizer(net: SegmentationNet, params: list[nn.Parameter], cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW over ``params``: the pretrained network at ``cfg.lr``, the new head ``cfg.head_lr_factor`` times faster
    (each group's ``lr_factor`` scales the schedule's rate)."""
    head = {id(p) for p in net.head.parameters()}
    groups = [{"params": [p for p in params if id(p) not in head], "lr_factor": 1.0},
              {"params": [p for p in params if id(p) in head], "lr_factor": float(cfg.head_lr_factor)}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_loss(cfg: FinetuneConfig, has_background: bool) -> nn.Module:
    """MONAI's Dice + cross-entropy over the batch; the Dice part leaves background out unless
    ``cfg.dice_background`` (or there is no background class)."""
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True, batch=True,
                      include_background=bool(cfg.dice_background) or not has_background)


def optimisation_step(net: SegmentationNet, opt: torch.optim.Optimizer, loss_fn: nn.Module, params: list[nn.Parameter],
                      x: torch.Tensor, y: torch.Tensor, *, frozen_backbone: bool = False) -> float:
    """One step on a batch (bf16 autocast on CUDA; a frozen backbone runs without gradients; a
    non-finite loss is skipped); returns the loss. The loop and the budget's calibration both take it."""
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        if frozen_backbone:
            with torch.no_grad():
                feats = net.backbone(x)
            logits = net.head(feats)
        else:
            logits = net(x)
    loss = loss_fn(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    if torch.isfinite(loss):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 12.0)
        opt.step()
    return float(loss.detach())


#: Timed steps (the first one not counted) and checks of the calibration that fixes a minutes budget.
CALIBRATION_STEPS = 4
#: Held-out checks a minutes budget plans for.
BUDGET_CHECKS = 5
#: A minutes run stops once it overruns its budget by this factor (the calibration is an estimate).
BUDGET_SLACK = 1.1


def budget_config(cfg0: FinetuneConfig, subjects: Sequence[Subject], backbone: nn.Module, n_classes: int,
                  has_background: bool, check: Subject, device: torch.device) -> tuple[FinetuneConfig, dict[str, float]]:
    """Fix ``steps`` (and the automatic warm-up and check interval) so that ``cfg0.minutes`` holds the run.

    A few steps on a copy of the network (so the run itself starts untouched) time one step, one check
    on ``check`` times a check; the budget left after this calibration goes to ``BUDGET_CHECKS``
    checks and as many steps as fit (at most ``cfg0.steps``). Returns the resolved config and the
    timings.
    """
    import copy
    import statistics

    t_start = time.perf_counter()
    c_feat = feature_channels(backbone, device)
    net = SegmentationNet(copy.deepcopy(backbone), c_feat, n_classes).to(device)
    params = trainable_parameters(net, cfg0.train)
    opt = make_optimizer(net, params, cfg0)
    loss_fn = make_loss(cfg0, has_background)
    probe = cfg0.resolved()
    times = []
    net.train()
    if cfg0.train == "head":
        net.backbone.eval()
    for i in range(CALIBRATION_STEPS):
        t = time.perf_counter()
        x, y = draw_batch(subjects, probe, i, device)
        optimisation_step(net, opt, loss_fn, params, x, y, frozen_backbone=cfg0.train == "head")
        times.append(time.perf_counter() - t)
    t_step = statistics.median(times[1:])
    t = time.perf_counter()
    validate(net, check, probe, device, n_classes, has_background)
    t_check = time.perf_counter() - t
    del net, opt
    left = cfg0.minutes * 60.0 - (time.perf_counter() - t_start)  # type: ignore[operator]
    steps = int(max(1.0, (left - BUDGET_CHECKS * t_check) / t_step))
    steps = min(steps, int(cfg0.steps))
    cfg = dataclasses.replace(cfg0, steps=steps)
    if cfg0.val_every is None:
        cfg = dataclasses.replace(cfg, val_every=max(1, steps // BUDGET_CHECKS))
    timing = {"s_per_step": round(t_step, 4), "s_per_check": round(t_check, 3), "calibration_s": round(time.perf_counter() - t_start, 2)}
    return cfg.resolved(), timing


def _compat_key(cfg: FinetuneConfig, label_ids: Sequence[int], spacing: Sequence[float]) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it."""
    return {
        "label_ids": list(label_ids),
        "spacing": [round(float(s), 6) for s in spacing],
        "train": cfg.train,
        "patch_size": list(cfg.patch_size),
        "batch_size": cfg.batch_size,
        "init": cfg.init,
        "variant": cfg.variant if cfg.init == "random" else None,
        "model_overrides": cfg.model_overrides,
    }


def _checked_state(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """The finetuning fields of a checkpoint's state, with their types checked."""
    step = state.get("step")
    numbers = all(isinstance(state.get(k, 0.0), (int, float)) and not isinstance(state.get(k, 0.0), bool)
                  for k in ("best_val_dice", "last_val_dice"))
    if not isinstance(step, int) or isinstance(step, bool) or step < 0 or not isinstance(state.get("compat"), dict) \
            or not numbers or not isinstance(state.get("optimizer"), dict):
        raise InputError(f"checkpoint {path} has metadata of the wrong type: delete it to resume from an older one")
    return state


def _restore(path: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any], net: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Load a finetuning checkpoint's network and optimizer state in place."""
    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        net.load_state_dict(model_sd)
    except RuntimeError as exc:
        raise InputError(f"checkpoint {path} does not fit this model: {str(exc).splitlines()[0]}") from None
    load_optimizer(opt, tensors, state["optimizer"])


def finetune(
    images: Sequence[Volume],
    labels: Sequence[Volume],
    config: FinetuneConfig | None = None,
    *,
    out_dir: str | os.PathLike,
    val: tuple[Volume, Volume] | None = None,
    device: torch.device | str = "cpu",
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    **settings: Any,
) -> Path:
    """Finetune a segmentation network on one to a few labelled volumes and write a model directory.

    Args:
        images: training images (single-channel 3D volumes of any grid and orientation).
        labels: one label map per image, on its image's grid; ids are kept (e.g. 0, 7, 42).
        config: the settings (:class:`FinetuneConfig`); ``None``: what suits ``device``
            (:meth:`FinetuneConfig.for_device`: on a GPU 2000 steps of 96³ patches, on a CPU a
            30-minute budget of 48³ patches at 3 mm or coarser), with ``settings`` on top.
        out_dir: the model directory to write (checkpoints and log live inside it).
        val: an optional held-out ``(image, label map)``. Without it, several training volumes are
            held out in turn (each check scores the one the draws left out since the previous
            check); a single one is scored as a mirrored copy when its labels have no left/right
            sides, else as an augmented copy labelled a training-fit check
            (:mod:`synthvox.segmentation.validation`).
        device: where training runs (and, without ``config``, what the defaults suit); bf16 autocast on CUDA.
        resume: continue from the newest checkpoint in ``out_dir/checkpoints``.
        force: start over in a model directory that already holds a run (its entries are removed).
        progress: show a progress bar.
        **settings: :class:`FinetuneConfig` fields replacing those of ``config`` (``steps=300``,
            ``patch_size=64``, ``init="random"``, ``minutes=10``, ``spacing=2.0``...;
            :meth:`FinetuneConfig.with_settings`): ``steps`` without ``minutes`` drops a minutes
            budget. A ``minutes`` budget: timed steps on a copy of the network fix ``steps`` before
            training starts; a resumed run keeps the steps it fixed.

    Returns:
        The model directory (see :mod:`synthvox.segmentation.modeldir`).

    Raises:
        InputError: unequal numbers of images and label maps, a label map off its image's grid or
            with one class only, an image that is not a single-channel 3D volume, unknown settings,
            a model directory that already holds a run (without ``force`` or ``resume``), or (with
            ``resume``) a checkpoint from incompatible settings.
    """
    t_call = time.perf_counter()  # a minutes budget counts from here
    images, labels = list(images), list(labels)
    out = Path(out_dir)
    device = torch.device(device)
    if config is not None and not isinstance(config, FinetuneConfig):
        raise InputError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    base = FinetuneConfig.for_device(device) if config is None else config
    cfg0 = base.with_settings(**settings).checked()  # automatic values still open: a budget plans them
    cfg = cfg0.resolved()
    check_run_dir(out, RUN_ENTRIES, resume, force, what="a model")  # before any work
    if len(images) == 0:
        raise InputError("finetuning needs at least one image with its label map")
    if len(images) != len(labels):
        raise InputError(f"got {len(images)} images but {len(labels)} label maps: give one label map per image")
    if cfg.model_overrides and cfg.init != "random":
        raise InputError("model overrides apply only to --init random (pretrained weights fix the architecture)")

    for i, (im, lab) in enumerate(zip(images, labels)):
        check_pair(im, lab, f"training pair {i + 1}:")
    label_ids = label_ids_of(labels)
    train_spacing = cfg.spacing or [max(v, cfg.min_spacing or 0.0) for v in common_spacing(images)]
    if len(train_spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in train_spacing):
        raise InputError(f"--spacing must be a positive, finite number of mm, got {train_spacing}")
    normalisation = resolve_normalisation(images[0].data, cfg.modality)
    subjects = [
        prepare_subject(im, lab, label_ids, train_spacing, normalisation, f"training pair {i + 1}:")
        for i, (im, lab) in enumerate(zip(images, labels))
    ]
    if val is not None:
        val_subject = prepare_subject(val[0], val[1], label_ids, train_spacing, normalisation, "validation")
    else:
        val_subject = None
    for sub in [*subjects, *([val_subject] if val_subject else [])]:  # volumes live on the device; patches are cut there
        sub.image, sub.classes = sub.image.to(device), sub.classes.to(device)
    backbone, source = build_backbone(cfg.init, cfg.variant, device, cfg.seed, cfg.model_overrides)
    backbone = backbone.to(device)
    smallest = 2 * int(getattr(backbone, "multiple", 1))
    if min(cfg.patch_size) < smallest:
        raise InputError(f"--patch must be at least {smallest} voxels for this network (its coarsest level needs 2 voxels)")

    ckpt_dir = out / CHECKPOINT_DIR
    latest = load_latest(ckpt_dir, device, kind="finetune") if resume else None
    if resume and latest is None and (out / LOG_NAME).exists():
        older = " (its step_*.safetensors are of the format before the shared training checkpoints: start again with --force)" \
            if any(ckpt_dir.glob("step_*.safetensors")) else ""
        raise InputError(f"--resume: no checkpoint found in {ckpt_dir}{older}")
    budget: dict[str, float] = {}
    deadline = None
    if cfg.minutes is not None:
        saved = latest[2].get("config", {}) if latest is not None else {}
        if isinstance(saved.get("steps"), int) and isinstance(saved.get("val_every"), int):
            # a resumed budget run keeps the steps its calibration fixed: it continues the same schedule
            cfg = dataclasses.replace(cfg, steps=saved["steps"], val_every=saved["val_every"]).resolved()
        else:
            has_background = label_ids[0] == 0
            cfg, budget = budget_config(dataclasses.replace(cfg0, spacing=list(train_spacing)), subjects, backbone,
                                        len(label_ids), has_background, val_subject or subjects[0], device)
            deadline = t_call + cfg.minutes * 60.0
            if progress:
                print(f"finetune: {cfg.minutes:g} min budget: {cfg.steps} steps at {budget['s_per_step']:.2f} s/step, "
                      f"a check every {cfg.val_every} steps", file=sys.stderr)
    plan = plan_validation(subjects, val_subject, cfg, label_ids, device)
    from synthvox.io import cleanup_on_failure

    # A run that fails (out of memory, a bad value, Ctrl-C) before its first checkpoint leaves
    # nothing behind: what it wrote is removed, and so is the folder when this call made it.
    with cleanup_on_failure(out, keep=lambda: bool(list_checkpoints(ckpt_dir))):
        prepare_run_dir(out, RUN_ENTRIES, resume, force, what="a model")
        return _finetune_into(
            out, cfg, latest, backbone, source, subjects, plan, label_ids, train_spacing,
            normalisation, device, progress, deadline,
        )


def _finetune_into(
    out: Path,
    cfg: FinetuneConfig,
    latest: tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None,
    backbone: nn.Module,
    source: str,
    subjects: list[Subject],
    plan: ValidationPlan,
    label_ids: list[int],
    train_spacing: Sequence[float],
    normalisation: dict[str, Any],
    device: torch.device,
    progress: bool,
    deadline: float | None = None,
) -> Path:
    """The training loop of :func:`finetune`, writing into the existing folder ``out``.

    ``deadline`` (a ``time.perf_counter()`` value) is the end of a minutes budget: at every check the
    remaining steps are planned again from the pace so far (a busy machine slows down after the
    calibration), so the cosine schedule still ends at the budget."""
    from tqdm.auto import tqdm

    has_background = label_ids[0] == 0
    n_classes = len(label_ids)

    c_feat = feature_channels(backbone, device)
    with torch.random.fork_rng(devices=[]):  # the head's initialisation from the seed, global RNG untouched
        torch.manual_seed(cfg.seed)
        net = SegmentationNet(backbone, c_feat, n_classes).to(device)
    params = trainable_parameters(net, cfg.train)
    opt = make_optimizer(net, params, cfg)
    loss_fn = make_loss(cfg, has_background)

    compat = _compat_key(cfg, label_ids, train_spacing)
    # training volumes held out in turn change which subject each step draws from
    compat["held_out_in_turn"] = [plan.val_every, plan.window] if plan.kind == "left out in turn" else None
    start, best, last_val, last_on = 0, float("nan"), float("nan"), ""
    if latest is not None:
        path, tensors, state = latest
        state = _checked_state(path, state)
        if state["compat"] != compat:
            raise InputError(
                f"--resume: the checkpoint in {out} was made with different settings or data "
                f"({_diff(state['compat'], compat)}); use another --out or drop --resume"
            )
        _restore(path, tensors, state, net, opt)
        start = int(state["step"])
        best = float(state.get("best_val_dice", float("nan")))
        last_val = float(state.get("last_val_dice", float("nan")))
        last_on = str(state.get("last_val_on", ""))
        del tensors

    meta = SegmentationMeta(
        label_ids=label_ids,
        spacing=[float(s) for s in train_spacing],
        orientation="RAS",
        normalisation=normalisation,
        patch_size=list(cfg.patch_size),
        feature_channels=c_feat,
        train={**cfg.to_json(), "init_source": source, "n_train": len(subjects), "val_source": plan.summary,
               "val_kind": plan.kind, "val_held_out": plan.held_out},
        flip_augmented=bool(cfg.augment.flip),
    )
    write_json(out / "finetune.json", {"finetune": cfg.to_json(), "label_ids": label_ids, "spacing": meta.spacing})
    log = RunLog(out / LOG_NAME, LOG_FIELDS, start if latest is not None else None)

    frozen_backbone = cfg.train == "head"
    net.train()
    if frozen_backbone:
        net.backbone.eval()
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc="finetune", dynamic_ncols=True)
    step = start
    last_loss = float("nan")
    stopped = ""

    def checkpoint(at: int) -> None:
        tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
        opt_tensors, opt_meta = optimizer_tensors(opt)
        tensors.update(opt_tensors)
        state = {"step": at, "compat": compat, "best_val_dice": best, "last_val_dice": last_val,
                 "last_val_on": last_on, "config": cfg.to_json(), "optimizer": opt_meta, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        save_checkpoint(out / CHECKPOINT_DIR / checkpoint_name(at), tensors, state, kind="finetune")
        prune_checkpoints(out / CHECKPOINT_DIR, max(1, cfg.keep_checkpoints))

    try:
        while step < cfg.steps:
            x, y = draw_batch(subjects, cfg, step, device, plan.left_out(step))
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_factor"]
            last_loss = optimisation_step(net, opt, loss_fn, params, x, y, frozen_backbone=frozen_backbone)
            step += 1
            bar.update(1)
            row: dict[str, Any] = {"step": step, "loss": f"{last_loss:.5f}", "lr": f"{lr:.3e}", "val_dice": "",
                                   "seconds": f"{time.perf_counter() - t0:.2f}"}
            if step % cfg.val_every == 0 or step == cfg.steps:
                scored, last_on = plan.at(step)
                last_val = validate(net, scored, cfg, device, n_classes, has_background)
                net.train()
                if frozen_backbone:
                    net.backbone.eval()
                best = last_val if not (best >= last_val) else best
                row["val_dice"], row["val_on"] = f"{last_val:.4f}", last_on
                bar.write(f"step {step}: loss {last_loss:.4f}, {plan.dice_name} {last_val:.4f} ({last_on})")
                if deadline is not None and step < cfg.steps:
                    pace = (time.perf_counter() - t0) / max(1, step - start)
                    planned = step + max(1, int((deadline - time.perf_counter()) / pace))
                    if planned < cfg.steps * 0.98 or planned > cfg.steps * 1.02:
                        cfg = dataclasses.replace(cfg, steps=planned)
                        bar.total = cfg.steps
                        bar.write(f"step {step}: {cfg.steps} steps fit the budget at {pace:.2f} s per step")
            bar.set_postfix(loss=f"{last_loss:.3f}", dice=f"{last_val:.3f}")
            log.append(row)
            overrun = cfg.minutes is not None and time.perf_counter() - t0 > cfg.minutes * 60.0 * BUDGET_SLACK
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or overrun:
                checkpoint(step)
            if overrun and step < cfg.steps:
                stopped = f"stopped at the {cfg.minutes:g}-minute budget after {step} of {cfg.steps} steps"
                bar.write(stopped)
                break
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (see io.cleanup_on_failure)
        if step > start:
            checkpoint(step)
        raise
    finally:
        bar.close()
        log.close()

    meta.train["steps"] = cfg.steps  # a minutes budget may have planned again along the way
    meta.history = {
        "steps": step,
        "final_loss": last_loss,
        "last_val_dice": last_val,
        "best_val_dice": best,
        "val_source": plan.summary,
        "val_kind": plan.kind,
        "val_held_out": plan.held_out,
        "val_dice_name": plan.dice_name,
        "last_val_on": last_on,
        "seconds_this_run": round(time.perf_counter() - t0, 2),
        "stopped": stopped,
    }
    net.eval()
    save_model_dir(net, meta, out)
    return out


def _diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(f"{k}: {a.get(k)} vs {b.get(k)}" for k in keys[:3]) or "unknown"
