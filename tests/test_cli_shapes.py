"""``synthvox shapes`` through Typer's runner."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import typer.main
from conftest import make_affine
from typer.testing import CliRunner

from synthvox import io
from synthvox.cli import app
from synthvox.shapes import ShapeBank

runner = CliRunner()


def invoke(*args: str):
    # While "shapes" is the app's only subcommand Typer runs it as the whole app (no name to type).
    group = hasattr(typer.main.get_command(app), "list_commands")
    return runner.invoke(app, ["shapes", *args] if group else list(args))


def one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def blobs(shape=(20, 18, 16)) -> torch.Tensor:
    x, y, z = torch.meshgrid(*[torch.arange(float(s)) for s in shape], indexing="ij")
    lab = torch.zeros(shape, dtype=torch.int64)
    lab[((x - 6) / 4) ** 2 + ((y - 6) / 4) ** 2 + ((z - 8) / 5) ** 2 < 1] = 4
    lab[((x - 14) / 4) ** 2 + ((y - 12) / 5) ** 2 + ((z - 8) / 4) ** 2 < 1] = 9
    return lab[None]


@pytest.fixture
def maps(tmp_path):
    a = io.save(blobs(), tmp_path / "a.nii.gz", make_affine(), labels=True)
    b = io.save(blobs().flip(1), tmp_path / "b.nii", make_affine(spacing=(2.0, 1.0, 1.0), angles=(0.1, 0.5, -0.3)), labels=True)
    return [a, b]


def test_shapes_writes_a_bank(maps, tmp_path):
    out = tmp_path / "bank.npz"
    result = invoke(*map(str, maps), "--out", str(out), "--spacing", "1.5", "--min-voxels", "10", "--device", "cpu")
    assert result.exit_code == 0, result.output
    bank = ShapeBank.load(out)
    assert len(bank) == 4 and bank.spacing == 1.5
    assert bank.prepared is not None and bank.prepared["bits"].shape[0] == 4  # ready for the engine
    assert [(p["source"].split("/")[-1], p["label"]) for p in bank.provenance] == [
        ("a.nii.gz", 4),
        ("a.nii.gz", 9),
        ("b.nii", 4),
        ("b.nii", 9),
    ]
    summary = [ln for ln in result.stdout.splitlines() if ln.strip()]
    assert len(summary) == 1 and "4 templates" in summary[0] and "2 label map" in summary[0] and "MB" in summary[0]


def test_shapes_refuses_to_overwrite_without_force(maps, tmp_path):
    out = tmp_path / "bank.npz"
    out.write_bytes(b"keep me")
    msg = one_line_error(invoke(str(maps[0]), "--out", str(out), "--device", "cpu", "--min-voxels", "10"))
    assert "--force" in msg and out.read_bytes() == b"keep me"
    result = invoke(str(maps[0]), "--out", str(out), "--device", "cpu", "--min-voxels", "10", "--force")
    assert result.exit_code == 0, result.output
    assert len(ShapeBank.load(out)) == 2


def _bad_inputs(tmp_path, good):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    image = io.save(torch.rand(1, 16, 16, 16) * 100, tmp_path / "t1.nii.gz", np.eye(4))
    empty = io.save(torch.zeros(1, 16, 16, 16, dtype=torch.int64), tmp_path / "empty.nii.gz", np.eye(4), labels=True)
    flat = io.save(torch.ones(1, 16, 16, 1, dtype=torch.int64), tmp_path / "flat.nii.gz", np.eye(4), labels=True)
    four = io.save(torch.ones(3, 16, 16, 16, dtype=torch.int64), tmp_path / "four.nii.gz", np.eye(4), labels=True)
    return {
        "missing": ([str(tmp_path / "nope.nii.gz")], "not found"),
        "not nifti": ([str(text)], "not in a format synthvox reads"),
        "image": ([str(image)], "not a label map"),
        "empty": ([str(good), str(empty)], "empty"),
        "2D": ([str(flat)], "3D"),
        "4D": ([str(four)], "3D"),
    }


@pytest.mark.parametrize("case", ["missing", "not nifti", "image", "empty", "2D", "4D"])
def test_shapes_bad_input_is_one_line_error(case, maps, tmp_path):
    args, expected = _bad_inputs(tmp_path, maps[0])[case]
    out = tmp_path / "bank.npz"
    msg = one_line_error(invoke(*args, "--out", str(out), "--device", "cpu"))
    assert expected in msg
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bank.npz")]  # no partial output


def test_shapes_bad_options(maps, tmp_path):
    assert "npz" in one_line_error(invoke(str(maps[0]), "--out", str(tmp_path / "bank.nii.gz")))
    assert "spacing" in one_line_error(invoke(str(maps[0]), "--out", str(tmp_path / "b.npz"), "--spacing", "0"))
    msg = one_line_error(invoke(str(maps[0]), "--out", str(tmp_path / "b.npz"), "--min-voxels", "100000"))
    assert "--min-voxels" in msg
    assert not (tmp_path / "b.npz").exists()
