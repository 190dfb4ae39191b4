"""``register``, ``apply`` and ``demo`` when the work fails or is interrupted: a user's mistake is one
line and exit status 2, running out of memory is exit status 2, Ctrl-C is 130 (README, "Commands"), and
none of them leaves a partial output or touches an earlier complete one (``--force`` included)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from test_cli_mistakes import one_line_error, tree
from typer.testing import CliRunner

from synthvox import files, io
from synthvox.cli import app
from synthvox.volume import Volume

runner = CliRunner()

OOM = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB")
FAILURES = [(OOM, 2), (KeyboardInterrupt(), 130)]


def contents(path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def raising(exc: BaseException, after: int = 0):
    """A replacement for ``real`` that raises ``exc`` from its ``after + 1``-th call on."""

    def wrap(real):
        calls = []

        def wrapped(*args, **kwargs):
            calls.append(1)
            if len(calls) > after:
                raise exc
            return real(*args, **kwargs)

        return wrapped

    return wrap


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 24^3 image pair (a shifted copy) with label maps, and one registration's outputs."""
    d = tmp_path_factory.mktemp("inputs")
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    lab = torch.zeros(1, 24, 24, 24, dtype=torch.int64)
    lab[:, 5:15, 6:16, 5:17] = 1
    lab[:, 12:20, 10:19, 8:18] = 2
    g = torch.Generator().manual_seed(0)
    img = lab.float() * 40 + torch.rand(lab.shape, generator=g) * 5
    io.save(Volume(img, aff), d / "fixed.nii.gz")
    io.save(Volume(torch.roll(img, 2, 1), aff), d / "moving.nii.gz")
    io.save(Volume(torch.roll(lab, 2, 1), aff), d / "moving_lab.nii.gz", labels=True)
    io.save(Volume(2 * img, aff), d / "brighter.nii.gz")  # registers onto FIXED with other outputs
    r = runner.invoke(app, register_args(d, d / "reg"))
    assert r.exit_code == 0, r.output
    return d


def register_args(d, out) -> list[str]:
    return ["register", str(d / "fixed.nii.gz"), str(d / "moving.nii.gz"), "--moving-labels", str(d / "moving_lab.nii.gz"),
            "--out", str(out), "--features", "mind", "--device", "cpu", "--quiet"]


def apply_args(d, out) -> list[str]:
    return ["apply", str(d / "moving_lab.nii.gz"), "--warp", str(d / "reg" / "warp.nii.gz"), "--labels", "--out", str(out),
            "--device", "cpu"]


# ---------------------------------------------------------------------------------------------- register


def test_register_with_a_bad_input_is_one_line_and_exit_2(inputs, tmp_path):
    (tmp_path / "not_nifti.nii.gz").write_text("hello")
    for bad in (tmp_path / "missing.nii.gz", tmp_path / "not_nifti.nii.gz"):
        args = register_args(inputs, tmp_path / "out")
        args[2] = str(bad)
        one_line_error(runner.invoke(app, args))
        assert not (tmp_path / "out").exists()
    args = [*register_args(inputs, tmp_path / "out"), "--features", "net", "--weights", str(tmp_path / "no_model")]
    assert "no_model" in one_line_error(runner.invoke(app, [a for a in args if a != "--quiet"]))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("exc,code", FAILURES, ids=["out of memory", "ctrl-c"])
def test_register_failing_or_interrupted_in_the_work_leaves_nothing(inputs, tmp_path, monkeypatch, exc, code):
    import synthvox.registration.pipeline as pipeline

    monkeypatch.setattr(pipeline, "register", raising(exc)(pipeline.register))
    out = tmp_path / "new" / "reg"
    r = runner.invoke(app, register_args(inputs, out))
    assert r.exit_code == code, r.output
    if code == 2:
        assert "out of memory" in one_line_error(r)
    assert "Traceback" not in r.output
    assert tree(tmp_path) == []  # not even the folders


@pytest.mark.parametrize("exc,code", FAILURES, ids=["out of memory", "ctrl-c"])
def test_register_interrupted_while_writing_keeps_the_earlier_outputs(inputs, tmp_path, monkeypatch, exc, code):
    """With ``--force`` over a complete earlier run, a failure after two of the files were written
    leaves the earlier set as it was (no mix of old and new files, no staging folder). Fails when
    ``io.staging_dir`` writes straight into the output folder (checked)."""
    import shutil

    out = shutil.copytree(inputs / "reg", tmp_path / "reg")
    before = contents(out)
    monkeypatch.setattr(io, "save", raising(exc, after=2)(io.save))
    args = register_args(inputs, out)
    args[2] = str(inputs / "brighter.nii.gz")  # outputs that differ from the earlier ones
    r = runner.invoke(app, [*args, "--force"])
    assert r.exit_code == code, r.output
    assert contents(out) == before and tree(out) == sorted(before)


