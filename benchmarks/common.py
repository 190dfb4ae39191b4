"""Shared pieces of the benchmark scripts: where the data is, which machine, writing the results.

Every benchmark writes ``<out>/<name>.json`` (all numbers, the machine, the date and the commit) and
``<out>/<name>.md`` (the table that goes into benchmarks/README.md); ``<out>`` defaults to
``benchmarks/results``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import platform
import resource
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from synthvox.cli.common import tune_allocator

# Every benchmark process (and every worker it starts, which imports this module too) keeps freed
# memory in the heap as the ``synthvox`` command does: timings are then those a user gets. Off, the
# feature probe spent 83 of its 210 CPU seconds in the kernel returning and re-mapping large tensors.
tune_allocator()

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"

#: nichart_dev subjects.
SUBJECTS = [f"Subj{i}" for i in range(1, 12)]


def with_repo_on_path(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a child process that runs a benchmark module (``python -m benchmarks.X``) from any
    working directory: the repository root first on its ``PYTHONPATH``."""
    rest = env.get("PYTHONPATH", "")
    return {**env, "PYTHONPATH": str(REPO) + (os.pathsep + rest if rest else "")}


def shared_dir() -> Path:
    """``$SYNTHVOX_SHARED`` or ``../shared`` beside the repository (where CI puts it)."""
    env = os.environ.get("SYNTHVOX_SHARED")
    return Path(env) if env else (REPO / ".." / "shared").resolve()


def eval_dir() -> Path:
    return shared_dir() / "data" / "eval"


def has_shared_data() -> bool:
    return (eval_dir() / "nichart_dev").is_dir()


def require_shared_data() -> bool:
    """:func:`has_shared_data`, saying on stderr where the data was looked for when it is absent."""
    if has_shared_data():
        return True
    import sys

    print(f"no evaluation data at {eval_dir()} (set SYNTHVOX_SHARED)", file=sys.stderr)
    return False


def dlmuse_groups() -> dict[str, list[int]]:
    """The 14 coarse structures of ``dlmuse_groups.json`` (name -> DLMUSE ids)."""
    raw = json.loads((eval_dir() / "dlmuse_groups.json").read_text())
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def nichart_paths(subject: str) -> dict[str, Path]:
    """The files of one nichart_dev subject: t1, dlmuse (on the T1 grid), flair, flair_dlmuse."""
    d = eval_dir() / "nichart_dev"
    return {
        "t1": d / "t1" / f"{subject}_T1.nii.gz",
        "dlmuse": d / "dlmuse" / f"{subject}_T1_DLMUSE.nii.gz",
        "flair": d / "flair" / f"{subject}_FL.nii.gz",
        "flair_dlmuse": d / "flair_dlmuse" / f"{subject}_FL_DLMUSE.nii.gz",
    }


def git_commit() -> str:
    """Short commit of the repository (with ``+dirty`` when the tree has changes), or ``unknown``."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, torch, threads, GPU, load average."""
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def machine_line(info: dict[str, Any]) -> str:
    gpu = f", {info['gpu']}" if info.get("gpu") else ""
    return (f"{info['cores']}-core {info['cpu']}{gpu}, torch {info['torch']}, {info['torch_threads']} threads, "
            f"load avg {info['load_avg'][0]}")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def header(name: str, device: str = "cpu") -> dict[str, Any]:
    """The common part of every result file."""
    return {
        "benchmark": name,
        "date": _dt.date.today().isoformat(),
        "commit": git_commit(),
        "machine": machine_info(device),
    }


def _default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_results(name: str, payload: dict[str, Any], markdown: str, out: Path | None = None) -> tuple[Path, Path]:
    """Write ``<out>/<name>.json`` and ``<out>/<name>.md``; returns both paths."""
    out = Path(out) if out is not None else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / f"{name}.json", out / f"{name}.md"
    tmp = js.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=_default))
    os.replace(tmp, js)
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(markdown.rstrip() + "\n")
    os.replace(tmp, md)
    return js, md


def md_table(columns: list[str], rows: list[list[Any]], fmt: str = "{:.3f}") -> str:
    """A markdown table; floats formatted with ``fmt``, None shown as an en dash."""

    def cell(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, (float, np.floating)):
            return "–" if not np.isfinite(v) else fmt.format(v)
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _digest(*tensors: Any) -> str:
    """sha1 of the tensors' values (a network loaded twice from the same weights digests the same)."""
    h = hashlib.sha1()
    for x in tensors:
        h.update(x.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """Within ``with FeatureCache():``, ``FeatureExtractor.raw`` computes the network's and MIND's
    features of the same image, network and zoom once, for ``net`` and ``both`` alike (registrations
    of one pair with several feature kinds or shares then cost one network pass per image). The
    registrations are the same as without it."""

    def __init__(self) -> None:
        from synthvox.registration.descriptors import FeatureExtractor

        self.cls, self.original, self.store = FeatureExtractor, FeatureExtractor.raw, {}
        cache = self

        def raw(extractor: Any, image: Any, which: str, only: str | None = None) -> Any:
            if extractor.kind == "mind":  # no network: nothing worth keeping
                return cache.original(extractor, image, which, only)
            key = (_digest(image), _digest(*extractor.model.state_dict().values()), extractor.net_zoom,
                   extractor.intensity_scaling, which)
            if key not in cache.store:
                cache.store[key] = cache.original(dataclasses.replace(extractor, kind="both"), image, which)
            wanted = ("mind", "net") if extractor.kind == "both" else ("net",)
            return {k: cache.store[key][k] for k in wanted if only in (None, k)}

        self.raw = raw

    def __enter__(self) -> FeatureCache:
        self.cls.raw = self.raw
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cls.raw = self.original
        self.store.clear()
