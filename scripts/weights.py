"""Move pretraining state between runs and into the package (issue 6).

Three steps, each one command::

    # put the repository's carry-over file into a run folder, so `synthvox pretrain --resume` starts from it
    python scripts/weights.py install training/carry.safetensors RUN

    # after training: the run's newest checkpoint -> a new carry-over file (network + projection heads
    # in float32, step count, samples seen, config; no optimizer state) and a half-precision model dir
    python scripts/weights.py export RUN [--step N] --carry training/carry.safetensors --model src/synthvox/data/weights/default

    # describe a carry-over file or a run (step, samples seen, config)
    python scripts/weights.py info training/carry.safetensors

The carry-over file is one file, replaced at every run (not a new file per run). Files over 15 MiB can
be split for the GPU machine's 16 MiB limit on returned files with ``split`` and joined with ``join``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

CHUNK = 15 * 1024 * 1024


def _state(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from synthvox.train.checkpointing import load_checkpoint

    return load_checkpoint(path)


def install(carry: Path, run: Path) -> Path:
    """Copy ``carry`` into ``run/checkpoints`` under the name of its step (the newest checkpoint there)."""
    from synthvox.train.checkpointing import checkpoint_name, list_checkpoints

    _, state = _state(carry)
    step = int(state["step"])
    ckpt = run / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    newer = [s for s, _ in list_checkpoints(ckpt) if s >= step]
    if newer:
        print(f"{ckpt} already has a checkpoint at step {max(newer)} >= {step}: left as is")
        return ckpt
    dst = ckpt / checkpoint_name(step)
    shutil.copyfile(carry, dst)
    print(f"installed {carry} (step {step}, {state.get('samples_seen', '?')} samples) as {dst}")
    return dst


def export(run: Path, carry: Path | None, model: Path | None, hardware: str | None, step: int | None = None,
           bn_batches: int | None = None) -> None:
    """Newest intact checkpoint of ``run`` (or the one of ``step``) -> carry-over file and/or half-precision
    model directory (a batch-normalised network's statistics re-estimated on ``bn_batches`` synthetic batches)."""
    import torch

    from synthvox.errors import InputError
    from synthvox.models import save_model
    from synthvox.train.checkpointing import (
        checkpoint_card,
        checkpoint_network,
        list_checkpoints,
        load_checkpoint,
        load_latest,
        strip_optimizer,
    )

    if step is None:
        latest = load_latest(run / "checkpoints")
        if latest is None:
            sys.exit(f"error: no checkpoint in {run / 'checkpoints'}")
        path, tensors, state = latest
    else:
        found = dict(list_checkpoints(run / "checkpoints"))
        if step not in found:
            sys.exit(f"error: no checkpoint of step {step} in {run / 'checkpoints'} (it has {', '.join(map(str, found)) or 'none'})")
        path = found[step]
        try:
            tensors, state = load_checkpoint(path)
        except InputError as exc:
            sys.exit(f"error: {exc}")
    print(f"{'newest ' if step is None else ''}checkpoint: {path.name} (step {state['step']}, {state.get('samples_seen')} samples)")
    if carry is not None:
        carry.parent.mkdir(parents=True, exist_ok=True)
        tmp = carry.with_name(carry.name + ".tmp")
        strip_optimizer(path, tmp)
        tmp.chmod(0o644)
        tmp.replace(carry)
        print(f"carry-over file: {carry} ({carry.stat().st_size / 2**20:.1f} MiB)")
    if model is not None:
        from synthvox.train.batchnorm import EXPORT_BATCHES

        net = checkpoint_network(tensors, state, EXPORT_BATCHES if bn_batches is None else bn_batches)
        if net.bn_batches:
            print(f"batch-norm statistics re-estimated on {net.bn_batches} synthetic batches")
        with torch.no_grad():
            save_model(net, model, extra={"model_card": checkpoint_card(state, hardware, net.bn_batches)}, half=True)
        size = sum(f.stat().st_size for f in model.iterdir()) / 2**20
        print(f"model directory (float16): {model} ({size:.1f} MiB)")


def split(path: Path) -> list[Path]:
    """Split ``path`` into ``path.part000``, ... of at most 15 MiB each."""
    data = path.read_bytes()
    parts = []
    for i in range(0, len(data), CHUNK):
        p = path.with_name(f"{path.name}.part{i // CHUNK:03d}")
        p.write_bytes(data[i : i + CHUNK])
        parts.append(p)
    print(f"split {path} into {len(parts)} part(s)")
    return parts


def join(first_part: Path, dst: Path) -> Path:
    """Join ``X.part000``, ``X.part001``, ... (give the first) into ``dst``."""
    stem = first_part.name.rsplit(".part", 1)[0]
    parts = sorted(first_part.parent.glob(f"{stem}.part[0-9][0-9][0-9]"))
    tmp = dst.with_name(dst.name + ".tmp")
    with open(tmp, "wb") as f:
        for p in parts:
            f.write(p.read_bytes())
    _state(tmp)  # verify it is an intact checkpoint before replacing anything
    tmp.replace(dst)
    print(f"joined {len(parts)} part(s) into {dst}")
    return dst


def info(path: Path) -> None:
    from synthvox.train.checkpointing import checkpoint_card, load_latest

    if path.is_dir():
        latest = load_latest(path / "checkpoints")
        if latest is None:
            sys.exit(f"error: no checkpoint in {path / 'checkpoints'}")
        path, _, state = latest
    else:
        _, state = _state(path)
    print(json.dumps({"file": str(path), **checkpoint_card(state)}, indent=1, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("install")
    a.add_argument("carry", type=Path)
    a.add_argument("run", type=Path)
    b = sub.add_parser("export")
    b.add_argument("run", type=Path)
    b.add_argument("--carry", type=Path)
    b.add_argument("--model", type=Path)
    b.add_argument("--hardware", default=None)
    b.add_argument("--step", type=int, default=None, help="the checkpoint of this step (default: the newest)")
    b.add_argument("--bn-batches", type=int, default=None,
                   help="re-estimate batch-norm statistics on this many synthetic batches (default 64; 0: keep the training ones)")
    c = sub.add_parser("split")
    c.add_argument("path", type=Path)
    d = sub.add_parser("join")
    d.add_argument("first_part", type=Path)
    d.add_argument("dst", type=Path)
    e = sub.add_parser("info")
    e.add_argument("path", type=Path)
    args = ap.parse_args()
    if args.cmd == "install":
        install(args.carry, args.run)
    elif args.cmd == "export":
        export(args.run, args.carry, args.model, args.hardware, args.step, args.bn_batches)
    elif args.cmd == "split":
        split(args.path)
    elif args.cmd == "join":
        join(args.first_part, args.dst)
    else:
        info(args.path)


if __name__ == "__main__":
    main()
