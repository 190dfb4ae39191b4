"""Registering a study: every pair of a CSV in one process, resumable and split into shares.

``synthvox register --pairs PAIRS.csv --out DIR`` and :func:`register_many` read a table of pairs
(columns ``fixed``, ``moving`` and optionally ``moving_labels``, ``fixed_labels``, ``fixed_mask``,
``moving_mask``, ``name``; relative paths are relative to the CSV's folder), check every row before
any work (one line per bad row), load the libraries and the network once, and write each pair into
``DIR/NAME/`` exactly as a single registration writes it.

A pair counts as finished when every file a single registration writes is in ``DIR/NAME/`` (they are
moved there together at the end of each pair); a rerun skips finished pairs, so an interrupted run
(Ctrl-C, a killed job) resumes where it stopped. A pair that fails leaves its one-line error in
``DIR/NAME/error.txt``, does not stop the batch, and is tried again on the next run.
``num_parts``/``part_id`` (nnU-Net's names) run one deterministic share of the pairs (every
``num_parts``-th row from row ``part_id``), for a job array; a plain run after all the shares
registers nothing and writes the table of all of them.

Every run ends by writing ``DIR/results.csv`` from what is on disk for every pair of the CSV (its
``report.json``, its ``error.txt``, or nothing yet), with a quality flag per pair from what the
registration itself knows (:mod:`synthvox.registration.quality`): failed pairs first, then the pairs
to check, worst first.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from synthvox.errors import InputError
from synthvox.registration.config import RegistrationConfig
from synthvox.registration.outputs import output_names
from synthvox.registration.quality import quality_flags

#: The columns a pairs CSV may have; the first two are required.
PAIR_COLUMNS = ("fixed", "moving", "moving_labels", "fixed_labels", "fixed_mask", "moving_mask", "name")
#: The table every batch run writes into its output folder.
RESULTS_TABLE = "results.csv"
#: A failed pair's one-line error, in its folder.
ERROR_FILE = "error.txt"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+=-]*$")
_ON_GRID = {"moving_labels": "moving", "fixed_labels": "fixed", "fixed_mask": "fixed", "moving_mask": "moving"}


@dataclass(frozen=True)
class Pair:
    """One row of a pairs CSV: the files of one registration and the folder name it writes into."""

    name: str
    fixed: Path
    moving: Path
    moving_labels: Path | None = None
    fixed_labels: Path | None = None
    fixed_mask: Path | None = None
    moving_mask: Path | None = None
    row: int = 0  #: line of the CSV (the header is line 1)

    def outputs(self) -> list[str]:
        """The files a finished pair has in its folder."""
        return output_names(self.moving_labels is not None)


class PairsError(InputError):
    """Bad rows of a pairs CSV, one line each in :attr:`problems`."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{len(problems)} bad row(s) in {source}: " + "; ".join(problems))


@dataclass
class BatchResult:
    """What :func:`register_many` did: the table it wrote, its rows, and the names of this run's pairs
    by what happened to them."""

    table: Path
    rows: list[dict[str, Any]]
    registered: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def default_name(fixed: Path, moving: Path) -> str:
    """A pair's folder name when the CSV gives none: ``MOVING_to_FIXED`` (file names without their
    image suffix)."""
    from synthvox.readers import image_stem

    return f"{image_stem(moving)}_to_{image_stem(fixed)}"


