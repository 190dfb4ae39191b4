"""``synthvox register`` and ``synthvox apply`` through Typer's runner."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import torch
from conftest import make_affine
from test_registration import phantom, warped_pair
from typer.testing import CliRunner

from synthvox import io
from synthvox.cli import app
from synthvox.volume import Volume

runner = CliRunner()


def _files(tmp_path):
    img = phantom(32)
    moving, _ = warped_pair(img, amp=1.5)
    aff = make_affine(spacing=(2.0, 2.0, 2.0), angles=(0.1, 0.0, 0.2), origin=(-30.0, -30.0, -30.0))
    maff = aff.copy()
    maff[:3, 3] += (10.0, -6.0, 4.0)  # header offset
    paths = {
        "fixed": io.save(Volume(img, aff), tmp_path / "fixed.nii.gz"),
        "moving": io.save(Volume(moving, maff), tmp_path / "moving.nii.gz"),
        "mlab": io.save(Volume((moving > 0.2).long() * 3 + (moving > 0.55).long() * 40, maff), tmp_path / "mlab.nii.gz", labels=True),
        "flab": io.save(Volume((img > 0.2).long() * 3 + (img > 0.55).long() * 40, aff), tmp_path / "flab.nii.gz", labels=True),
    }
    return paths


def test_register_writes_outputs_and_refuses_overwrite(tmp_path):
    p = _files(tmp_path)
    out = tmp_path / "reg"
    args = ["register", str(p["fixed"]), str(p["moving"]), "--out", str(out), "--moving-labels", str(p["mlab"]),
            "--fixed-labels", str(p["flab"]), "--device", "cpu", "--seed", "1"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    for name in ("moved.nii.gz", "warp.nii.gz", "moved_labels.nii.gz", "qc.png", "report.json"):
        assert (out / name).is_file(), name
    rep = json.loads((out / "report.json").read_text())
    assert rep["folding_percent"] < 1.0
    assert set(rep["dice"]) == {"3", "43"}
    assert rep["mean_dice"] > 0.7
    assert rep["seed"] == 1 and "total" in rep["seconds"]
    warp = nib.load(str(out / "warp.nii.gz"))
    assert warp.shape == (32, 32, 32, 1, 3) and warp.header.get_intent()[0] == "vector"
    assert np.allclose(warp.affine, nib.load(str(p["fixed"])).affine, atol=1e-4)
    ml = nib.load(str(out / "moved_labels.nii.gz"))
    assert set(np.unique(np.asarray(ml.dataobj)).tolist()) <= {0, 3, 43}
    assert (out / "qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = (out / "moved.nii.gz").stat().st_mtime_ns
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "--force" in r.output
    assert (out / "moved.nii.gz").stat().st_mtime_ns == before

    # apply the saved warp to the label map: same as moved_labels
    r = runner.invoke(app, ["apply", str(p["mlab"]), "--warp", str(out / "warp.nii.gz"), "--out",
                            str(tmp_path / "applied.nii.gz"), "--labels", "--fixed", str(p["fixed"])])
    assert r.exit_code == 0, r.output
    applied = np.asarray(nib.load(str(tmp_path / "applied.nii.gz")).dataobj)
    assert np.array_equal(applied, np.asarray(ml.dataobj))
    r = runner.invoke(app, ["apply", str(p["moving"]), "--warp", str(out / "warp.nii.gz"), "--out",
                            str(tmp_path / "applied_img.nii.gz")])
    assert r.exit_code == 0, r.output
    a = np.asarray(nib.load(str(tmp_path / "applied_img.nii.gz")).dataobj)
    b = np.asarray(nib.load(str(out / "moved.nii.gz")).dataobj)
    assert np.abs(a - b).max() < 1e-4


def _err(args):
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    return lines[0]


def test_bad_inputs_give_one_line_errors(tmp_path):
    p = _files(tmp_path)
    out = str(tmp_path / "o")
    assert "not found" in _err(["register", str(tmp_path / "nope.nii.gz"), str(p["moving"]), "--out", out])
    flat = io.save(Volume(torch.rand(1, 20, 20, 1), np.eye(4)), tmp_path / "flat.nii.gz")
    assert "3D" in _err(["register", str(p["fixed"]), str(flat), "--out", out])
    other = io.save(Volume(torch.zeros(1, 30, 32, 32, dtype=torch.long), np.eye(4)), tmp_path / "other.nii.gz", labels=True)
    assert "grid" in _err(["register", str(p["fixed"]), str(p["moving"]), "--out", out, "--moving-labels", str(other)])
    far = Volume(phantom(32), make_affine(origin=(900.0, 0.0, 0.0)))
    farp = io.save(far, tmp_path / "far.nii.gz")
    assert "overlap" in _err(["register", str(p["fixed"]), str(farp), "--out", out, "--init", "none"])
    msg = _err(["register", str(p["fixed"]), str(p["moving"]), "--out", out, "--features", "net",
                "--weights", str(tmp_path / "no_such_model")])
    assert "no_such_model" in msg
    assert "unknown --features" in _err(["register", str(p["fixed"]), str(p["moving"]), "--out", out, "--features", "sift"])
    assert not (tmp_path / "o" / "moved.nii.gz").exists()
    assert "warp" in _err(["apply", str(p["moving"]), "--warp", str(p["fixed"]), "--out", str(tmp_path / "x.nii.gz")])
    # a non-NIfTI output name is refused before the warp is read or applied
    assert "NIfTI" in _err(["apply", str(p["moving"]), "--warp", str(p["fixed"]), "--out", str(tmp_path / "x.png")])
