"""Training checkpoints: one safetensors file per checkpoint, tensors + JSON state, written atomically.

Pretraining and finetuning write the same format; a tag of the kind (:data:`FORMATS`) keeps one
from resuming the other's run. A checkpoint ``RUN/checkpoints/step_00001000.safetensors`` holds

* tensors ``model.<name>`` (the network: the UNet, or for finetuning the UNet and its head),
  ``heads.<name>`` (pretraining's projection heads) and, unless stripped,
  ``optim.<param index>.<key>`` (AdamW moments and step counts);
* metadata ``state``: JSON with the step, the resolved config, the optimizer's parameter groups,
  what the kind of run needs to continue (samples seen, skipped steps; validation scores, ...),
  and ``sha256``: a digest of all tensor bytes.

It is written to a temporary file beside the target, flushed to disk and renamed into place, so a
process killed mid-write leaves the previous checkpoints intact and at worst a stray temporary file
(ignored, and removed by the next save). Nothing is pickled; the digest catches truncation or damage
that safetensors' own header checks would miss.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from synthvox.errors import InputError

FORMAT = "synthvox-pretrain-checkpoint"
#: The format tag of each kind of run's checkpoints.
FORMATS = {"pretrain": FORMAT, "finetune": "synthvox-finetune-checkpoint"}
FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d{8,})\.safetensors$")


def checkpoint_name(step: int) -> str:
    """File name of the checkpoint after ``step`` optimisation steps."""
    return f"step_{int(step):08d}.safetensors"


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors`` (sorted by name)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten an optimizer's state into tensors plus JSON (parameter groups and scalar state)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = val.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[key] = val
    groups = json.loads(json.dumps(sd["param_groups"], default=lambda o: list(o) if isinstance(o, tuple) else str(o)))
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore an optimizer from :func:`optimizer_tensors` output.

    Raises:
        InputError: the saved state does not fit this optimizer.
    """
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        if not name.startswith("optim."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for idx, d in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(d)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    device = next((p.device for grp in opt.param_groups for p in grp["params"]), torch.device("cpu"))
    for st in state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and k != "step":
                st[k] = v.to(device)
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as exc:
        raise InputError(f"optimizer state in the checkpoint does not fit this run: {' '.join(str(exc).split())[:200]}") from None


def _format(kind: str) -> str:
    if kind not in FORMATS:
        raise ValueError(f"unknown kind of checkpoint {kind!r} (one of {', '.join(FORMATS)})")
    return FORMATS[kind]


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], state: dict[str, Any], kind: str = "pretrain") -> Path:
    """Write ``tensors`` and JSON ``state`` atomically (temporary file, fsync, rename), tagged as ``kind``."""
    from safetensors.torch import save_file

    fmt = _format(kind)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = dict(state, format=fmt, version=FORMAT_VERSION, sha256=tensors_digest(cpu))
    tmp = p.parent / f".{p.name}.{os.getpid()}.tmp"
    try:
        save_file(cpu, str(tmp), metadata={"format": fmt, "state": json.dumps(meta)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, p)
        try:  # make the rename itself durable
            fd = os.open(p.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass
    finally:
        if tmp.exists():
            tmp.unlink()
    return p


def load_checkpoint(
    path: str | os.PathLike, device: torch.device | str = "cpu", kind: str = "pretrain"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a checkpoint of a ``kind`` run (``"pretrain"`` or ``"finetune"``).

    Returns:
        The tensors (on ``device``) and the JSON state.

    Raises:
        InputError: missing, truncated, corrupt or foreign file.
    """
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise InputError(f"checkpoint not found: {p}")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"checkpoint {p} is truncated or corrupt ({' '.join(str(exc).split())[:120] or type(exc).__name__})") from None
    fmt = _format(kind)
    if meta.get("format") != fmt or "state" not in meta:
        raise InputError(f"{p} is not a synthvox {'pretraining' if kind == 'pretrain' else 'finetuning'} checkpoint")
    try:
        state = json.loads(meta["state"])
    except json.JSONDecodeError:
        raise InputError(f"checkpoint {p} is corrupt (unreadable state)") from None
    if not isinstance(state, dict) or not isinstance(state.get("version", 0), int):
        raise InputError(f"checkpoint {p} is corrupt (its state is not a record of the expected form)")
    if int(state.get("version", 0)) > FORMAT_VERSION:
        raise InputError(f"checkpoint {p} was written by a newer synthvox (format version {state.get('version')})")
    if state.get("sha256") != tensors_digest(tensors):
        raise InputError(f"checkpoint {p} is corrupt (checksum mismatch)")
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, state


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoints in ``folder``, oldest first (temporary files ignored)."""
    d = Path(folder)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def prune_checkpoints(folder: str | os.PathLike, keep: int) -> None:
    """Keep the ``keep`` newest checkpoints in ``folder`` and remove stray temporary files."""
    d = Path(folder)
    for _, p in list_checkpoints(d)[: -int(keep) if keep > 0 else None]:
        p.unlink(missing_ok=True)
    if d.is_dir():
        for p in d.glob(".step_*.tmp"):
            try:
                pid = int(p.name.rsplit(".", 2)[-2])
            except ValueError:
                pid = -1
            if pid != os.getpid():
                p.unlink(missing_ok=True)


def load_latest(
    folder: str | os.PathLike, device: torch.device | str = "cpu", kind: str = "pretrain"
) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest intact checkpoint in ``folder``; damaged newer ones are skipped with a warning.

    Returns:
        ``(path, tensors, state)``, or ``None`` when the folder holds no checkpoint.

    Raises:
        InputError: checkpoints exist but none is intact.
    """
    found = list_checkpoints(folder)
    if not found:
        return None
    errors = []
    for _, p in reversed(found):
        try:
            tensors, state = load_checkpoint(p, device, kind)
        except InputError as exc:
            errors.append(str(exc))
            continue
        if errors:
            warnings.warn(f"skipped damaged checkpoint(s), resuming from {p.name}: {'; '.join(errors)}", stacklevel=2)
        return p, tensors, state
    raise InputError(f"no intact checkpoint in {folder}: {errors[0]}")


def strip_optimizer(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a checkpoint without its optimizer state (network and heads, step, config: about 1/3 the size).

    Resuming from such a file restarts AdamW with a short warm-up, at the saved step.
    """
    tensors, state = load_checkpoint(src)
    tensors = {k: v for k, v in tensors.items() if not k.startswith("optim.")}
    state = {k: v for k, v in state.items() if k not in ("optimizer", "sha256", "format", "version")}
    return save_checkpoint(dst, tensors, state)


def checkpoint_network(tensors: dict[str, torch.Tensor], state: dict[str, Any], bn_batches: int = 0) -> Any:
    """The UNet a pretraining checkpoint holds (its ``model.`` tensors), rebuilt from the saved config, float32.

    With ``bn_batches`` and batch normalisation in the network, its running statistics are
    re-estimated on that many batches of the run's synthetic views (:mod:`synthvox.train.batchnorm`);
    the network then records the count as ``net.bn_batches``.
    """
    from synthvox.models.blocks import has_batchnorm
    from synthvox.models.unet import UNet
    from synthvox.train.batchnorm import recalibrate, synthetic_views
    from synthvox.train.config import ModelConfig, from_dict, model_kwargs

    net = UNet(**model_kwargs(from_dict(ModelConfig, state["config"]["model"])))
    net.load_state_dict({k[6:]: v.float() for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    net.bn_batches = recalibrate(net, synthetic_views(state["config"], bn_batches)) if bn_batches and has_batchnorm(net) else 0
    return net.eval()


def checkpoint_card(state: dict[str, Any], hardware: str | None = None, bn_batches: int = 0) -> dict[str, Any]:
    """The model card of a pretraining checkpoint's network: steps, samples, the data, loss and optim
    settings (registration reads its training scale from ``data``), torch version, time, hardware."""
    cfg = state.get("config", {})
    return {
        "training_steps": int(state["step"]),
        "samples_seen": int(state.get("samples_seen", 0)),
        "skipped_steps": int(state.get("skipped", 0)),
        "batch_pairs": cfg.get("batch_pairs"),
        "data": cfg.get("data"),
        "loss": cfg.get("loss"),
        "optim": cfg.get("optim"),
        "seed": cfg.get("seed"),
        "torch": state.get("torch"),
        "time": state.get("time"),
        "hardware": hardware,
        "batchnorm_recalibrated_on": int(bn_batches),
    }
