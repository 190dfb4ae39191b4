"""A study in one command: ``register --pairs`` / :func:`synthvox.register_many` on tiny pairs: each pair
as a single registration writes it, one table, bad rows named before any work, failures recorded,
resume after an interruption and shards giving the same table as one run, and the quality flag."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_affine
from test_registration import phantom, warped_pair
from typer.testing import CliRunner

import synthvox
import synthvox.registration.pipeline as pipeline
from synthvox import io
from synthvox.cli import app
from synthvox.errors import InputError
from synthvox.registration import RegistrationConfig
from synthvox.registration.batch import PairsError, read_pairs, register_many, share
from synthvox.registration.quality import quality_flags
from synthvox.volume import Volume

runner = CliRunner()
#: a quick solver for 24^3 volumes
CFG = RegistrationConfig(spacing=3.0, affine_iters=(10, 5), adam_iters=5)
N_PAIRS = 6


def _study(root: Path, n: int = N_PAIRS) -> Path:
    """``n`` small pairs (the first with labels on both sides, the third a constant moving image that
    fails at registration) and their CSV, with relative paths."""
    d = root / "data"
    d.mkdir(parents=True, exist_ok=True)
    aff = make_affine(spacing=(3.0, 3.0, 3.0), angles=(0.1, 0.0, 0.2), origin=(-30.0, -30.0, -30.0))
    rows = []
    for i in range(n):
        img = phantom(24, seed=i)
        moving, _ = warped_pair(img, amp=1.0)
        maff = aff.copy()
        maff[:3, 3] += (2.0 * i, -3.0, 1.0)
        if i == 2:
            moving = torch.ones_like(moving)  # constant: refused by the registration, not by the header check
        io.save(Volume(img, aff), d / f"f{i}.nii.gz")
        io.save(Volume(moving, maff), d / f"m{i}.nii.gz")
        row = {"fixed": f"data/f{i}.nii.gz", "moving": f"data/m{i}.nii.gz", "name": f"p{i}"}
        if i == 0:
            io.save(Volume((moving > 0.2).long() * 3 + (moving > 0.55).long() * 4, maff), d / "ml0.nii.gz", labels=True)
            io.save(Volume((img > 0.2).long() * 3 + (img > 0.55).long() * 4, aff), d / "fl0.nii.gz", labels=True)
            row.update(moving_labels="data/ml0.nii.gz", fixed_labels="data/fl0.nii.gz")
        rows.append(row)
    path = root / "pairs.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["fixed", "moving", "moving_labels", "fixed_labels", "name"])
        w.writeheader()
        w.writerows(rows)
    return path


def _table(out: Path) -> list[dict[str, str]]:
    """results.csv without the times (which differ between runs)."""
    with open(out / "results.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The study's CSV and one uninterrupted run of it."""
    root = tmp_path_factory.mktemp("study")
    pairs = _study(root)
    res = register_many(pairs, root / "one_run", config=CFG, progress=False, log=lambda line: None)
    return pairs, root / "one_run", res


