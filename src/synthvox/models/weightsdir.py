"""The feature network's self-describing weights directory (``--weights DIR``, the shipped default):
``model.safetensors`` + ``config.json``; loading never unpickles. (Resumable training checkpoints are
:mod:`synthvox.train.checkpointing`; a finetuned segmentation model's directory is
:mod:`synthvox.segmentation.modeldir`.)

Layout of a weights directory::

    config.json          # {"format": "synthvox-unet", "version": 1, "architecture": {UNet kwargs},
                         #  "dtype": "float32"|"float16", "sha256": <of model.safetensors>,
                         #  "n_parameters": ..., "extra": {...}}
    model.safetensors    # the UNet's state dict

``config.json`` is written last, each file atomically, so a directory with a config is complete; the
checksum catches a weights file that was truncated or altered afterwards.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from synthvox.errors import InputError
from synthvox.models.unet import UNet, count_parameters

FORMAT = "synthvox-unet"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def save_model(model: nn.Module, path: str | os.PathLike, extra: dict[str, Any] | None = None, half: bool = False) -> Path:
    """Write ``model`` (a :class:`UNet`, possibly wrapped) as a model directory.

    Args:
        model: the network.
        path: the directory (created if needed; existing files in it are replaced).
        extra: JSON-serialisable information stored under ``"extra"`` in ``config.json`` (training
            steps, data engine settings, ...).
        half: store the weights as float16 (about half the size; loading casts back to float32).

    Returns:
        The directory.
    """
    from safetensors.torch import save_file

    from synthvox.files import atomic_path

    net = _unwrap(model)
    if not isinstance(net, UNet):
        raise TypeError(f"save_model expects a UNet, got {type(net).__name__}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if half else torch.float32
    tensors = {}
    for k, v in net.state_dict().items():
        v = v.detach().cpu()
        tensors[k] = (v.to(dtype) if v.is_floating_point() else v).contiguous()
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
        digest = file_sha256(tmp)
    config = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "architecture": net.config(),
        "dtype": "float16" if half else "float32",
        "n_parameters": count_parameters(net),
        "sha256": digest,
        "extra": json.loads(json.dumps(extra or {}, default=str)),
    }
    with atomic_path(out / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return out


def card_in(config: dict[str, Any]) -> dict[str, Any]:
    """The model card in a model directory's parsed ``config.json`` (``extra.model_card``; empty when absent)."""
    extra = config.get("extra") if isinstance(config.get("extra"), dict) else {}
    card = extra.get("model_card")
    return card if isinstance(card, dict) else {}


def read_model_config(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """Locate and read a model directory's ``config.json``.

    Args:
        path: the directory, or its ``model.safetensors`` / ``config.json``.

    Returns:
        The directory and the parsed config.

    Raises:
        InputError: missing directory or file, unreadable or foreign config.
    """
    p = Path(path)
    if p.is_file() and p.name in (WEIGHTS_NAME, CONFIG_NAME):
        p = p.parent
    if not p.exists():
        raise InputError(f"model not found: {p}")
    if not p.is_dir():
        raise InputError(f"not a synthvox model directory (expected a folder with {CONFIG_NAME} and {WEIGHTS_NAME}): {p}")
    cfg_path = p / CONFIG_NAME
    if not cfg_path.is_file():
        raise InputError(f"not a synthvox model directory (no {CONFIG_NAME}): {p}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {cfg_path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise InputError(f"{cfg_path} does not describe a synthvox UNet (format tag {cfg.get('format') if isinstance(cfg, dict) else None!r})")
    version = cfg.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InputError(f"{cfg_path} has an invalid format version {version!r:.40}")
    if version > FORMAT_VERSION:
        raise InputError(f"model {p} was written by a newer synthvox (format version {version})")
    for key, kind, name in (("architecture", dict, "a JSON object"), ("extra", dict, "a JSON object"),
                            ("sha256", str, "a hex string"), ("dtype", str, "a string")):
        if key in cfg and not isinstance(cfg[key], kind):
            raise InputError(f"{cfg_path}: {key!r} must be {name}, got {cfg[key]!r:.60}")
    return p, cfg


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> UNet:
    """Load a model directory written by :func:`save_model` (safetensors only; nothing is unpickled).

    Args:
        path: the directory (or its ``model.safetensors`` / ``config.json``).
        device: where to put the network.

    Returns:
        The UNet in eval mode, float32, on ``device``; its ``model_card`` attribute holds the card of
        ``config.json`` (empty when absent), so that what it says travels with the network.

    Raises:
        InputError: missing, truncated or corrupt files, or weights that do not fit the config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p, cfg = read_model_config(path)
    weights = p / WEIGHTS_NAME
    if not weights.is_file():
        raise InputError(f"model directory {p} has no {WEIGHTS_NAME}")
    arch = cfg.get("architecture")
    if not isinstance(arch, dict):
        raise InputError(f"{p / CONFIG_NAME} has no architecture description")
    _check_architecture(arch, p / CONFIG_NAME)
    try:
        net = UNet(**arch)
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError, OverflowError) as exc:
        raise InputError(f"{p / CONFIG_NAME} describes an invalid network: {' '.join(str(exc).split())[:200]}") from None
    expected = cfg.get("sha256")
    if expected and file_sha256(weights) != expected:
        raise InputError(f"{weights} is corrupt or truncated (checksum mismatch with {CONFIG_NAME})")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"cannot read {weights}: {str(exc).splitlines()[0] if str(exc) else 'corrupt file'}") from None
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        msg = " ".join(str(exc).split())
        raise InputError(f"weights in {weights} do not match its {CONFIG_NAME}: {msg[:300]}") from None
    net.model_card = card_in(cfg)
    return net.to(device).eval()


def _check_architecture(arch: dict[str, Any], where: Path) -> None:
    """Refuse architecture values of the wrong JSON type before they reach the UNet's constructor.

    Sizes must be whole numbers in a sane range (a channel count of 10**9 would try to allocate
    terabytes: at most 1024 channels and 8 levels), names must be strings, switches booleans.
    """
    import inspect

    params = inspect.signature(UNet.__init__).parameters
    unknown = sorted(k for k in arch if k not in params or k == "self")
    if unknown:
        raise InputError(f"{where} describes an invalid network: unknown architecture keys {unknown}")
    for key, value in arch.items():
        default = params[key].default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= (8 if key == "levels" else 1024)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            ok = value is None or isinstance(value, (str, int, float, bool, list))
        if not ok:
            raise InputError(f"{where} describes an invalid network: {key!r} = {value!r:.40} is of the wrong type or size")


def weights_dir() -> Path:
    """Folder of the weights shipped inside the package."""
    return Path(__file__).resolve().parents[1] / "data" / "weights"


def default_weights_path() -> Path | None:
    """The shipped default model directory, or ``None`` while no weights ship with the package."""
    d = weights_dir() / "default"
    return d if (d / CONFIG_NAME).is_file() and (d / WEIGHTS_NAME).is_file() else None


def load_default_model(device: torch.device | str = "cpu") -> UNet:
    """Load the shipped default weights.

    Raises:
        InputError: no default weights ship with this version.
    """
    p = default_weights_path()
    if p is None:
        raise InputError(
            "no pretrained default weights ship with this version of synthvox yet; pass a model directory "
            "written by 'synthvox pretrain' (RUN/model) with --weights"
        )
    return load_model(p, device)
