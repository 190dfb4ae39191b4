"""Typed pretraining configuration: presets, then a YAML file, then ``key=value`` overrides.

Keys are dotted paths into :class:`PretrainConfig` (``optim.lr=1e-3``, ``data.size=64``,
``loss.layers=out,dec1``); a key that is the unique name of a field in one section may be given
without its section (``lr=1e-3``). ``data.synth.<path>=<value>`` sets a field of the data engine's
``SynthConfig`` (``data.synth.labels.n_templates=[10,20]``). Values are parsed as YAML and checked
against the field's type; unknown keys and wrong types are one-line :class:`InputError` s.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from synthvox.errors import InputError

#: The layers the method applies its loss to: two deep encoder layers, the decoder layers, the output.
DEFAULT_LAYERS = ("enc3", "bottleneck", "dec3", "dec2", "dec1", "out")


@dataclass
class ModelConfig:
    """Which network: a named variant (``synthvox.models.VARIANTS``) and optional changes to it."""

    variant: str = "default"
    norm: str | None = None
    activation: str | None = None
    padding: str | None = None


@dataclass
class DataConfig:
    """The synthetic data engine.

    Attributes:
        size: label map and view size in voxels (one int or three).
        use_bank: place templates from the shipped shape bank (else procedural shapes only).
        synth: dotted overrides of the engine's ``SynthConfig`` fields, e.g. ``{"labels.n_templates": [10, 20]}``.
    """

    size: tuple[int, int, int] = (128, 128, 128)
    use_bank: bool = True
    synth: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig:
    """The multi-layer supervised contrastive loss (see ``synthvox.losses.contrastive``).

    Attributes:
        sampling: ``uniform`` or ``balanced`` (every label an equal share of the sampled voxels).
        layer_weights: layer name -> weight (layers not named weigh 1; normalised to sum to one).
        head: projection head design, ``mlp`` or ``mlp3bn``.
    """

    temperature: float = 0.33
    n_voxels: int = 512
    layers: tuple[str, ...] = DEFAULT_LAYERS
    head_hidden: int = 256
    head_dim: int = 128
    balance: bool = False
    sampling: str = "uniform"
    layer_weights: dict[str, float] = field(default_factory=dict)
    head: str = "mlp"


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then decay to ``final_lr_ratio * lr``."""

    lr: float = 2e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = 1000
    decay: str = "cosine"
    final_lr_ratio: float = 0.05
    grad_clip: float = 1.0