def test_each_pair_is_written_as_one_registration_writes_it_and_one_table(study, tmp_path):
    pairs, out, res = study
    assert res.registered == ["p0", "p1", "p3", "p4", "p5"] and list(res.failed) == ["p2"]
    assert "constant" in res.failed["p2"]
    # the pair as the single-pair command writes it
    single = tmp_path / "single"
    r = runner.invoke(app, ["register", str(pairs.parent / "data/f0.nii.gz"), str(pairs.parent / "data/m0.nii.gz"),
                            "--out", str(single), "--moving-labels", str(pairs.parent / "data/ml0.nii.gz"),
                            "--fixed-labels", str(pairs.parent / "data/fl0.nii.gz"), "--device", "cpu",
                            "--spacing", "3", "--set", "affine_iters=[10,5]", "--set", "adam_iters=5", "--quiet"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (out / "p0").iterdir()) == sorted(p.name for p in single.iterdir())
    for name in ("moved.nii.gz", "warp.nii.gz", "moved_labels.nii.gz"):
        assert torch.equal(io.load(out / "p0" / name, allow_4d=True).data if name != "warp.nii.gz" else io.load_warp(out / "p0" / name).data,
                           io.load(single / name, allow_4d=True).data if name != "warp.nii.gz" else io.load_warp(single / name).data), name
    a, b = json.loads((out / "p0/report.json").read_text()), json.loads((single / "report.json").read_text())
    assert a["dice"] == b["dice"] and a["similarity"] == b["similarity"]
    # the failed pair: its one-line error, no outputs
    assert sorted(p.name for p in (out / "p2").iterdir()) == ["error.txt"]
    rows = {r["name"]: r for r in _table(out)}
    assert set(rows) == {f"p{i}" for i in range(N_PAIRS)}
    assert rows["p2"]["status"] == "failed" and "constant" in rows["p2"]["error"] and rows["p2"]["quality"] == "failed"
    assert rows["p0"]["status"] == "done" and float(rows["p0"]["mean_dice"]) > 0.5
    assert rows["p0"]["dice_3"] and rows["p0"]["dice_7"] and rows["p1"]["dice_3"] == ""
    assert all(rows[n]["quality"] in ("ok", "check") and rows[n]["similarity_final"] for n in ("p0", "p1", "p3"))
    assert next(iter(rows)) == "p2"  # failures head the table


def test_interrupted_batch_resumes_with_the_same_table(study, tmp_path, monkeypatch):
    pairs, one_run, _ = study
    out = tmp_path / "out"
    real = pipeline.register
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "register", interrupted)
    with pytest.raises(KeyboardInterrupt):
        register_many(pairs, out, config=CFG, progress=False, log=lambda line: None)
    done = sorted(p.name for p in out.iterdir() if (p / "report.json").is_file())
    assert done == ["p0", "p1"]  # p2 failed, p3 interrupted: nothing of it left
    assert not (out / "p3").exists() and (out / "p2" / "error.txt").is_file()
    assert {r["name"]: r["status"] for r in _table(out)}["p4"] == "pending"
    monkeypatch.setattr(pipeline, "register", real)
    before = (out / "p0" / "moved.nii.gz").stat().st_mtime_ns
    res = register_many(pairs, out, config=CFG, progress=False, log=lambda line: None)
    assert res.skipped == ["p0", "p1"] and res.registered == ["p3", "p4", "p5"] and list(res.failed) == ["p2"]
    assert (out / "p0" / "moved.nii.gz").stat().st_mtime_ns == before
    assert _table(out) == _table(one_run)


