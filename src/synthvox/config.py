"""The one config dialect of synthvox: typed dataclasses, built from mappings, YAML and ``key=value`` strings.

Pretraining (:mod:`synthvox.train.config`), finetuning and registration settings are dataclasses with
defaults; this module fills them from nested mappings (:func:`from_dict`), dotted keys
(:func:`set_key`: ``optim.lr``, ``data.synth.labels.fov_mm``) and ``key=value`` strings
(:func:`parse_overrides`, :func:`apply_overrides`), checking every value against the field's type
annotation. A key that is the unique name of a field in one section may be given without its
section (``lr=1e-3``). :func:`rebuild` reconstructs a dataclass from its values so that every
``__post_init__`` check runs on what was set. Unknown keys and wrong types are one-line
:class:`~synthvox.errors.InputError` s.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Union

from synthvox.errors import InputError


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
        kt, vt = args if len(args) == 2 else (Any, Any)
        return {coerce(k, kt, key): coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
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
            raise InputError(f"unknown config key {prefix + k!r}; known: {', '.join(prefix + n for n in hints)}")
        if _is_dataclass_type(hints[k]) and isinstance(v, dict):
            sub = getattr(out, k)
            for kk, vv in v.items():
                set_key(sub, kk, vv, prefix=f"{prefix}{k}.")
        else:
            object.__setattr__(out, k, coerce(v, hints[k], prefix + k))
    return out


def check_names(given: typing.Iterable[str], names: typing.Sequence[str], what: str) -> None:
    """Refuse the names in ``given`` that are not among ``names``: one line naming them, with the
    closest known name of each (else every known name).

    Raises:
        InputError: ``unknown {what}(s): NAME (did you mean ...?)``.
    """
    unknown = sorted(set(given) - set(names))
    if unknown:
        close = [m for u in unknown for m in difflib.get_close_matches(u, names, 1)]
        hint = f" (did you mean {', '.join(close)}?)" if close else f" (the settings: {', '.join(names)})"
        raise InputError(f"unknown {what}(s): {', '.join(unknown)}{hint}")


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
        raise InputError(f"unknown config key {prefix + key!r}; known: {', '.join(prefix + n for n in hints)}")
    tp = hints[head]
    current = getattr(obj, head)
    if dataclasses.is_dataclass(current) and not isinstance(current, type):
        tp = type(current)  # an optional section that is set: its fields are set in place
    if len(parts) == 1:
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                raise InputError(f"config key {prefix}{head!r} is a section: set its fields ({prefix}{head}.<field>=...)")
            for k, v in value.items():
                set_key(getattr(obj, head), k, v, prefix=f"{prefix}{head}.")
            return
        object.__setattr__(obj, head, coerce(value, tp, prefix + head))
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


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file as a mapping."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise InputError(f"config file not found: {p}")
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read config file {p}: {' '.join(str(exc).split())[:200]}") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise InputError(f"config file {p} must hold a mapping of keys to values")
    return d



def dump_yaml(cfg: Any) -> str:
    """A config as YAML text."""
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def rebuild(obj: Any, what: str = "config") -> Any:
    """A new instance of dataclass ``obj`` built from its values, so that every ``__post_init__`` check runs.

    Raises:
        InputError: a check refuses a value (its message, on one line).
    """
    if not (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        return obj
    kwargs = {f.name: rebuild(getattr(obj, f.name), what) for f in dataclasses.fields(obj) if f.init}
    try:
        return type(obj)(**kwargs)
    except InputError as exc:
        raise InputError(f"{what}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what}: {' '.join(str(exc).split())[:200]}") from None


def apply_overrides(obj: Any, overrides: list[str] | dict[str, Any], what: str = "config") -> Any:
    """A validated copy of dataclass ``obj`` with ``key=value`` strings (or a ``{dotted key: value}`` mapping) applied.

    Raises:
        InputError: unknown key, wrong type, or a value the dataclass's own checks refuse.
    """
    out = copy.deepcopy(obj)
    items = parse_overrides(list(overrides)) if isinstance(overrides, (list, tuple)) else list(overrides.items())
    for k, v in items:
        set_key(out, k, v)
    return rebuild(out, what)
