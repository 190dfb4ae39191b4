"""A user's mistakes, across every command: one line, exit status 2, no traceback, nothing left behind.

Each test covers a category (outputs that cannot be written, option values, label ids beyond 32 bits,
model metadata of the wrong type, thin volumes, failed or interrupted runs) for all the commands it
applies to, not one example.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import shutil
import tempfile

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import make_affine
from typer.testing import CliRunner

from synthvox import files, io
from synthvox.cli import app
from synthvox.models import build_model, save_model
from synthvox.segmentation.modeldir import SegmentationMeta, SegmentationNet, save_model_dir
from synthvox.volume import Volume

runner = CliRunner()


def one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def tree(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def labels_cube(n: int = 24) -> torch.Tensor:
    lab = torch.zeros(1, n, n, n, dtype=torch.int64)
    lab[:, 4:14, 4:14, 4:14] = 1
    lab[:, 12:20, 12:20, 12:20] = 2
    return lab


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Images, label maps, a shape bank, a UNet model directory and a segmentation model directory."""
    d = tmp_path_factory.mktemp("inputs")
    aff = np.diag([1.5, 1.5, 1.5, 1.0])
    lab = labels_cube()
    img = lab.float() * 40 + torch.rand(lab.shape) * 5
    io.save(Volume(img, aff), d / "img.nii.gz")
    io.save(Volume(lab, aff), d / "lab.nii.gz", labels=True)
    io.save(Volume(img[:, :, :, 10:12].contiguous(), aff), d / "thin.nii.gz")
    io.save(Volume(lab[:, :, :, 10:12].contiguous(), aff), d / "thin_lab.nii.gz", labels=True)
    io.save(Volume(torch.rand(1, 2, 2, 2), aff), d / "cube2.nii.gz")
    unet = build_model("tiny", seed=0)
    save_model(unet, d / "unet")
    net = SegmentationNet(build_model("tiny", seed=1), unet.out_channels, 3)
    with torch.no_grad():  # every voxel becomes class 2, id 3,000,000,000
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor([0.0, 0.0, 50.0]))
    meta = SegmentationMeta(label_ids=[0, 1_500_000_000, 3_000_000_000], spacing=[1.5, 1.5, 1.5],
                            patch_size=[32, 32, 32], feature_channels=unet.out_channels,
                            normalisation={"method": "percentile", "modality": "mr", "percentiles": [0.5, 99.5]})
    save_model_dir(net, meta, d / "segmodel")
    return d


# ---------------------------------------------------------------------------------------------------
# Outputs that cannot be written: refused at once, before the work, for every writing command


def writing_commands(d, out_file: str, out_dir: str) -> dict[str, list[str]]:
    """Each writing command with valid inputs, writing to ``out_file`` (a file) or ``out_dir`` (a folder)."""
    return {
        "synth": ["synth", "--out", out_dir, "--n", "1", "--size", "16", "--device", "cpu"],
        "shapes": ["shapes", str(d / "lab.nii.gz"), "--out", out_file + ".npz", "--device", "cpu"],
        "features": ["features", str(d / "img.nii.gz"), "--out", out_file, "--weights", str(d / "unet"), "--device", "cpu"],
        "segment": ["segment", str(d / "img.nii.gz"), "--model", str(d / "segmodel"), "--out", out_file, "--device", "cpu"],
        "finetune": ["finetune", "--image", str(d / "img.nii.gz"), "--label", str(d / "lab.nii.gz"), "--out", out_dir,
                     "--init", "random", "--variant", "tiny", "--steps", "1", "--patch", "32", "--device", "cpu"],
        "pretrain": ["pretrain", "--config", "tiny", "steps=1", "progress=false", "--out", out_dir, "--device", "cpu"],
        "apply": ["apply", str(d / "img.nii.gz"), "--warp", str(d / "no_warp_needed.nii.gz"), "--out", out_file],
        "register": ["register", str(d / "img.nii.gz"), str(d / "img.nii.gz"), "--out", out_dir, "--features", "mind",
                     "--device", "cpu"],
        "demo": ["demo", "--out", out_dir, "--features", "mind", "--device", "cpu"],
    }