@dataclass
class PretrainConfig:
    """Everything a pretraining run depends on (written to ``RUN/config.yaml``).

    Attributes:
        batch_pairs: training pairs per step and per process (each pair = two views).
        steps: total optimisation steps (the learning-rate schedule spans them).
        amp: bfloat16 autocast (CUDA only; ignored on the CPU).
        channels_last: channels-last-3d memory format (CUDA only).
        compile: ``torch.compile`` the network.
        ckpt_every: steps between checkpoints.
        keep_last: checkpoints kept in ``RUN/checkpoints`` (older ones are deleted).
        log_every: steps between rows of ``RUN/log.csv``.
        seed: base seed of the data, the voxel sampling and the initial weights.
        tensorboard: also write TensorBoard events (when tensorboard is installed).
        progress: show a progress bar.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_pairs: int = 2
    steps: int = 100_000
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    ckpt_every: int = 1000
    keep_last: int = 3
    log_every: int = 50
    seed: int = 0
    tensorboard: bool = True
    progress: bool = True


#: Presets, as dotted overrides of the defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # Trains on a CPU in about a minute: 32^3 volumes, the tiny network, a few hundred steps.
    "tiny": {
        "model.variant": "tiny",
        "data.size": [32, 32, 32],
        # templates for a 32^3 map need no 64^3 cubes; a small procedural pool warms up quickly
        "data.synth": {"labels.max_resolution": 32, "labels.procedural_pool": 64, "cube_size": 16},
        "loss.n_voxels": 256,
        "loss.head_hidden": 64,
        "loss.head_dim": 64,
        "optim.lr": 3e-3,
        "optim.warmup": 10,
        "batch_pairs": 1,
        "steps": 150,
        "ckpt_every": 50,
        "keep_last": 2,
        "log_every": 10,
    },
    # The method's setting on a GPU: 128^3, the reference-size network.
    "default": {},
    # The accumulating run on one CPU thread (scripts/cpu_accumulate.sh): the reference-size network
    # at 64^3 and 2 mm (the registration grid's spacing), voxels drawn per label, the loss weighted
    # towards the full-resolution layers (the ablation in benchmarks/README.md chose these).
    "cpu": {
        "data.size": [64, 64, 64],
        "data.synth": {"labels.fov_mm": 128.0},
        "loss.sampling": "balanced",
        "loss.layer_weights": {"enc3": 0.5, "bottleneck": 0.5, "dec3": 1.0, "dec2": 1.0, "dec1": 2.0, "out": 3.0},
        "optim.lr": 6e-4,
        "optim.warmup": 100,
        "batch_pairs": 1,
        "ckpt_every": 100,
        "keep_last": 40,
        "log_every": 10,
        "tensorboard": False,
    },
}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # unresolvable annotations: accept any value
        return {f.name: Any for f in dataclasses.fields(cls)}


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the type annotation ``tp`` and convert it (lists -> tuples, int -> float, ...).

    Raises:
        InputError: the value does not fit the type.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except InputError as exc:
                errors.append(str(exc))
        raise InputError(errors[0] if errors else f"{key}: bad value {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise InputError(f"{key} must be true or false, got {value!r}")
    if tp in (int, float) and isinstance(value, str) and _looks_numeric(value):
        value = _number(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise InputError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise InputError(f"{key} must be a string, got {value!r}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if origin is tuple and len(args) > 1 and args[-1] is not Ellipsis:
            if not isinstance(value, (list, tuple)):
                value = [value] * len(args)  # size=64 -> (64, 64, 64)
            if len(value) != len(args):
                raise InputError(f"{key} needs {len(args)} values, got {value!r}")
            return tuple(coerce(v, a, key) for v, a in zip(value, args))
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        items = [coerce(v, inner, key) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise InputError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise InputError(f"{key} must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    return value


def from_dict(cls: type, d: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (nested) mapping; unknown keys are an :class:`InputError`."""
    hints = _hints(cls)
    out = cls()
    for k, v in d.items():
        if k not in hints:
            raise InputError(f"unknown config key {prefix}{k!r}; known: {', '.join(prefix + n for n in hints)}")
        if _is_dataclass_type(hints[k]) and isinstance(v, dict):
            sub = getattr(out, k)
            for kk, vv in v.items():
                set_key(sub, kk, vv, prefix=f"{prefix}{k}.")
        else:
            setattr(out, k, coerce(v, hints[k], prefix + k))
    return out


def _leaf_index(cls: type) -> dict[str, list[str]]:
    """Field name -> dotted paths that end with it (for section-less shorthands)."""
    idx: dict[str, list[str]] = {}
    for name, tp in _hints(cls).items():
        if _is_dataclass_type(tp):
            for sub in _hints(tp):
                idx.setdefault(sub, []).append(f"{name}.{sub}")
        else:
            idx.setdefault(name, []).append(name)
    return idx


