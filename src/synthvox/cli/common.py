"""Shared pieces of the CLI: error handling, devices, seeds, the allocator."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

F = TypeVar("F", bound=Callable[..., Any])

DeviceOption = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
SeedOption = typer.Option(0, "--seed", help="Base random seed.")
ForceOption = typer.Option(False, "--force", help="Overwrite existing outputs.")


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def user_errors(fn: F) -> F:
    """Turn a user's mistake into a one-line error and exit status 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from synthvox.errors import InputError

        try:
            return fn(*args, **kwargs)
        except InputError as exc:
            fail(" ".join(str(exc).split()))
        except MemoryError:
            fail("out of memory: the volume is too large for this machine (try a smaller --size or the CPU/GPU with more memory)")
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except RuntimeError as exc:
            text = str(exc)
            if "out of memory" in text.lower() or "can't allocate memory" in text.lower():
                fail("out of memory: " + text.splitlines()[0])
            if "smaller than kernel size" in text or "expected each dimension size to be at least" in text:
                # a safety net for stages without their own size check (volume.check_min_size)
                fail("an input volume is too thin for this command at its working resolution "
                     f"({text.splitlines()[0]}): give it more voxels along its thinnest axis")
            raise
        except OSError as exc:
            # the machine's mistake rather than the program's: a full disk, a quota, a file system
            # made read-only or a permission taken away while the command ran
            import errno

            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
                where = f" {exc.filename}" if exc.filename else ""
                fail(f"cannot write{where}: {exc.strerror or exc}")
            raise

    return wrapper  # type: ignore[return-value]


def check_number(
    option: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Refuse an option value that is NaN, infinite or outside ``[low, high]`` (``(`` / ``)`` when open).

    Typer parses ``nan`` and ``inf`` as valid floats, so every float option goes through this.
    """
    import math

    from synthvox.errors import InputError

    v = float(value)
    lo_ok = low is None or (v > low if low_open else v >= low)
    hi_ok = high is None or (v < high if high_open else v <= high)
    if not math.isfinite(v) or not (lo_ok and hi_ok):
        lo_txt = "-inf" if low is None else f"{low:g}"
        hi_txt = "inf" if high is None else f"{high:g}"
        where = f"{'(' if low_open or low is None else '['}{lo_txt}, {hi_txt}{')' if high_open or high is None else ']'}"
        raise InputError(f"{option} must be a finite number in {where}, got {value}")
    return v


def check_at_least(**options: tuple[int | None, int]) -> None:
    """Refuse whole-number options below their minimum: ``check_at_least(**{"--n": (n, 1)})``.

    ``None`` values (options left to their automatic default) are skipped.
    """
    from synthvox.errors import InputError

    for option, (value, minimum) in options.items():
        if value is not None and value < minimum:
            raise InputError(f"{option} must be at least {minimum}, got {value}")


def resolve_device(name: str) -> Any:
    """``auto`` picks CUDA when available, else the CPU; unknown names are a user error."""
    import torch

    from synthvox.errors import InputError

    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    return dev


def check_out_dir(path: Path, force: bool, names: list[str] | None = None) -> Path:
    """Check an output directory before any work; creates nothing (writers create it when they write).

    Refuses a file in its place, a place that cannot be written, and (unless ``force``) a directory
    that already holds outputs: with ``names``, only those files count as existing outputs; otherwise
    any non-empty directory does.
    """
    from synthvox.errors import InputError
    from synthvox.io import check_writable

    if path.exists() and not path.is_dir():
        raise InputError(f"--out must be a directory, but a file is there: {path}")
    if path.is_dir() and not force:
        clash = [n for n in names if (path / n).exists()] if names is not None else list(path.iterdir())
        if clash:
            raise InputError(f"output directory {path} already holds outputs (use --force to overwrite)")
    check_writable(path)
    return path


def tune_allocator() -> None:
    """Keep freed memory in glibc's heap instead of returning it to the OS after each large tensor.

    Large tensors are otherwise mmap-ed and unmapped at every step, which costs about 1.4x on a 128^3
    UNet step on small machines. Equivalent to ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>``;
    respected when the user already set those variables. No-op off glibc.
    """
    if sys.platform != "linux" or os.environ.get("SYNTHVOX_NO_MALLOPT"):
        return
    if "MALLOC_MMAP_MAX_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        libc.mallopt(m_mmap_max, 0)
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):
        pass