@pytest.fixture
def no_work(monkeypatch):
    """Make the expensive part of every command fail the test if it is reached."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the command started working before checking its output")

    import synthvox.segmentation as segmentation
    import synthvox.shapes.bank as bank
    import synthvox.synth.engine as engine

    pretrain = importlib.import_module("synthvox.train.pretrain")  # the package exports a function of that name
    monkeypatch.setattr(engine.SynthEngine, "__init__", forbidden)
    monkeypatch.setattr(bank, "build_bank", forbidden)
    monkeypatch.setattr("synthvox.models.extract.image_features", forbidden)
    monkeypatch.setattr(segmentation, "segment", forbidden)
    monkeypatch.setattr(segmentation, "segment_files", forbidden)
    monkeypatch.setattr(segmentation, "finetune", forbidden)
    monkeypatch.setattr(pretrain, "build_module", forbidden)
    monkeypatch.setattr("synthvox.registration.pipeline.register", forbidden)
    monkeypatch.setattr("synthvox.demo.run_demo", forbidden)


WRITERS = ["synth", "shapes", "features", "segment", "finetune", "pretrain", "apply", "register", "demo"]


@pytest.mark.parametrize("command", WRITERS)
def test_output_under_a_file_is_refused_before_work(inputs, tmp_path, no_work, command):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    args = writing_commands(inputs, str(blocker / "sub" / "out.nii.gz"), str(blocker / "sub" / "run"))[command]
    line = one_line_error(runner.invoke(app, args))
    assert "cannot write" in line and "a_file" in line
    assert tree(tmp_path) == ["a_file"]


@pytest.mark.parametrize("command", WRITERS)
def test_folder_without_write_permission_is_refused_before_work(inputs, tmp_path, no_work, monkeypatch, command):
    # Tests may run as root, which ignores permission bits: make creating a file fail the way it
    # does for a read-only folder.
    real = tempfile.mkstemp

    def denied(*args, **kwargs):
        if str(kwargs.get("dir", "")).startswith(str(tmp_path)):
            raise PermissionError(13, "Permission denied")
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    args = writing_commands(inputs, str(tmp_path / "new" / "out.nii.gz"), str(tmp_path / "new" / "run"))[command]
    line = one_line_error(runner.invoke(app, args))
    assert "cannot write" in line and "Permission denied" in line
    assert tree(tmp_path) == []


# ---------------------------------------------------------------------------------------------------
# Option values: NaN, infinite and out of range, for every float option


VALID = {("segment --overlap", "0"), ("features --ct-window", "0"), ("features --ct-window", "-1")}


@pytest.mark.parametrize("command,value", [
    (c, v) for c in ["shapes --spacing", "finetune --spacing", "finetune --lr", "segment --overlap", "features --ct-window"]
    for v in ["nan", "inf", "-inf", "0", "-1"] if (c, v) not in VALID])  # valid values left out, not skipped
def test_non_finite_or_out_of_range_option_values(inputs, tmp_path, command, value):
    name, option = command.split()
    d = inputs
    out = str(tmp_path / "out")
    args = writing_commands(d, out + ".nii.gz", out)[name]
    given = f"-1000,{value}" if option == "--ct-window" else value
    line = one_line_error(runner.invoke(app, [*args, option, given]))
    assert option in line
    assert tree(tmp_path) == []


BAD_OPTIONS = {
    "features": [["--modality", "pet"], ["--patch", "4"], ["--ct-window", "5,1"]],
    "segment": [["--overlap", "1.5"]],
    "finetune": [["--steps", "0"], ["--lr", "nan"], ["--train", "encoder"], ["--modality", "pet"], ["--batch", "0"]],
    "shapes": [["--spacing", "nan"], ["--min-voxels", "0"], ["--max-extent", "1"]],
    "synth": [["--n", "0"], ["--size", "7"], ["--batch", "0"], ["--preview", "0"]],
}


@pytest.mark.parametrize("command,option", [(c, o) for c, opts in BAD_OPTIONS.items() for o in opts],
                         ids=lambda v: v if isinstance(v, str) else "=".join(v))
def test_bad_option_values_are_refused_before_any_input_is_read(tmp_path, command, option):
    """With every input missing, the error names the option: options are checked first."""
    missing = str(tmp_path / "missing.nii.gz")
    args = {
        "features": ["features", missing, "--out", str(tmp_path / "f.nii.gz")],
        "segment": ["segment", missing, "--model", str(tmp_path / "nomodel"), "--out", str(tmp_path / "s.nii.gz")],
        "finetune": ["finetune", "--image", missing, "--label", missing, "--out", str(tmp_path / "m")],
        "shapes": ["shapes", missing, "--out", str(tmp_path / "b.npz")],
        "synth": ["synth", "--out", str(tmp_path / "s"), "--shapes", str(tmp_path / "missing.npz")],
    }[command]
    line = one_line_error(runner.invoke(app, [*args, *option]))
    assert option[0] in line
    assert tree(tmp_path) == []


# ---------------------------------------------------------------------------------------------------
# Label ids that do not fit 32 bits: every writer keeps them exactly


BIG_IDS = [0, 70_000, 2**31 - 1, 2**31, 3_000_000_000, 2**32 + 5, 2**53 + 1, 2**62 + 3]


def test_apply_labels_keeps_ids_beyond_int32(tmp_path):
    """``apply --labels`` (and register's moved labels: the same nearest-neighbour path and writer)."""
    aff = make_affine(spacing=(1.0, 1.5, 2.0))
    lab = torch.zeros(1, 10, 12, 8, dtype=torch.int64)
    for i, v in enumerate(BIG_IDS):
        lab[:, i] = v
    io.save(Volume(lab, aff), tmp_path / "lab.nii.gz", labels=True)
    io.save(Volume(torch.zeros(3, 10, 12, 8), aff), tmp_path / "warp.nii.gz", vector=True)  # identity
    r = runner.invoke(app, ["apply", str(tmp_path / "lab.nii.gz"), "--warp", str(tmp_path / "warp.nii.gz"),
                            "--labels", "--out", str(tmp_path / "moved.nii.gz"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    moved = io.load_labels(tmp_path / "moved.nii.gz")
    assert torch.equal(moved.data, lab)


def test_segment_writes_ids_beyond_int32(inputs, tmp_path):
    r = runner.invoke(app, ["segment", str(inputs / "img.nii.gz"), "--model", str(inputs / "segmodel"),
                            "--out", str(tmp_path / "seg.nii.gz"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    seg = np.asanyarray(nib.load(str(tmp_path / "seg.nii.gz")).dataobj)
    assert (seg == 3_000_000_000).all()  # written exactly, not wrapped to a negative int32
    assert "3000000000" in r.output


def _warp_affine(kind: str) -> np.ndarray:
    a = np.diag([2.0, 2.0, 2.0, 1.0])
    if kind == "collinear":
        a[:3, 2] = a[:3, 0]
    elif kind == "zero axis":
        a[2, 2] = 0.0
    elif kind == "nan":
        a[0, 3] = np.nan
    elif kind == "tiny voxels":
        a[:3, :3] *= 1e-9
    return a


@pytest.mark.parametrize("kind", ["collinear", "zero axis", "nan", "tiny voxels"])
def test_warp_with_degenerate_geometry_is_refused(inputs, tmp_path, kind):
    arr = np.zeros((8, 8, 8, 1, 3), np.float32)
    img = nib.Nifti1Image(arr, None)
    img.header.set_sform(_warp_affine(kind), code=1)
    img.header.set_intent("vector", (), "")
    nib.save(img, str(tmp_path / "warp.nii.gz"))
    line = one_line_error(runner.invoke(app, ["apply", str(inputs / "img.nii.gz"), "--warp", str(tmp_path / "warp.nii.gz"),
                                              "--out", str(tmp_path / "moved.nii.gz")]))
    assert "warp" in line and ("affine" in line or "voxel sizes" in line)
    assert not (tmp_path / "moved.nii.gz").exists()


# ---------------------------------------------------------------------------------------------------
# Model-directory metadata of the wrong JSON type or version


def _broken_copy(src, dst, name, change):
    shutil.copytree(src, dst)
    doc = json.loads((dst / name).read_text())
    change(doc)
    (dst / name).write_text(json.dumps(doc))
    return dst


SEG_CHANGES = {
    "version string": lambda d: d.update(version="1"),
    "version newer": lambda d: d.update(version=99),
    "version null": lambda d: d.update(version=None),
    "ids a string": lambda d: d.update(label_ids="12"),
    "ids booleans": lambda d: d.update(label_ids=[False, True]),
    "ids negative": lambda d: d.update(label_ids=[-1, 3]),
    "ids unsorted": lambda d: d.update(label_ids=[3, 0]),
    "spacing nan": lambda d: d.update(spacing=[math.nan, 1.0, 1.0]),
    "spacing short": lambda d: d.update(spacing=[1.5, 1.5]),
    "patch fractional": lambda d: d.update(patch_size=[32.5, 32, 32]),
    "channels a string": lambda d: d.update(feature_channels="16"),
    "normalisation a list": lambda d: d.update(normalisation=[1, 2]),
    "percentiles reversed": lambda d: d["normalisation"].update(percentiles=[99.5, 0.5]),
    "history a string": lambda d: d.update(history="x"),
    "whole file a list": lambda d: (d.clear(), d.update(format=[1])),
}


@pytest.mark.parametrize("case", list(SEG_CHANGES))
def test_segmentation_metadata_of_wrong_type(inputs, tmp_path, case):
    model = _broken_copy(inputs / "segmodel", tmp_path / "m", "segmentation.json", SEG_CHANGES[case])
    line = one_line_error(runner.invoke(app, ["segment", str(inputs / "img.nii.gz"), "--model", str(model),
                                              "--out", str(tmp_path / "s.nii.gz"), "--device", "cpu"]))
    assert "segmentation" in line
    assert not (tmp_path / "s.nii.gz").exists()


UNET_CHANGES = {
    "version string": lambda d: d.update(version="1"),
    "version float": lambda d: d.update(version=1.5),
    "version newer": lambda d: d.update(version=2),
    "architecture a list": lambda d: d.update(architecture=[16, 4]),
    "channels a string": lambda d: d["architecture"].update(base_channels="16"),
    "channels huge": lambda d: d["architecture"].update(base_channels=10**9),
    "levels huge": lambda d: d["architecture"].update(levels=1000),
    "norm a number": lambda d: d["architecture"].update(norm=3),
    "unknown key": lambda d: d["architecture"].update(depth=3),
    "checksum a number": lambda d: d.update(sha256=5),
}


@pytest.mark.parametrize("case", list(UNET_CHANGES))
def test_unet_metadata_of_wrong_type(inputs, tmp_path, case):
    model = _broken_copy(inputs / "unet", tmp_path / "m", "config.json", UNET_CHANGES[case])
    line = one_line_error(runner.invoke(app, ["features", str(inputs / "img.nii.gz"), "--weights", str(model),
                                              "--out", str(tmp_path / "f.nii.gz"), "--device", "cpu"]))
    assert "config.json" in line or "newer" in line
    assert not (tmp_path / "f.nii.gz").exists()


def test_shape_bank_metadata_of_wrong_type(inputs, tmp_path):
    r = runner.invoke(app, ["shapes", str(inputs / "lab.nii.gz"), "--out", str(tmp_path / "ok.npz"), "--min-voxels", "8",
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    changes = {"version": {"version": "1"}, "newer": {"version": 99}, "spacing": {"spacing": "2"},
               "nan": {"spacing": math.nan}, "meta": {"meta": [1]}}
    for name, change in changes.items():
        with np.load(tmp_path / "ok.npz") as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays["meta"].astype(np.uint8).tobytes().decode())
        meta.update(change)
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        np.savez(tmp_path / f"{name}.npz", **arrays)
        line = one_line_error(runner.invoke(app, ["synth", "--out", str(tmp_path / "s"), "--n", "1", "--size", "16",
                                                  "--shapes", str(tmp_path / f"{name}.npz"), "--device", "cpu"]))
        assert "shape bank" in line, name
    assert not (tmp_path / "s").exists()


@pytest.fixture(scope="module")
def finetuned(inputs, tmp_path_factory):
    """A model directory with its checkpoint, from two finetuning steps."""
    out = tmp_path_factory.mktemp("finetuned") / "m"
    args = [*writing_commands(inputs, "", str(out))["finetune"], "--steps", "2"]
    assert runner.invoke(app, args).exit_code == 0
    return out


@pytest.mark.parametrize("change", [{"step": "1"}, {"step": -3}, {"compat": [1]}, {"best_val_dice": "high"}, None])
def test_finetune_checkpoint_metadata_of_wrong_type(inputs, finetuned, tmp_path, change):
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = shutil.copytree(finetuned, tmp_path / "m")
    (ckpt,) = sorted((out / "checkpoints").glob("*.safetensors"))[-1:]
    with safe_open(str(ckpt), framework="pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    text = "[1, 2]" if change is None else json.dumps({**json.loads(header["state"]), **change})
    save_file(tensors, str(ckpt), metadata={**header, "state": text})  # the digest covers the tensors only
    r = runner.invoke(app, [*writing_commands(inputs, "", str(out))["finetune"], "--steps", "4", "--resume"])
    assert "checkpoint" in one_line_error(r)


# ---------------------------------------------------------------------------------------------------
# Volumes two voxels thick, and 2x2x2: each command works or says why, in one line


@pytest.mark.parametrize("image", ["thin", "cube2"])
def test_thin_volumes_in_every_image_command(inputs, tmp_path, image):
    d = inputs
    src = d / f"{image}.nii.gz"
    vol = io.load(src)
    r = runner.invoke(app, ["features", str(src), "--weights", str(d / "unet"), "--out", str(tmp_path / "f.nii.gz"),
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert io.load(tmp_path / "f.nii.gz", allow_4d=True).shape == vol.shape
    r = runner.invoke(app, ["segment", str(src), "--model", str(d / "segmodel"), "--out", str(tmp_path / "s.nii.gz"),
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert io.load_labels(tmp_path / "s.nii.gz").shape == vol.shape


@pytest.mark.parametrize("image", ["thin", "cube2", "thick4"])
def test_thin_volumes_in_register_work_or_are_refused_in_one_line(inputs, tmp_path, image):
    if image == "thick4":
        vol = io.load(inputs / "img.nii.gz")
        io.save(Volume(vol.data[:, :, :, 8:12].contiguous(), vol.affine), tmp_path / "thick4.nii.gz")
        src = str(tmp_path / "thick4.nii.gz")
    else:
        src = str(inputs / f"{image}.nii.gz")
    for k, (fixed, moving) in enumerate(((src, str(inputs / "img.nii.gz")), (str(inputs / "img.nii.gz"), src))):
        out = tmp_path / f"r{k}"
        r = runner.invoke(app, ["register", fixed, moving, "--out", str(out), "--features", "mind", "--device", "cpu",
                                "--quiet"])
        if r.exit_code != 0:
            assert "too" in one_line_error(r)
            assert not out.exists()


def test_thin_label_maps_in_shapes_and_finetune(inputs, tmp_path):
    d = inputs
    r = runner.invoke(app, ["shapes", str(d / "thin_lab.nii.gz"), "--out", str(tmp_path / "b.npz"), "--min-voxels", "4",
                            "--spacing", "1.5", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["finetune", "--image", str(d / "thin.nii.gz"), "--label", str(d / "thin_lab.nii.gz"),
                            "--out", str(tmp_path / "m"), "--init", "random", "--variant", "tiny", "--steps", "1",
                            "--patch", "32", "--device", "cpu"])
    assert r.exit_code == 0, r.output


# ---------------------------------------------------------------------------------------------------
# Failed and interrupted runs leave nothing behind


class _Boom:
    def __init__(self, exc: BaseException, after: int = 0) -> None:
        self.exc, self.after, self.calls = exc, after, 0

    def __call__(self, real):
        def wrapped(*args, **kwargs):
            self.calls += 1
            if self.calls > self.after:
                raise self.exc
            return real(*args, **kwargs)

        return wrapped


OOM = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB")


@pytest.mark.parametrize("exc,code", [(OOM, 2), (KeyboardInterrupt(), 130)])
def test_synth_failure_or_ctrl_c_leaves_no_partial_samples(tmp_path, monkeypatch, exc, code):
    from synthvox.synth.engine import SynthEngine

    monkeypatch.setattr(SynthEngine, "batch", _Boom(exc, after=1)(SynthEngine.batch))
    out = tmp_path / "new" / "synth"
    r = runner.invoke(app, ["synth", "--out", str(out), "--n", "3", "--batch", "1", "--size", "16", "--device", "cpu",
                            "--shapes", "none"])
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    assert tree(tmp_path) == []  # not even the folder


DISK_FULL = OSError(28, "No space left on device")


@pytest.mark.parametrize("command", ["synth", "shapes", "features", "segment", "finetune", "pretrain"])
def test_disk_full_while_writing_is_one_line_and_leaves_nothing(inputs, tmp_path, monkeypatch, command):
    """A write that fails half-way (here: every atomic write) is reported in one line, and the
    command leaves neither partial files nor the folders it made."""

    @contextlib.contextmanager
    def full(path):
        raise DISK_FULL
        yield  # pragma: no cover

    monkeypatch.setattr(files, "atomic_path", full)
    args = writing_commands(inputs, str(tmp_path / "new" / "out.nii.gz"), str(tmp_path / "new" / "run"))[command]
    line = one_line_error(runner.invoke(app, args))
    assert "No space left on device" in line
    assert tree(tmp_path) == []


def test_synth_failure_keeps_an_earlier_complete_run(tmp_path, monkeypatch):
    from synthvox.synth.engine import SynthEngine

    out = tmp_path / "synth"
    args = ["synth", "--out", str(out), "--n", "2", "--size", "16", "--device", "cpu", "--shapes", "none"]
    assert runner.invoke(app, args).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(SynthEngine, "batch", _Boom(KeyboardInterrupt())(SynthEngine.batch))
    assert runner.invoke(app, [*args, "--force", "--seed", "5"]).exit_code == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_bad_shapes_file_leaves_no_folder(inputs, tmp_path):
    out = tmp_path / "synth"
    line = one_line_error(runner.invoke(app, ["synth", "--out", str(out), "--n", "1", "--size", "16",
                                              "--shapes", str(inputs / "lab.nii.gz"), "--device", "cpu"]))
    assert "shape bank" in line
    assert not out.exists()


@pytest.mark.parametrize("exc,code", [(OOM, 2), (KeyboardInterrupt(), 130)])
def test_pretrain_failure_leaves_nothing_that_blocks_the_next_run(tmp_path, monkeypatch, exc, code):
    pretrain = importlib.import_module("synthvox.train.pretrain")
    real = pretrain.build_engine

    def failing_engine(cfg, device):
        engine = real(cfg, device)
        engine.batch = _Boom(exc)(engine.batch)
        return engine

    monkeypatch.setattr(pretrain, "build_engine", failing_engine)
    run = tmp_path / "run"
    args = ["pretrain", "--config", "tiny", "steps=2", "progress=false", "--out", str(run), "--device", "cpu"]
    r = runner.invoke(app, args)
    assert r.exit_code == code, r.output
    if code == 2:
        assert "out of memory" in one_line_error(r)
    assert not run.exists()
    run.mkdir()  # an empty folder the user made stays, and stays empty
    assert runner.invoke(app, args).exit_code == code
    assert tree(run) == []
    monkeypatch.setattr(pretrain, "build_engine", real)
    r = runner.invoke(app, ["pretrain", "--config", "tiny", "steps=1", "progress=false", "--out", str(run), "--device", "cpu"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("exc,code", [(OOM, 2), (KeyboardInterrupt(), 130)])
def test_finetune_failure_before_a_checkpoint_leaves_nothing(inputs, tmp_path, monkeypatch, exc, code):
    import synthvox.segmentation.loop as loop

    monkeypatch.setattr(loop, "draw_batch", _Boom(exc)(loop.draw_batch))
    out = tmp_path / "models" / "m"
    r = runner.invoke(app, writing_commands(inputs, "", str(out))["finetune"])
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    assert tree(tmp_path) == []


# ---------------------------------------------------------------------------------------------------
# Messages


def test_features_reports_its_channel_count(inputs, tmp_path):
    r = runner.invoke(app, ["features", str(inputs / "thin.nii.gz"), "--weights", str(inputs / "unet"),
                            "--out", str(tmp_path / "f.nii.gz"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    channels = build_model("tiny").out_channels
    assert f"wrote {channels} feature channels of 24x24x2 voxels" in r.output
    assert nib.load(str(tmp_path / "f.nii.gz")).shape == (24, 24, 2, channels)


def test_version():
    from synthvox import __version__

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"synthvox {__version__}"
