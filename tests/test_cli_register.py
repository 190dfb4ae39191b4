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
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"outer": 3, "inner": 43}))
    r = runner.invoke(app, [*args, "--label-names", str(names)])
    assert r.exit_code == 0, r.output
    for name in ("moved.nii.gz", "warp.nii.gz", "affine.txt", "deformable_warp.nii.gz", "inverse_warp.nii.gz",
                 "moved_labels.nii.gz", "qc.png", "report.json"):
        assert (out / name).is_file(), name
    # progress per stage on stderr, the summary on stdout
    for stage in ("init", "features", "affine", "convex", "adam", "compose"):
        assert any(line.strip().startswith(stage) for line in r.stderr.splitlines()), (stage, r.stderr)
    assert "wrote" in r.stdout and "init" not in r.stdout
    rep = json.loads((out / "report.json").read_text())
    import synthvox

    assert rep["synthvox_version"] == synthvox.__version__
    assert rep["label_names"] == {"3": "outer", "43": "inner"}
    assert set(rep["dice_by_name"]) == {"outer", "inner"}
    assert rep["initial_choice"] in [c["name"] for c in rep["initial_candidates"]]
    assert rep["folding_percent"] < 1.0
    assert set(rep["dice"]) == {"3", "43"}
    from synthvox.registration import RegistrationConfig

    assert rep["config"]["spacing"] == RegistrationConfig().spacing  # no --spacing: the solver's default
    assert rep["mean_dice"] > 0.7
    assert rep["seed"] == 1 and "total" in rep["seconds"]
    warp = nib.load(str(out / "warp.nii.gz"))
    assert warp.shape == (32, 32, 32, 1, 3) and warp.header.get_intent()[0] == "vector"
    assert np.allclose(warp.affine, nib.load(str(p["fixed"])).affine, atol=1e-4)
    ml = nib.load(str(out / "moved_labels.nii.gz"))
    assert set(np.unique(np.asarray(ml.dataobj)).tolist()) <= {0, 3, 43}
    assert (out / "qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = (out / "moved.nii.gz").stat().st_mtime_ns
    r = runner.invoke(app, [*args, "--label-names", str(names)])
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
    for bad in ("nan", "inf", "0", "-1"):
        assert "--spacing" in _err(["register", str(p["fixed"]), str(p["moving"]), "--out", out, "--spacing", bad])
    assert not (tmp_path / "o" / "moved.nii.gz").exists()
    assert "warp" in _err(["apply", str(p["moving"]), "--warp", str(p["fixed"]), "--out", str(tmp_path / "x.nii.gz")])
    # a non-NIfTI output name is refused before the warp is read or applied
    assert "NIfTI" in _err(["apply", str(p["moving"]), "--warp", str(p["fixed"]), "--out", str(tmp_path / "x.png")])


def test_register_features_auto_and_weights_hash(tmp_path):
    """``--features auto`` resolves as in ``demo``; with network features the report holds the sha256 of
    the weights file used."""
    import hashlib

    from synthvox.models import build_model, save_model
    from synthvox.registration.network import resolve_features

    p = _files(tmp_path)
    out = tmp_path / "auto"
    r = runner.invoke(app, ["register", str(p["fixed"]), str(p["moving"]), "--out", str(out), "--features", "auto",
                            "--no-deformable", "--device", "cpu", "--quiet"])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["features"] == resolve_features("auto")
    assert r.stderr.strip() == "" or all(line.startswith("warning:") for line in r.stderr.strip().splitlines())
    model = tmp_path / "model"
    save_model(build_model("tiny", seed=0), model)
    out = tmp_path / "net"
    r = runner.invoke(app, ["register", str(p["fixed"]), str(p["moving"]), "--out", str(out), "--features", "net",
                            "--weights", str(model), "--no-deformable", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    want = hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
    assert rep["weights"]["sha256"] == want


def test_bad_label_names_are_one_line_errors(tmp_path):
    p = _files(tmp_path)
    out = tmp_path / "o"
    bad = tmp_path / "bad.json"
    for text, what in (("[1, 2]", "JSON object"), ("{not json", "JSON"), ('{"a": "x"}', "whole-number")):
        bad.write_text(text)
        assert what in _err(["register", str(p["fixed"]), str(p["moving"]), "--out", str(out), "--label-names", str(bad)])
    assert not out.exists()