def set_key(obj: Any, key: str, value: Any, prefix: str = "") -> None:
    """Set the dotted ``key`` of dataclass instance ``obj`` (in place), checking the type.

    ``data.synth.<path>`` keys go into the ``synth`` mapping unchecked here (the engine checks them).
    """
    parts = key.split(".")
    hints = _hints(type(obj))
    if len(parts) == 1 and parts[0] not in hints and prefix == "":
        paths = _leaf_index(type(obj)).get(parts[0], [])
        if len(paths) == 1:
            parts = paths[0].split(".")
        elif len(paths) > 1:
            raise InputError(f"ambiguous config key {key!r}: say which of {', '.join(paths)}")
    head = parts[0]
    if head not in hints:
        raise InputError(f"unknown config key {prefix}{key!r}; known: {', '.join(prefix + n for n in hints)}")
    tp = hints[head]
    if len(parts) == 1:
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                raise InputError(f"config key {prefix}{head!r} is a section: set its fields ({prefix}{head}.<field>=...)")
            for k, v in value.items():
                set_key(getattr(obj, head), k, v, prefix=f"{prefix}{head}.")
            return
        setattr(obj, head, coerce(value, tp, prefix + head))
        return
    if _is_dataclass_type(tp):
        set_key(getattr(obj, head), ".".join(parts[1:]), value, prefix=f"{prefix}{head}.")
        return
    if typing.get_origin(tp) is dict or tp is dict:
        getattr(obj, head)[".".join(parts[1:])] = value
        return
    raise InputError(f"config key {prefix}{head!r} has no field {'.'.join(parts[1:])!r}")


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key=value`` strings (values as YAML: ``1e-3``, ``true``, ``[32,32,32]``)."""
    import yaml

    out = []
    for item in items:
        if "=" not in item:
            raise InputError(f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k:
            raise InputError(f"expected key=value, got {item!r}")
        try:
            val = yaml.safe_load(v) if v.strip() else ""
        except yaml.YAMLError:
            val = v
        if isinstance(val, float) or (isinstance(val, str) and _looks_numeric(val)):
            val = _number(v)
        out.append((k, val))
    return out


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _number(s: str) -> Any:
    """YAML 1.1 reads ``1e-3`` as a string; read numbers the way a user means them."""
    s = s.strip()
    try:
        return int(s)
    except ValueError:
        return float(s)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (tuples as lists), for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def config_from_dict(d: dict[str, Any]) -> PretrainConfig:
    """Rebuild a :class:`PretrainConfig` from :func:`to_dict` output (e.g. a checkpoint's)."""
    return from_dict(PretrainConfig, d)


def model_kwargs(m: ModelConfig) -> dict[str, Any]:
    """UNet constructor arguments of a model section (its variant with the given changes)."""
    from synthvox.models.registry import variant_kwargs

    return variant_kwargs(m.variant, norm=m.norm, activation=m.activation, padding_mode=m.padding)


def validate(cfg: PretrainConfig) -> PretrainConfig:
    """Check values that a type cannot express; raise a one-line :class:`InputError`."""
    from synthvox.models.registry import VARIANTS
    from synthvox.models.unet import UNet

    if cfg.model.variant not in VARIANTS:
        raise InputError(f"unknown model.variant {cfg.model.variant!r}: use one of {', '.join(VARIANTS)}")
    try:
        net = UNet(**model_kwargs(cfg.model))
    except ValueError as exc:
        raise InputError(f"bad model config: {exc}") from None
    bad = [name for name in cfg.loss.layers if name not in net.layer_names()]
    if bad or not cfg.loss.layers:
        raise InputError(f"loss.layers must name layers of the network ({', '.join(net.layer_names())}); got {list(cfg.loss.layers)}")
    from synthvox.losses.contrastive import HEADS, SAMPLING

    extra = [k for k in cfg.loss.layer_weights if k not in cfg.loss.layers]
    if extra:
        raise InputError(f"loss.layer_weights names layers that loss.layers does not use: {', '.join(map(str, extra))}")
    for k, v in list(cfg.loss.layer_weights.items()):
        cfg.loss.layer_weights[k] = coerce(v, float, f"loss.layer_weights.{k}")
        if cfg.loss.layer_weights[k] < 0:
            raise InputError(f"loss.layer_weights.{k} must be >= 0")
    if cfg.loss.layer_weights and sum(cfg.loss.layer_weights.get(k, 1.0) for k in cfg.loss.layers) <= 0:
        raise InputError("loss.layer_weights must give some layer a positive weight")
    if cfg.loss.sampling not in SAMPLING:
        raise InputError(f"loss.sampling must be one of {', '.join(SAMPLING)}, got {cfg.loss.sampling!r}")
    if cfg.loss.head not in HEADS:
        raise InputError(f"loss.head must be one of {', '.join(HEADS)}, got {cfg.loss.head!r}")
    if len(set(cfg.loss.layers)) != len(cfg.loss.layers):
        raise InputError(f"loss.layers repeats a layer: {list(cfg.loss.layers)}")
    if min(cfg.data.size) < 8:
        raise InputError(f"data.size must be at least 8 voxels per axis, got {list(cfg.data.size)}")
    checks = [
        (cfg.loss.temperature > 0, "loss.temperature must be positive"),
        (cfg.loss.n_voxels >= 2, "loss.n_voxels must be at least 2"),
        (cfg.loss.head_hidden >= 1 and cfg.loss.head_dim >= 1, "loss.head_hidden and loss.head_dim must be positive"),
        (cfg.optim.lr > 0, "optim.lr must be positive"),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (cfg.optim.warmup >= 0, "optim.warmup must be >= 0"),
        (cfg.optim.decay in ("cosine", "linear", "none"), "optim.decay must be cosine, linear or none"),
        (0 <= cfg.optim.final_lr_ratio <= 1, "optim.final_lr_ratio must be in [0, 1]"),
        (cfg.optim.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables clipping)"),
        (all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas must be in [0, 1)"),
        (cfg.batch_pairs >= 1, "batch_pairs must be at least 1"),
        (cfg.steps >= 1, "steps must be at least 1"),
        (cfg.ckpt_every >= 1, "ckpt_every must be at least 1"),
        (cfg.keep_last >= 1, "keep_last must be at least 1"),
        (cfg.log_every >= 1, "log_every must be at least 1"),
        (cfg.seed >= 0, "seed must be >= 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise InputError(msg)
    return cfg


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file as a mapping."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise InputError(f"config file not found: {p}")
    try:
        d = yaml.safe_load(p.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read config file {p}: {' '.join(str(exc).split())[:200]}") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise InputError(f"config file {p} must hold a mapping of keys to values")
    return d


def resolve_config(
    config: str | os.PathLike | None = "tiny",
    overrides: list[str] | None = None,
    seed: int | None = None,
    base: dict[str, Any] | None = None,
) -> PretrainConfig:
    """The resolved configuration: defaults, then a preset or YAML file (or ``base``), then overrides.

    Args:
        config: a preset name (:data:`PRESETS`) or a YAML file; ignored when ``base`` is given.
        overrides: ``key=value`` strings, applied last.
        seed: when given, sets ``seed`` (after the overrides).
        base: a full config mapping (e.g. a run's saved ``config.yaml``) to start from.

    Raises:
        InputError: unknown preset, file, key, or a value of the wrong type or range.
    """
    cfg = PretrainConfig()
    if base is not None:
        cfg = from_dict(PretrainConfig, base)
    elif config is not None:
        name = str(config)
        if name in PRESETS:
            for k, v in PRESETS[name].items():
                set_key(cfg, k, v)
        elif name.endswith((".yaml", ".yml")) or Path(name).exists():
            cfg = from_dict(PretrainConfig, load_yaml(name))
        else:
            raise InputError(f"unknown config {name!r}: use {', '.join(PRESETS)} or a YAML file")
    for k, v in parse_overrides(list(overrides or [])):
        set_key(cfg, k, v)
    if seed is not None:
        cfg.seed = int(seed)
    return validate(cfg)


def dump_yaml(cfg: PretrainConfig) -> str:
    """The config as YAML text."""
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def apply_dataclass_overrides(obj: Any, overrides: dict[str, Any], what: str = "data.synth") -> Any:
    """A copy of dataclass ``obj`` with dotted ``overrides`` applied (for the engine's ``SynthConfig``).

    Raises:
        InputError: a key that names no field, or a value of the wrong type.
    """
    obj = _deepcopy_dc(obj)
    for key, value in overrides.items():
        parts = key.split(".")
        target = obj
        for i, part in enumerate(parts):
            if not (dataclasses.is_dataclass(target) and not isinstance(target, type)):
                raise InputError(f"unknown {what} key {key!r}")
            names = {f.name for f in dataclasses.fields(target)}
            if part not in names:
                raise InputError(f"unknown {what} key {key!r}; {'.'.join(parts[:i]) or 'top level'} has {', '.join(sorted(names))}")
            if i == len(parts) - 1:
                tp = _hints(type(target)).get(part, Any)
                object.__setattr__(target, part, coerce(value, tp, f"{what}.{key}"))
            else:
                target = getattr(target, part)
    return obj


def _deepcopy_dc(obj: Any) -> Any:
    import copy

    return copy.deepcopy(obj)
