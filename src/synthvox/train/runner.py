"""The training runner shared by pretraining and finetuning: one loop around a task's step.

The runner owns what every training run needs, once:

* the step counter (``run.step``; ``run.start`` where this call began) and the loop's end;
* the learning rate: ``schedule(step)`` (:func:`synthvox.train.schedule.warmup_decay` behind it)
  set on every parameter group before each step, times the group's ``lr_factor`` when it has one;
* the run log (:class:`~synthvox.train.rundir.RunLog`: the rows the task returns, cut back to the
  checkpoint on resume);
* checkpoints (:mod:`synthvox.train.checkpointing`, tagged with the task's kind): every
  ``checkpoint_every`` steps and at the end, the newest ``keep`` kept; the optimizer's state beside the
  task's tensors and JSON state;
* resume: the task's network and state, the optimizer's state and the step from a checkpoint;
* the stop signal: SIGTERM or a first Ctrl-C ends the run after the step in progress, with a
  checkpoint (a second Ctrl-C stops at once);
* clean-up: :func:`run_folder` prepares the run folder and removes what a run that fails before its
  first checkpoint wrote;
* the progress bar.

A task (:class:`Task`: pretraining's contrastive step, finetuning's segmentation step) supplies one
optimisation step and its log row, its tensors and its extra state (samples seen; validation
scores, ...), and what it checks along the way (finetuning's held-out checks, which may plan the
remaining steps again with :meth:`Runner.replan` or end the run with :meth:`Runner.stop_after_step`).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from synthvox.train.checkpointing import (
    checkpoint_name,
    list_checkpoints,
    load_optimizer,
    optimizer_tensors,
    prune_checkpoints,
    save_checkpoint,
)
from synthvox.train.rundir import RunLog, prepare_run_dir

CHECKPOINT_DIR = "checkpoints"
LOG_NAME = "log.csv"


class Task:
    """What a kind of training supplies to the :class:`Runner` (subclass it)."""

    #: The checkpoint format tag (:data:`synthvox.train.checkpointing.FORMATS`).
    kind: str = "pretrain"

    def step(self, step: int, lr: float, run: Runner) -> Mapping[str, Any] | Sequence[Any] | None:
        """Take optimisation step ``step`` (0-based) at learning rate ``lr``; return its log row, or
        ``None`` for a step that is not logged. ``run.step`` is still ``step`` here."""
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint keeps besides the optimizer's (``model.*``, ...)."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """The JSON state a checkpoint keeps besides the step and the optimizer's (config, scores...)."""
        raise NotImplementedError

    def load(self, path: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Restore the network and the extra state from a checkpoint (checked: raise InputError)."""
        raise NotImplementedError

    def without_optimizer(self, path: Path, step: int) -> None:
        """A checkpoint without optimizer state was restored (AdamW starts afresh at ``step``)."""


@dataclass
class RunResult:
    """What :meth:`Runner.run` did."""

    step: int
    start: int
    checkpoint: Path | None
    signal: int | None
    stopped: str  # why the run ended before its end ("" when it did not)


class StopFlag:
    """Set by SIGTERM/SIGINT while installed (main thread only); the runner checkpoints and stops."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopFlag]:
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


@contextlib.contextmanager
def run_folder(out: Path, entries: Sequence[str], resume: bool, force: bool, what: str = "a run",
               writer: bool = True) -> Iterator[Path]:
    """Prepare the run folder ``out`` (:func:`~synthvox.train.rundir.prepare_run_dir`) and, when the block
    fails (an error, Ctrl-C, SIGTERM) before a checkpoint exists, remove what it wrote there (and the
    folder when this call made it), so the next run does not find a "run" that blocks it.
    ``writer=False`` (a DDP rank other than 0): neither prepares nor cleans."""
    from synthvox.io import cleanup_on_failure

    out = Path(out)
    with cleanup_on_failure(out, keep=lambda: not writer or bool(list_checkpoints(out / CHECKPOINT_DIR))):
        if writer:
            prepare_run_dir(out, entries, resume, force, what)
        yield out


class Runner:
    """The loop of a training run in the folder ``out`` (see the module docstring).

    Args:
        task: the kind of training.
        out: the run folder (``checkpoints/``, ``log.csv``).
        optimizer: the optimizer whose state the checkpoints keep and whose rate the schedule sets.
        schedule: the learning rate of a step (read at every step, so it may follow a replanned run).
        total: the run's steps (the progress bar's length; the loop's end unless :meth:`run` gets one).
        log_fields: the log's columns.
        checkpoint_every: steps between checkpoints (one is also written at the end).
        keep: checkpoints kept.
        desc: the progress bar's label.
        progress: show a progress bar.
        writer: write the log and checkpoints (DDP: rank 0 only).
        any_stop: combines the stop flags of all processes (DDP: ``any_flag``); called at every step.
    """

    def __init__(self, task: Task, out: Path, optimizer: torch.optim.Optimizer, schedule: Callable[[int], float],
                 total: int, log_fields: Sequence[str], checkpoint_every: int, keep: int, desc: str,
                 progress: bool = True, writer: bool = True, any_stop: Callable[[bool], bool] | None = None) -> None:
        self.task, self.out, self.optimizer, self.schedule = task, Path(out), optimizer, schedule
        self.total = self.end = int(total)
        self.log_fields, self.checkpoint_every, self.keep = list(log_fields), int(checkpoint_every), int(keep)
        self.desc, self.progress, self.writer = desc, progress, writer
        self.any_stop = any_stop or (lambda flag: flag)
        self.step = self.start = 0
        self.restored = False
        self._bar: Any = None
        self._stop_reason = ""

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / CHECKPOINT_DIR

    # -- resume ------------------------------------------------------------------------------------

    def restore(self, latest: tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None) -> bool:
        """Continue from a checkpoint (:func:`~synthvox.train.checkpointing.load_latest`'s answer; ``None``:
        start at step 0): the task's network and state, the optimizer's state, the step. Returns whether
        the optimizer's state was restored (a stripped checkpoint has none: the task is told)."""
        if latest is None:
            return False
        path, tensors, state = latest
        self.task.load(path, tensors, state)
        self.step = self.start = int(state["step"])
        self.restored = True
        if isinstance(state.get("optimizer"), dict) and any(k.startswith("optim.") for k in tensors):
            load_optimizer(self.optimizer, tensors, state["optimizer"])
            return True
        self.task.without_optimizer(path, self.step)
        return False

    # -- what a task may call during its step --------------------------------------------------------

    def say(self, line: str) -> None:
        """A line above the progress bar (``tqdm.write``: printed with or without the bar)."""
        from tqdm.auto import tqdm

        if self.writer:
            tqdm.write(line)

    def show(self, **values: Any) -> None:
        """Figures beside the progress bar."""
        if self._bar is not None:
            self._bar.set_postfix(**values, refresh=False)

    def replan(self, total: int) -> None:
        """The run now ends after ``total`` steps (a minutes budget planning again)."""
        self.total = self.end = int(total)
        if self._bar is not None:
            self._bar.total = self.total

    def stop_after_step(self, reason: str) -> None:
        """End the run after the step in progress (with a checkpoint), saying why."""
        self._stop_reason = reason

    # -- checkpoints ---------------------------------------------------------------------------------

    def save(self) -> Path | None:
        """A checkpoint at the current step (the task's tensors and state, the optimizer's), then the
        older ones pruned to ``keep``; ``None`` on a process that does not write."""
        if not self.writer:
            return None
        tensors = dict(self.task.tensors())
        opt_tensors, opt_meta = optimizer_tensors(self.optimizer)
        tensors.update(opt_tensors)
        state = {"step": self.step, **self.task.state(), "optimizer": opt_meta}
        path = save_checkpoint(self.checkpoint_dir / checkpoint_name(self.step), tensors, state, kind=self.task.kind)
        prune_checkpoints(self.checkpoint_dir, max(1, self.keep))
        return path

    # -- the loop ------------------------------------------------------------------------------------

    def run(self, end: int | None = None) -> RunResult:
        """Train from ``self.step`` to ``end`` (default: the run's ``total``), or until a signal or the task
        stops it; the last step gets a checkpoint."""
        from tqdm.auto import tqdm

        if end is not None:
            self.end = int(end)
        log = RunLog(self.out / LOG_NAME, self.log_fields, self.start if self.restored else None) if self.writer else None
        self._bar = tqdm(total=self.total, initial=self.start, desc=self.desc, unit="step", dynamic_ncols=True,
                         file=sys.stderr, mininterval=1.0, disable=not (self.progress and self.writer))
        stop = StopFlag()
        last: Path | None = None
        try:
            with stop.installed():
                while self.step < self.end:
                    if self.any_stop(stop.signum is not None):
                        break
                    lr = self.schedule(self.step)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr * group.get("lr_factor", 1.0)
                    row = self.task.step(self.step, lr, self)
                    self.step += 1
                    self._bar.update(1)
                    if row is not None and log is not None:
                        log.append(row)
                    if self._stop_reason and self.step < self.end:
                        self.say(self._stop_reason)
                        break
                    self._stop_reason = ""
                    if self.step % self.checkpoint_every == 0 and self.step < self.end:
                        last = self.save() or last
                saved = list_checkpoints(self.checkpoint_dir)
                if not saved or saved[-1][0] != self.step:
                    last = self.save() or last
                elif self.writer:
                    last = saved[-1][1]
        finally:
            self._bar.close()
            self._bar = None
            if log is not None:
                log.close()
        signum = stop.signum if stop.signum is not None and self.step < self.end else None
        return RunResult(self.step, self.start, last, signum, self._stop_reason)