def test_ctrl_c_on_the_command_then_a_rerun_finishes_only_the_rest(tmp_path):
    """The command in its own process, interrupted (SIGINT) once a pair is finished: the finished pairs
    stay whole, nothing half-written is left, and the rerun registers only the rest, same table. The
    study has 16 pairs, so the signal lands while pairs are left however fast the machine is (with the
    6 of the other tests, a quiet machine finished them all between two polls)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    n = 16
    pairs = _study(tmp_path / "study", n)
    one_run = tmp_path / "one_run"
    register_many(pairs, one_run, config=CFG, progress=False, log=lambda line: None)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "synthvox", "register", "--pairs", str(pairs), "--out", str(out), "--device", "cpu",
           "--spacing", "3", "--set", "affine_iters=[10,5]", "--set", "adam_iters=5", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a child of a shell that ignores SIGINT (a backgrounded CI job) would inherit the ignoring: restore it
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out / "p0" / "report.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err, err
    finished = sorted(p.name for p in out.iterdir() if (p / "report.json").is_file())
    assert finished and len(finished) < n - 1, finished
    assert not [p for p in out.rglob(".partial.*")] and not [p for p in out.rglob(".*.tmp")]
    for name in finished:
        assert sorted(f.name for f in (out / name).iterdir()) == sorted(f.name for f in (one_run / name).iterdir())
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and f"{len(finished)} finished before" in r.stdout, r.stdout + r.stderr  # p2 fails
    assert _table(out) == _table(one_run)


def test_shards_then_one_plain_run_give_the_same_table(study, tmp_path):
    pairs, one_run, _ = study
    out = tmp_path / "out"
    a = register_many(pairs, out, config=CFG, num_parts=2, part_id=0, progress=False, log=lambda line: None)
    b = register_many(pairs, out, config=CFG, num_parts=2, part_id=1, progress=False, log=lambda line: None)
    assert a.registered == ["p0", "p4"] and list(a.failed) == ["p2"] and b.registered == ["p1", "p3", "p5"]
    assert _table(out) == _table(one_run)
    last = register_many(pairs, out, config=CFG, progress=False, log=lambda line: None)
    assert last.registered == [] and list(last.failed) == ["p2"]  # the failed pair is tried again
    assert _table(out) == _table(one_run)
    assert [p.name for p in share(read_pairs(pairs), 3, 2)] == ["p2", "p5"]
    with pytest.raises(InputError, match="--part-id"):
        register_many(pairs, out, num_parts=2, part_id=2)


def test_bad_rows_are_named_one_line_each_before_any_work(tmp_path, monkeypatch):
    pairs = _study(tmp_path, n=3)
    d = tmp_path / "data"
    io.save(Volume(torch.zeros(1, 10, 12, 14, dtype=torch.long), np.eye(4)), d / "other.nii.gz", labels=True)
    with open(pairs, "a", newline="") as f:
        w = csv.writer(f)
        w.writerow(["data/f0.nii.gz", "data/missing.nii.gz", "", "", "q1"])
        w.writerow(["data/f1.nii.gz", "data/m1.nii.gz", "data/other.nii.gz", "", "q2"])
        w.writerow(["data/f1.nii.gz", "data/m1.nii.gz", "", "", "p0"])

    def forbidden(*a, **k):
        raise AssertionError("registration started before the checks")

    monkeypatch.setattr(pipeline, "register", forbidden)
    with pytest.raises(PairsError) as err:
        register_many(pairs, tmp_path / "out")
    problems = err.value.problems
    assert len(problems) == 3
    assert problems[0].startswith("row 5 (q1)") and "not found" in problems[0] and "missing.nii.gz" in problems[0]
    assert problems[1].startswith("row 6 (q2)") and "moving_labels is not on the grid" in problems[1]
    assert problems[2].startswith("row 7 (p0)") and "already row 2's" in problems[2]
    r = runner.invoke(app, ["register", "--pairs", str(pairs), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 3 and all(ln.startswith("error: ") and "row " in ln for ln in lines), r.output
    assert not (tmp_path / "out").exists()
    bad = tmp_path / "bad.csv"
    bad.write_text("fixed,movin\na,b\n")
    with pytest.raises(InputError, match="needs the columns fixed and moving"):
        register_many(bad, tmp_path / "out")
    r = runner.invoke(app, ["register", "--pairs", str(pairs), str(d / "f0.nii.gz"), str(d / "m0.nii.gz"), "--out", "o"])
    assert r.exit_code == 2 and "not both" in r.output
    r = runner.invoke(app, ["register", "--pairs", str(pairs), "--out", "o", "--moving-labels", str(d / "ml0.nii.gz")])
    assert r.exit_code == 2 and "columns of the CSV" in r.output


def test_the_command_line_runs_a_share_and_reports_failures(tmp_path):
    pairs = _study(tmp_path, n=3)
    out = tmp_path / "out"
    base = ["register", "--pairs", str(pairs), "--out", str(out), "--device", "cpu", "--spacing", "3",
            "--set", "adam_iters=5", "--quiet"]
    r = runner.invoke(app, [*base, "--num-parts", "2", "--part-id", "1"])
    assert r.exit_code == 0, r.output
    assert "registered 1 pair(s) (share 1 of 2), 0 finished before, 0 failed" in r.stdout
    r = runner.invoke(app, base)
    assert r.exit_code == 1 and "1 pair(s) failed" in r.output and "p2" in r.output
    assert "registered 1 pair(s), 1 finished before, 1 failed" in r.stdout
    assert synthvox.register_many is register_many


def _report(cost: float, fallback: str | None = None, folding: float = 0.0, turn_deg: float = 10.0) -> dict:
    c, s = np.cos(np.radians(turn_deg)), np.sin(np.radians(turn_deg))
    world = [[c, -s, 0, 1.0], [s, c, 0, 2.0], [0, 0, 1.05, 0], [0, 0, 0, 1]]
    return {"similarity": {"final": cost}, "fallback": fallback, "folding_percent": folding, "world_affine": world}


def test_quality_flag_marks_the_costly_the_turned_the_fallback_and_folding():
    # the dev batch's final costs (nichart, --init moments, the last a 90-degree turned moving image)
    costs = [0.7454, 0.9884, 0.9843, 0.7535, 0.9313, 0.6913, 1.1068]
    flags = quality_flags([_report(c) for c in costs])
    assert [f.flag for f in flags] == ["ok"] * 6 + ["check"]
    assert "19% above the batch's median" in flags[-1].reasons[0] and flags[-1].cost_ratio == pytest.approx(1.1068 / 0.9313, abs=1e-4)
    flags = quality_flags([_report(0.8, turn_deg=t) for t in (5, 20, 40, 108, 12)])
    assert [f.flag for f in flags] == ["ok", "ok", "ok", "check", "ok"] and flags[3].rotation_deg == pytest.approx(108, abs=0.1)
    assert "108 degrees away from its header" in flags[3].reasons[0]
    flags = quality_flags([_report(0.5), _report(0.5, fallback="headers"), _report(0.5, folding=3.0)])
    assert [f.flag for f in flags] == ["ok", "check", "check"] and flags[0].cost_ratio is None  # too few for the batch figure
