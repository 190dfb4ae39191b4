"""The run folder shared by pretraining and finetuning: refusing or clearing an earlier run, and the CSV log.

A run folder holds entries that belong to the run (``checkpoints/``, ``log.csv``, ...). Starting a
run where one already is needs ``force`` (which removes those entries) or ``resume`` (which keeps
them); anything else in the folder is left alone. The log gets one row per logged step, appended
and flushed as the run goes; a resumed run first drops the rows after the checkpoint it resumes
from, so the log reads as if the run had never stopped.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from synthvox.errors import InputError


def check_run_dir(out: Path, owned: Sequence[str], resume: bool, force: bool, what: str = "a run") -> list[str]:
    """Check, without changing anything, that a run may start in ``out``; return the entries ``force`` would remove.

    Raises:
        InputError: a file where the folder should be, a folder that cannot be written, or (without
            ``resume`` or ``force``) a folder that already holds a run.
    """
    from synthvox.io import check_writable

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out must be a directory, but a file is there: {out}")
    check_writable(out, what="the run")
    if resume:
        return []
    clash = [n for n in owned if (out / n).exists()]
    if clash and not force:
        raise InputError(f"{out} already holds {what} ({', '.join(clash)}); use --resume to continue it or --force to start over")
    return clash


def prepare_run_dir(out: Path, owned: Sequence[str], resume: bool, force: bool, what: str = "a run") -> None:
    """:func:`check_run_dir`, then remove the earlier run's entries (with ``force``) and make the folder."""
    out = Path(out)
    for name in check_run_dir(out, owned, resume, force, what):
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def truncate_log(path: Path, step: int) -> None:
    """Drop the rows of a CSV log after ``step`` (the first column), keeping the header."""
    from synthvox.files import atomic_path

    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    keep = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(keep)


class RunLog:
    """The run's CSV log, open for appending.

    Args:
        path: the log file.
        fields: the column names (the first is the step).
        resume_from: the step a resumed run starts from (rows after it are dropped and the file is
            appended to); ``None`` starts a new log.
    """

    def __init__(self, path: Path, fields: Sequence[str], resume_from: int | None = None) -> None:
        self.path = Path(path)
        self.fields = list(fields)
        if resume_from is not None:
            truncate_log(self.path, resume_from)
        new = resume_from is None or not self.path.is_file() or self.path.stat().st_size == 0
        self._file = open(self.path, "w" if new else "a", newline="")
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(self.fields)
            self._file.flush()

    def append(self, row: Mapping[str, Any] | Sequence[Any]) -> None:
        """Write one row (a mapping by column name, missing columns empty, or the values in order) and flush."""
        values = [row.get(f, "") for f in self.fields] if isinstance(row, Mapping) else list(row)
        self._writer.writerow(values)
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