def read_pairs(csv_path: str | os.PathLike) -> list[Pair]:
    """The pairs of a CSV (paths resolved against the CSV's folder), unchecked: see :func:`check_pairs`.

    Raises:
        InputError: no such file, no ``fixed``/``moving`` column, an unknown column, no rows.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise InputError(f"pairs file not found: {path}" if not path.exists() else f"pairs file is not a file: {path}")
    base = path.resolve().parent
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in ("fixed", "moving") if c not in columns]
            if missing:
                raise InputError(f"{path} needs the columns fixed and moving (header: {','.join(columns) or 'none'})")
            unknown = [c for c in columns if c not in PAIR_COLUMNS]
            if unknown:
                raise InputError(f"{path} has unknown column(s) {', '.join(unknown)}: use {', '.join(PAIR_COLUMNS)}")
            rows = []
            for raw in reader:
                values = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
                if any(values.values()):
                    rows.append((reader.line_num, values))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read the pairs file {path}: {exc}") from None
    if not rows:
        raise InputError(f"no pairs in {path}")

    def resolve(value: str) -> Path | None:
        if not value:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p

    pairs = []
    for line, v in rows:
        fixed, moving = resolve(v.get("fixed", "")), resolve(v.get("moving", ""))
        pairs.append(Pair(name=v.get("name") or (default_name(fixed, moving) if fixed and moving else ""),
                          fixed=fixed or Path(), moving=moving or Path(),
                          **{k: resolve(v.get(k, "")) for k in _ON_GRID}, row=line))
    return pairs


def as_pairs(pairs: str | os.PathLike | Iterable[Pair | Mapping[str, Any]]) -> tuple[list[Pair], str]:
    """Pairs from a CSV path, :class:`Pair` objects or mappings with the CSV's columns; and what to call
    their source in messages."""
    if isinstance(pairs, (str, os.PathLike)):
        return read_pairs(pairs), str(pairs)
    out = []
    for i, p in enumerate(pairs):
        if isinstance(p, Pair):
            out.append(p)
            continue
        unknown = set(p) - set(PAIR_COLUMNS)
        if unknown:
            raise InputError(f"pair {i + 1} has unknown key(s) {', '.join(sorted(unknown))}: use {', '.join(PAIR_COLUMNS)}")
        paths = {k: Path(p[k]) if p.get(k) else None for k in PAIR_COLUMNS if k != "name"}
        fixed, moving = paths.pop("fixed") or Path(), paths.pop("moving") or Path()
        name = str(p.get("name") or (default_name(fixed, moving) if str(fixed) != "." and str(moving) != "." else ""))
        out.append(Pair(name=name, fixed=fixed, moving=moving, row=i + 1, **paths))
    return out, "the pairs"


def check_pairs(pairs: Sequence[Pair], source: str = "the pairs") -> None:
    """Check every pair before any work, from the files' headers: names (present, unique, usable as a
    folder name), every file there and readable, label maps and masks on their image's grid.

    Raises:
        PairsError: one line per problem, each naming its row.
    """
    from synthvox.readers import grid

    problems: list[str] = []
    seen: dict[str, int] = {}
    for p in pairs:
        where = f"row {p.row}" + (f" ({p.name})" if p.name else "")
        if str(p.fixed) == "." or str(p.moving) == ".":
            problems.append(f"{where}: needs both a fixed and a moving image")
            continue
        if not _NAME.match(p.name) or p.name == RESULTS_TABLE:
            problems.append(f"{where}: the name {p.name!r} cannot be a folder name (letters, digits, . _ + = -)")
        elif p.name in seen:
            problems.append(f"{where}: the name {p.name} is already row {seen[p.name]}'s (each pair writes DIR/NAME/)")
        else:
            seen[p.name] = p.row
        grids: dict[str, tuple[tuple[int, ...], Any]] = {}
        for column in ("fixed", "moving", *_ON_GRID):
            path = getattr(p, column)
            if path is None:
                continue
            try:
                grids[column] = grid(path, what=column.replace("_", " "))
            except InputError as exc:
                problems.append(f"{where}: {exc}")
        for column, image in _ON_GRID.items():
            if column in grids and image in grids:
                (shape, aff), (ishape, iaff) = grids[column], grids[image]
                import numpy as np

                if shape != ishape or not np.allclose(aff, iaff, atol=1e-3):
                    problems.append(f"{where}: {column} is not on the grid of the {image} image "
                                    f"(shape {shape} vs {ishape}, or a different affine)")
    if problems:
        raise PairsError(source, problems)


def share(pairs: Sequence[Pair], num_parts: int = 1, part_id: int = 0) -> list[Pair]:
    """The pairs of share ``part_id`` of ``num_parts``: every ``num_parts``-th pair from ``part_id``
    (nnU-Net's split), the same on every machine for the same CSV."""
    if isinstance(num_parts, bool) or int(num_parts) < 1:
        raise InputError(f"--num-parts must be at least 1, got {num_parts}")
    if not 0 <= int(part_id) < int(num_parts):
        raise InputError(f"--part-id must be in 0..{int(num_parts) - 1} (for --num-parts {num_parts}), got {part_id}")
    return list(pairs[int(part_id)::int(num_parts)])


def is_finished(out: str | os.PathLike, pair: Pair) -> bool:
    """Every file of the pair is in ``out/NAME/`` (a single registration moves them there together)."""
    d = Path(out) / pair.name
    return all((d / n).is_file() for n in pair.outputs())


def one_line(exc: BaseException) -> str:
    """An exception as the one line a user reads (the type for what is not a user's mistake)."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, InputError) else f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def register_many(
    pairs: str | os.PathLike | Iterable[Pair | Mapping[str, Any]],
    out: str | os.PathLike,
    *,
    features: str = "mind",
    weights: Any = None,
    device: torch.device | str = "cpu",
    init: str = "moments",
    affine: bool = True,
    deformable: bool = True,
    config: RegistrationConfig | None = None,
    seed: int = 0,
    label_names: Mapping[int, str] | None = None,
    num_parts: int = 1,
    part_id: int = 0,
    force: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> BatchResult:
    """Register every pair (of share ``part_id`` of ``num_parts``) into ``out/NAME/``, skipping finished
    pairs, and write ``out/results.csv`` for all the pairs.

    >>> import synthvox
    >>> synthvox.register_many("pairs.csv", "study", features="mind")

    Args:
        pairs: a CSV path, or :class:`Pair` objects / mappings with the CSV's columns.
        out: the output folder.
        features, weights, device, init, affine, deformable, config, seed, label_names: as
            :func:`synthvox.registration.register`, the same for every pair (the network is loaded once).
        num_parts: into how many shares the pairs are split.
        part_id: which share this run registers (0-based).
        force: register finished pairs again.
        progress: a progress bar over the pairs on stderr (``None``: only on a terminal).
        log: called with each warning line (prefixed with the pair's name); ``None``: stderr.

    Returns:
        A :class:`BatchResult`. A pair that fails is recorded (``out/NAME/error.txt``, its row in the
        table) and the batch goes on; Ctrl-C stops it after writing the table, finished pairs intact.

    Raises:
        PairsError: bad rows (every one named), before any work.
        InputError: an unusable ``out``, share or feature setting, before any work.
    """
    from tqdm.auto import tqdm

    from synthvox import io
    from synthvox.registration.network import resolve_network

    items, source = as_pairs(pairs)
    if not items:
        raise InputError("no pairs to register")
    check_pairs(items, source)
    mine = share(items, num_parts, part_id)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out must be a directory, but a file is there: {out}")
    io.check_writable(out)
    dev = torch.device(device)
    cfg = config or RegistrationConfig()
    todo = [p for p in mine if force or not is_finished(out, p)]
    result = BatchResult(table=out / RESULTS_TABLE, rows=[], skipped=[p.name for p in mine if p not in todo])
    network = resolve_network(features, weights, cfg, dev) if todo else None
    say = log or (lambda line: tqdm.write(line, file=sys.stderr))
    bar = tqdm(total=len(todo), desc="register", unit="pair", file=sys.stderr, dynamic_ncols=True,
               disable=None if progress is None else not progress)
    try:
        for pair in todo:
            bar.set_postfix_str(pair.name, refresh=False)
            error = _register_one(pair, out, network=network, device=dev, init=init, affine=affine,
                                  deformable=deformable, config=cfg, seed=seed, label_names=label_names,
                                  warn=lambda line, n=pair.name: say(f"{n}: {line}"))
            if error is None:
                result.registered.append(pair.name)
            else:
                result.failed[pair.name] = error
                say(f"{pair.name}: failed: {error}")
            bar.update(1)
    finally:
        bar.close()
        if out.is_dir() or result.registered or result.failed:
            result.rows = write_results(items, out)
    return result


def _register_one(pair: Pair, out: Path, *, network: Any, device: torch.device, init: str, affine: bool,
                  deformable: bool, config: RegistrationConfig, seed: int, label_names: Mapping[int, str] | None,
                  warn: Callable[[str], None]) -> str | None:
    """Register one pair and write its folder; ``None``, or the one-line error (then in ``error.txt``)."""
    from synthvox import io
    from synthvox.files import atomic_path
    from synthvox.registration.pipeline import register

    folder = out / pair.name
    for stale in folder.glob(".partial.*") if folder.is_dir() else ():  # a killed run's staging folder
        import shutil

        shutil.rmtree(stale, ignore_errors=True)
    try:
        load = time.perf_counter()
        fx = io.load(pair.fixed, what="fixed image")
        mv = io.load(pair.moving, what="moving image")
        ml = io.load_labels(pair.moving_labels, what="moving label map") if pair.moving_labels else None
        fl = io.load_labels(pair.fixed_labels, what="fixed label map") if pair.fixed_labels else None
        fm = io.load(pair.fixed_mask, what="fixed mask") if pair.fixed_mask else None
        mm = io.load(pair.moving_mask, what="moving mask") if pair.moving_mask else None
        load = time.perf_counter() - load
        res = register(fx, mv, features=network.kind, weights=network, device=device, moving_labels=ml,
                       fixed_labels=fl, fixed_mask=fm, moving_mask=mm, init=init, affine=affine,
                       deformable=deformable, config=config, seed=seed, label_names=label_names,
                       log=lambda line: warn(line) if line.startswith("warning:") else None)
        res.report["seconds"]["read"] = round(load, 3)
        res.report["inputs"] = {"name": pair.name, "fixed": str(pair.fixed), "moving": str(pair.moving),
                                **{k: str(getattr(pair, k)) if getattr(pair, k) else None for k in _ON_GRID}}
        res.save(folder, force=True, title=f"{pair.moving.name} -> {pair.fixed.name} ({network.kind})")
    except Exception as exc:  # one pair's failure is recorded, the batch goes on (Ctrl-C is not caught)
        message = one_line(exc)
        with atomic_path(folder / ERROR_FILE) as tmp:
            tmp.write_text(message + "\n")
        return message
    (folder / ERROR_FILE).unlink(missing_ok=True)
    return None


#: The first columns of ``results.csv``; ``dice_ID`` columns (one per label id of any pair) follow.
RESULT_COLUMNS = ("name", "status", "quality", "quality_reasons", "cost_ratio", "rotation_deg", "mean_dice",
                  "folding_percent", "seconds", "similarity_final", "similarity_start", "similarity_headers", "fallback",
                  "initial_choice", "warnings", "error", "fixed", "moving", "row")
_STATUS_ORDER = {"failed": 0, "done": 1, "pending": 2}
_QUALITY_ORDER = {"failed": 0, "check": 1, "ok": 2, "": 3}


def pair_record(out: Path, pair: Pair) -> tuple[str, dict[str, Any] | None, str]:
    """What is on disk for one pair: ``("done", report, "")``, ``("failed", None, error)`` or
    ``("pending", None, "")``."""
    folder = Path(out) / pair.name
    if is_finished(out, pair):
        try:
            return "done", json.loads((folder / "report.json").read_text(encoding="utf-8")), ""
        except (OSError, json.JSONDecodeError) as exc:
            return "failed", None, f"unreadable report.json ({type(exc).__name__})"
    if (folder / ERROR_FILE).is_file():
        return "failed", None, (folder / ERROR_FILE).read_text(encoding="utf-8").strip()
    return "pending", None, ""


def results_rows(pairs: Sequence[Pair], out: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per pair from what is on disk (the table of :func:`write_results`), worst first: failed
    pairs, then the pairs flagged to check (highest cost first), then the rest, then those not done."""
    records = [pair_record(Path(out), p) for p in pairs]
    flags = quality_flags([r for s, r, _ in records if s == "done"])
    rows = []
    it = iter(flags)
    for p, (status, rep, error) in zip(pairs, records):
        row: dict[str, Any] = {"name": p.name, "status": status, "error": error, "fixed": str(p.fixed),
                               "moving": str(p.moving), "row": p.row, "quality": "failed" if status == "failed" else ""}
        if rep is not None:
            flag = next(it)
            sim = rep.get("similarity") or {}
            row.update(quality=flag.flag, quality_reasons="; ".join(flag.reasons), cost_ratio=flag.cost_ratio,
                       rotation_deg=flag.rotation_deg,
                       mean_dice=rep.get("mean_dice"), folding_percent=rep.get("folding_percent"),
                       seconds=(rep.get("seconds") or {}).get("total"), similarity_final=sim.get("final"),
                       similarity_start=sim.get("start"), similarity_headers=sim.get("headers"),
                       fallback=rep.get("fallback") or "", initial_choice=rep.get("initial_choice"),
                       warnings=" | ".join(rep.get("warnings") or []))
            for k, v in (rep.get("dice") or {}).items():
                row[f"dice_{k}"] = v
        rows.append(row)

    def key(r: dict[str, Any]) -> tuple:
        ratio = r.get("cost_ratio")
        return (_STATUS_ORDER[r["status"]], _QUALITY_ORDER[r["quality"]], -(ratio if ratio is not None else -1e9), r["row"])

    return sorted(rows, key=key)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if v != v else f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.4g}"
    return str(v)


def write_results(pairs: Sequence[Pair], out: str | os.PathLike) -> list[dict[str, Any]]:
    """Write ``out/results.csv`` (atomically) for every pair from what is on disk; returns its rows."""
    from synthvox.files import atomic_path

    rows = results_rows(pairs, out)
    dice_cols = sorted({k for r in rows for k in r if k.startswith("dice_")}, key=lambda k: int(k[5:]) if k[5:].lstrip("-").isdigit() else 0)
    columns = [*RESULT_COLUMNS, *dice_cols]
    with atomic_path(Path(out) / RESULTS_TABLE) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([_cell(r.get(c)) for c in columns])
    return rows