def test_register_stopped_by_sigint_exits_130_and_leaves_nothing(inputs, tmp_path):
    """A real Ctrl-C (SIGINT) to a ``synthvox register`` process in the middle of its work."""
    out = tmp_path / "reg"
    args = register_args(inputs, out)
    args.remove("--quiet")
    # long enough to be interrupted while it works: no early stop (adam_tol=0), so 100000 Adam steps
    args += ["--set", "adam_iters=100000", "--set", "adam_tol=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # a child of a shell that ignores SIGINT (a backgrounded CI job) would inherit the ignoring: restore it
    proc = subprocess.Popen([sys.executable, "-m", "synthvox", *args], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            text=True, env=env)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait for a progress line: the work has started
            line = proc.stderr.readline()
            lines.append(line)
            if not line or line.strip().startswith(("affine", "convex", "init")):
                break
        assert proc.poll() is None, "".join(lines)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, "".join(lines) + err
    assert "Traceback" not in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------- apply


def test_apply_with_a_bad_warp_is_one_line_and_exit_2(inputs, tmp_path):
    (tmp_path / "warp.nii.gz").write_text("not a warp")
    args = apply_args(inputs, tmp_path / "moved.nii.gz")
    args[args.index("--warp") + 1] = str(tmp_path / "warp.nii.gz")
    one_line_error(runner.invoke(app, args))
    assert tree(tmp_path) == ["warp.nii.gz"]


@pytest.mark.parametrize("exc,code", FAILURES, ids=["out of memory", "ctrl-c"])
def test_apply_failing_or_interrupted_leaves_no_file_and_keeps_an_earlier_one(inputs, tmp_path, monkeypatch, exc, code):
    import synthvox.registration.warp as warp

    out = tmp_path / "new" / "moved.nii.gz"
    monkeypatch.setattr(warp, "apply_warp", raising(exc)(warp.apply_warp))
    r = runner.invoke(app, apply_args(inputs, out))
    assert r.exit_code == code, r.output
    if code == 2:
        assert "out of memory" in one_line_error(r)
    assert tree(tmp_path) == []
    monkeypatch.undo()
    # an earlier output, overwritten with --force by a run that fails while writing: kept as it was
    out.parent.mkdir()
    out.write_bytes(b"earlier")
    monkeypatch.setattr(files, "atomic_path", raising(exc)(files.atomic_path))
    r = runner.invoke(app, [*apply_args(inputs, out), "--force"])
    assert r.exit_code == code, r.output
    assert tree(tmp_path) == ["new", "new/moved.nii.gz"] and out.read_bytes() == b"earlier"


# -------------------------------------------------------------------------------------------------- demo


def test_demo_with_bad_weights_is_one_line_and_exit_2(tmp_path):
    """Found by this test: demo printed its progress line before reading ``--weights``, so the error
    came as a second line; the weights are now checked before the work starts."""
    line = one_line_error(runner.invoke(app, ["demo", "--out", str(tmp_path / "d"), "--features", "net", "--weights",
                                              str(tmp_path / "no_model"), "--device", "cpu"]))
    assert "no_model" in line
    assert tree(tmp_path) == []


@pytest.mark.parametrize("exc,code", FAILURES, ids=["out of memory", "ctrl-c"])
def test_demo_failing_or_interrupted_in_the_work_leaves_nothing(tmp_path, monkeypatch, exc, code):
    import synthvox.registration as registration

    # run_demo registers through synthvox.registration.register: fail there, after the demo data loaded
    monkeypatch.setattr(registration, "register", raising(exc)(registration.register))
    out = tmp_path / "new" / "demo"
    r = runner.invoke(app, ["demo", "--out", str(out), "--features", "mind", "--device", "cpu"])
    assert r.exit_code == code, r.output
    if code == 2:
        assert "out of memory" in r.output.strip().splitlines()[-1]
    assert "Traceback" not in r.output
    assert tree(tmp_path) == []


@pytest.mark.parametrize("exc,code", FAILURES, ids=["out of memory", "ctrl-c"])
def test_demo_interrupted_while_writing_keeps_the_earlier_outputs(inputs, tmp_path, monkeypatch, exc, code):
    """The demo's registration replaced by the small pair's (the demo's own takes a minute on a busy
    machine), then a failure after two files of ``--force`` over an earlier complete output."""
    import shutil

    import synthvox.demo as demo
    from synthvox.registration import register

    fixed, moving = io.load(inputs / "fixed.nii.gz"), io.load(inputs / "brighter.nii.gz")
    reg = register(fixed, moving, features="mind", moving_labels=io.load_labels(inputs / "moving_lab.nii.gz"))
    monkeypatch.setattr(demo, "run_demo", lambda **kw: demo.DemoResult(registration=reg, dice={}))
    out = shutil.copytree(inputs / "reg", tmp_path / "demo")
    before = contents(out)
    monkeypatch.setattr(io, "save", raising(exc, after=2)(io.save))
    r = runner.invoke(app, ["demo", "--out", str(out), "--features", "mind", "--device", "cpu", "--force"])
    assert r.exit_code == code, r.output
    assert contents(out) == before
