"""The finetuning loop: one to a few labelled volumes in, a self-describing model directory out.

The (pretrained) UNet gets a 1x1x1 head and learns from augmented patches (:mod:`.data`) with
MONAI's Dice + cross-entropy under AdamW and the schedule pretraining uses
(:func:`synthvox.train.schedule.warmup_decay`), one step of :class:`_Finetuning` at a time in
the training runner shared with pretraining (:class:`synthvox.train.runner.Runner`). The model directory is a run folder like
pretraining's (:mod:`synthvox.train.rundir`: ``--force``/``--resume``, ``log.csv`` appended per step
and cut back to the checkpoint on resume) and keeps its checkpoints in the one training format
(:mod:`synthvox.train.checkpointing`: safetensors with a digest, written atomically). Step ``i`` of seed
``s`` draws the same patches in every run, so a resumed run continues exactly.

With pseudo-labelled volumes (``pseudo=``, :class:`~synthvox.segmentation.data.PseudoLabels`, what
:func:`synthvox.segmentation.distill.distil` makes) every ``labelled_every``-th step draws from the
labelled pairs and the others from the pseudo-labelled volumes, and the loss weighs each voxel
(:class:`~synthvox.losses.dice_ce.WeightedDiceCELoss`: labelled voxels one, pseudo-labelled ones
their confidence); the checks score the labelled pairs only.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
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
    PseudoLabels,
    Subject,
    check_pair,
    common_spacing,
    draw_batch,
    draw_weighted_batch,
    label_ids_of,
    prepare_subject,
)
from synthvox.segmentation.head import init_head_by_probe
from synthvox.segmentation.infer import resolve_normalisation
from synthvox.segmentation.modeldir import (
    BACKBONE_DIR,
    HEAD_NAME,
    META_NAME,
    PSEUDO_DIR,
    SegmentationMeta,
    SegmentationNet,
    save_model_dir,
    write_json,
)
from synthvox.segmentation.result import mean_label_volumes_ml
from synthvox.segmentation.validation import ValidationPlan, plan_validation, validate
from synthvox.train.checkpointing import load_latest
from synthvox.train.rundir import check_run_dir
from synthvox.train.runner import CHECKPOINT_DIR, LOG_NAME, Runner, Task, run_folder
from synthvox.train.schedule import warmup_decay
from synthvox.volume import Volume

LOG_FIELDS = ["step", "loss", "lr", "val_dice", "seconds", "val_on"]
#: The entries of a model directory that belong to the run (what ``--force`` removes).
RUN_ENTRIES = (META_NAME, HEAD_NAME, BACKBONE_DIR, "finetune.json", LOG_NAME, CHECKPOINT_DIR, PSEUDO_DIR)


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


def make_loss(cfg: FinetuneConfig, has_background: bool, weighted: bool = False) -> nn.Module:
    """MONAI's Dice + cross-entropy over the batch; the Dice part leaves background out unless
    ``cfg.dice_background`` (or there is no background class). ``weighted``: the same loss with a
    weight per voxel (:class:`~synthvox.losses.dice_ce.WeightedDiceCELoss`, for pseudo-labels)."""
    include_background = bool(cfg.dice_background) or not has_background
    if weighted:
        from synthvox.losses.dice_ce import WeightedDiceCELoss

        return WeightedDiceCELoss(include_background)
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True, batch=True, include_background=include_background)


def optimisation_step(net: SegmentationNet, opt: torch.optim.Optimizer, loss_fn: nn.Module, params: list[nn.Parameter],
                      x: torch.Tensor, y: torch.Tensor, *, frozen_backbone: bool = False,
                      weight: torch.Tensor | None = None) -> float:
    """One step on a batch (bf16 autocast on CUDA; a frozen backbone runs without gradients; a
    non-finite loss is skipped); returns the loss. The loop and the budget's calibration both take it.
    ``weight``: ``(B, 1, *patch)`` per-voxel weights for a weighted ``loss_fn``."""
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        if frozen_backbone:
            with torch.no_grad():
                feats = net.backbone(x)
            logits = net.head(feats)
        else:
            logits = net(x)
    loss = loss_fn(logits.float(), y) if weight is None else loss_fn(logits.float(), y, weight)
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
    pseudo: PseudoLabels | None = None,
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
        pseudo: pseudo-labelled volumes to train on as well (:class:`~synthvox.segmentation.data.PseudoLabels`,
            e.g. atlas fusion's labels from :func:`synthvox.segmentation.distill.distil`): every
            ``pseudo.labelled_every``-th step draws from the labelled pairs, the others from these, each
            voxel's loss weighted by its confidence; the checks never score them. Their label ids must be
            among the labelled pairs'. ``out_dir/pseudo`` then belongs to the caller (neither checked
            nor removed here).
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
    owned = [e for e in RUN_ENTRIES if pseudo is None or e != PSEUDO_DIR]  # pseudo-labels: the caller's
    check_run_dir(out, owned, resume, force, what="a model")  # before any work
    if pseudo is not None:
        pseudo.check()
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
    pseudo_subjects = [] if pseudo is None else [
        prepare_subject(im, lab, label_ids, train_spacing, normalisation, f"pseudo-labelled {name}:", pseudo.weights(i))
        for i, (im, lab, name) in enumerate(zip(pseudo.images, pseudo.labels, pseudo.names))
    ]
    for sub in [*subjects, *([val_subject] if val_subject else []), *pseudo_subjects]:  # volumes live on the device
        sub.image, sub.classes = sub.image.to(device), sub.classes.to(device)
        sub.weight = sub.weight.to(device) if sub.weight is not None else None
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
    # A run that fails (out of memory, a bad value, Ctrl-C) before its first checkpoint leaves
    # nothing behind: what it wrote is removed, and so is the folder when this call made it.
    with run_folder(out, owned, resume, force, what="a model"):
        return _finetune_into(
            out, cfg, latest, backbone, source, subjects, plan, label_ids, train_spacing,
            normalisation, device, progress, deadline, pseudo, pseudo_subjects, mean_label_volumes_ml(labels),
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
    pseudo: PseudoLabels | None = None,
    pseudo_subjects: Sequence[Subject] = (),
    label_volumes: dict[str, float] | None = None,
) -> Path:
    """The training run of :func:`finetune` (:class:`synthvox.train.runner.Runner` around
    :class:`_Finetuning`), writing into the prepared folder ``out``; then the model directory.

    ``deadline`` (a ``time.perf_counter()`` value) is the end of a minutes budget: at every check the
    remaining steps are planned again from the pace so far (a busy machine slows down after the
    calibration), so the cosine schedule still ends at the budget."""
    n_classes = len(label_ids)
    c_feat = feature_channels(backbone, device)
    with torch.random.fork_rng(devices=[]):  # the head's initialisation from the seed, global RNG untouched
        torch.manual_seed(cfg.seed)
        net = SegmentationNet(backbone, c_feat, n_classes).to(device)
    if cfg.head_init == "probe" and latest is None:  # a resumed run loads its head from the checkpoint
        init_head_by_probe(net.head, net.backbone, [s.image for s in subjects], [s.classes for s in subjects],
                           cfg.seed, cfg.patch_size)
    compat = _compat_key(cfg, label_ids, train_spacing)
    # training volumes held out in turn change which subject each step draws from
    compat["held_out_in_turn"] = [plan.val_every, plan.window] if plan.kind == "left out in turn" else None
    if pseudo is not None:  # which volumes each step draws from, and their labels and weights
        compat["pseudo"] = {"names": list(pseudo.names), "labelled_every": pseudo.labelled_every,
                            "min_confidence": pseudo.min_confidence, "digest": _subjects_digest(pseudo_subjects)}
    task = _Finetuning(net, cfg, subjects, plan, label_ids, compat, device, deadline, pseudo, list(pseudo_subjects))
    run = Runner(task, out, task.opt, task.lr, cfg.steps, LOG_FIELDS, cfg.checkpoint_every, cfg.keep_checkpoints,
                 "finetune", progress=progress)
    run.restore(latest)

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
        label_volumes_ml=dict(label_volumes or {}),
    )
    if pseudo is not None:
        meta.train["n_pseudo"] = len(pseudo_subjects)
        meta.train["pseudo_labels"] = {
            **pseudo.record,
            "scans": list(pseudo.names),
            "min_confidence": pseudo.min_confidence,
            "labelled_every": pseudo.labelled_every,
            "loss_weights": f"labelled voxels 1; pseudo-labelled voxels their confidence, 0 below {pseudo.min_confidence:g}, "
                            "in both the cross-entropy and the Dice sums",
            "draws": f"steps 0, {pseudo.labelled_every}, {2 * pseudo.labelled_every}, ... from the labelled pairs, "
                     "the others from the pseudo-labelled scans" if pseudo.labelled_every > 1 else
                     "every step from the labelled pairs",
            "checks": "the checks score the labelled pairs only: pseudo-labels are not ground truth",
        }
    write_json(out / "finetune.json", {"finetune": cfg.to_json(), "label_ids": label_ids, "spacing": meta.spacing})

    task.train_mode()
    task.t0 = time.perf_counter()
    result = run.run()
    if result.signal is not None:  # SIGTERM or Ctrl-C: the checkpoint is written, the model is not
        print(f"finetune: stopped by signal {result.signal} at step {result.step}; continue with --resume",
              file=sys.stderr)
        if result.signal == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + result.signal)

    cfg = task.cfg
    meta.train["steps"] = cfg.steps  # a minutes budget may have planned again along the way
    meta.history = {
        "steps": result.step,
        "final_loss": task.last_loss,
        "last_val_dice": task.last_val,
        "best_val_dice": task.best,
        "val_source": plan.summary,
        "val_kind": plan.kind,
        "val_held_out": plan.held_out,
        "val_dice_name": plan.dice_name,
        "last_val_on": task.last_on,
        "seconds_this_run": round(time.perf_counter() - task.t0, 2),
        "stopped": result.stopped,
    }
    net.eval()
    save_model_dir(net, meta, out)
    return out


class _Finetuning(Task):
    """Finetuning's part of a run (:class:`synthvox.train.runner.Task`): a Dice + cross-entropy step on
    the patches of step ``i``, a log row every step, the held-out check every ``val_every`` steps (with
    a minutes budget: the remaining steps planned again there, and the run stopped once it overruns),
    the best and last check in the checkpoints."""

    kind = "finetune"

    def __init__(self, net: SegmentationNet, cfg: FinetuneConfig, subjects: list[Subject], plan: ValidationPlan,
                 label_ids: list[int], compat: dict[str, Any], device: torch.device, deadline: float | None,
                 pseudo: PseudoLabels | None = None, pseudo_subjects: list[Subject] | None = None) -> None:
        self.net, self.cfg, self.subjects, self.plan, self.compat = net, cfg, subjects, plan, compat
        self.device, self.deadline = device, deadline
        self.pseudo, self.pseudo_subjects = pseudo, pseudo_subjects or []
        self.n_classes, self.has_background = len(label_ids), label_ids[0] == 0
        self.params = trainable_parameters(net, cfg.train)
        self.opt = make_optimizer(net, self.params, cfg)
        self.loss_fn = make_loss(cfg, self.has_background, weighted=pseudo is not None)
        self.frozen_backbone = cfg.train == "head"
        self.best, self.last_val, self.last_on, self.last_loss = float("nan"), float("nan"), "", float("nan")
        self.t0 = time.perf_counter()
        self.start = 0

    def lr(self, step: int) -> float:
        return lr_at(step, self.cfg)

    def train_mode(self) -> None:
        self.net.train()
        if self.frozen_backbone:
            self.net.backbone.eval()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"model.{k}": v for k, v in self.net.state_dict().items()}

    def state(self) -> dict[str, Any]:
        return {"compat": self.compat, "best_val_dice": self.best, "last_val_dice": self.last_val,
                "last_val_on": self.last_on, "config": self.cfg.to_json(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def load(self, path: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        state = _checked_state(path, state)
        if state["compat"] != self.compat:
            raise InputError(
                f"--resume: the checkpoint in {path.parent.parent} was made with different settings or data "
                f"({_diff(state['compat'], self.compat)}); use another --out or drop --resume"
            )
        model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            self.net.load_state_dict(model_sd)
        except RuntimeError as exc:
            raise InputError(f"checkpoint {path} does not fit this model: {str(exc).splitlines()[0]}") from None
        self.start = int(state["step"])
        self.best = float(state.get("best_val_dice", float("nan")))
        self.last_val = float(state.get("last_val_dice", float("nan")))
        self.last_on = str(state.get("last_val_on", ""))

    def step(self, step: int, lr: float, run: Runner) -> dict[str, Any]:
        cfg, plan = self.cfg, self.plan
        if self.pseudo is not None and not self.pseudo.labelled_step(step):
            x, y, w = draw_weighted_batch(self.pseudo_subjects, cfg, step, self.device)
        else:
            (x, y), w = draw_batch(self.subjects, cfg, step, self.device, plan.left_out(step)), None
        self.last_loss = optimisation_step(self.net, self.opt, self.loss_fn, self.params, x, y,
                                           frozen_backbone=self.frozen_backbone, weight=w)
        done = step + 1
        row: dict[str, Any] = {"step": done, "loss": f"{self.last_loss:.5f}", "lr": f"{lr:.3e}", "val_dice": "",
                               "seconds": f"{time.perf_counter() - self.t0:.2f}"}
        if done % cfg.val_every == 0 or done == cfg.steps:
            scored, self.last_on = plan.at(done)
            self.last_val = validate(self.net, scored, cfg, self.device, self.n_classes, self.has_background)
            self.train_mode()
            self.best = self.last_val if not (self.best >= self.last_val) else self.best
            row["val_dice"], row["val_on"] = f"{self.last_val:.4f}", self.last_on
            run.say(f"step {done}: loss {self.last_loss:.4f}, {plan.dice_name} {self.last_val:.4f} ({self.last_on})")
            if self.deadline is not None and done < cfg.steps:
                pace = (time.perf_counter() - self.t0) / max(1, done - self.start)
                planned = done + max(1, int((self.deadline - time.perf_counter()) / pace))
                if planned < cfg.steps * 0.98 or planned > cfg.steps * 1.02:
                    self.cfg = dataclasses.replace(cfg, steps=planned)
                    run.replan(planned)
                    run.say(f"step {done}: {planned} steps fit the budget at {pace:.2f} s per step")
        run.show(loss=f"{self.last_loss:.3f}", dice=f"{self.last_val:.3f}")
        cfg = self.cfg
        if cfg.minutes is not None and time.perf_counter() - self.t0 > cfg.minutes * 60.0 * BUDGET_SLACK:
            run.stop_after_step(f"stopped at the {cfg.minutes:g}-minute budget after {done} of {cfg.steps} steps")
        return row


def _subjects_digest(subjects: Sequence[Subject]) -> str:
    """A sha256 of the volumes' classes and weights (what a resumed run must train on again)."""
    import hashlib

    h = hashlib.sha256()
    for sub in subjects:
        for t in (sub.classes, sub.weight):
            if t is not None:
                h.update(str(tuple(t.shape)).encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(f"{k}: {a.get(k)} vs {b.get(k)}" for k in keys[:3]) or "unknown"
