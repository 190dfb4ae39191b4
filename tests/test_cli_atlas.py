"""``synthvox segment --atlas-image I --atlas-label L``: training-free segmentation from the command line."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from test_atlas import labels_of, mean_dice
from test_cli_mistakes import one_line_error
from test_registration import phantom, warped_pair
from typer.testing import CliRunner

from synthvox import io
from synthvox.cli import app
from synthvox.volume import Volume

runner = CliRunner()
AFF = np.diag([1.0, 1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("atlas_cli")
    img = phantom(32)
    target, _ = warped_pair(img, amp=2.5)
    io.save(Volume(img * 1000, AFF), d / "atlas1.nii.gz")
    io.save(Volume(labels_of(img), AFF), d / "atlas1_seg.nii.gz", labels=True)
    inverted = (img.max() - img) * (img > 0)
    io.save(Volume(inverted * 300, AFF), d / "atlas2.nii.gz")  # another contrast
    io.save(Volume(labels_of(img), AFF), d / "atlas2_seg.nii.gz", labels=True)
    (d / "targets").mkdir()
    io.save(Volume(target * 900, AFF), d / "targets" / "case_a.nii.gz")
    io.save(Volume(torch.roll(target, 1, dims=1) * 900, AFF), d / "targets" / "case_b.nii.gz")
    io.save(Volume(labels_of(target), AFF), d / "target_seg.nii.gz", labels=True)
    io.save(Volume(labels_of(img)[:, :20], AFF), d / "offgrid_seg.nii.gz", labels=True)
    return d


def atlas_args(d, n=2):
    out = []
    for i in range(1, n + 1):
        out += ["--atlas-image", str(d / f"atlas{i}.nii.gz"), "--atlas-label", str(d / f"atlas{i}_seg.nii.gz")]
    return out


def test_segment_with_atlases_writes_labels_on_the_image_grid(files, tmp_path):
    out = tmp_path / "seg.nii.gz"
    r = runner.invoke(app, ["segment", str(files / "targets" / "case_a.nii.gz"), "--out", str(out), *atlas_args(files),
                            "--fusion", "majority", "--device", "cpu", "--probabilities"])
    assert r.exit_code == 0, r.output
    seg = io.load_labels(out)
    ref = io.load_labels(files / "target_seg.nii.gz")
    assert seg.shape == ref.shape and np.allclose(seg.affine, ref.affine)
    assert set(torch.unique(seg.data).tolist()) <= {0, 7, 1042}
    assert mean_dice(seg.data[0], ref.data[0]) > 0.85
    assert "registered" in r.output and "wrote" in r.output  # progress per atlas on stderr, summary on stdout
    assert "quality" in r.output and "atlas agreement" in r.output
    # the fused votes as probabilities: one channel per label, summing to one, their argmax the label map
    prob = io.load(tmp_path / "seg_probabilities.nii.gz", allow_4d=True)
    ids = json.loads((tmp_path / "seg_probabilities.json").read_text())["label_ids"]
    assert prob.data.shape == (len(ids), *seg.shape) and np.allclose(prob.affine, seg.affine)
    torch.testing.assert_close(prob.data.sum(0), torch.ones(seg.shape), rtol=0, atol=1e-5)
    assert torch.equal(torch.tensor(ids)[prob.data.argmax(0)], seg.data[0])


def test_segment_a_folder_with_atlases(files, tmp_path):
    out = tmp_path / "pred"
    r = runner.invoke(app, ["segment", "-i", str(files / "targets"), "-o", str(out), *atlas_args(files, 1), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["case_a.nii.gz", "case_b.nii.gz", "quality.csv"]
    rows = list(csv.DictReader((out / "quality.csv").open()))
    assert {r["measure"] for r in rows} == {"atlas agreement"} and all(0 < float(r["quality"]) <= 1 for r in rows)
    seg = io.load_labels(out / "case_a.nii.gz")
    assert mean_dice(seg.data[0], io.load_labels(files / "target_seg.nii.gz").data[0]) > 0.8


def test_atlas_mistakes_are_one_line_errors_before_any_output(files, tmp_path):
    target = str(files / "targets" / "case_a.nii.gz")
    out = tmp_path / "seg.nii.gz"
    a1 = ["--atlas-image", str(files / "atlas1.nii.gz")]
    cases = {
        "1 --atlas-image but 0 --atlas-label": ["segment", target, "--out", str(out), *a1],
        "--fusion must be one of": ["segment", target, "--out", str(out), *atlas_args(files, 1), "--fusion", "staple"],
        "unknown --features 'sift': use one of auto, mind": ["segment", target, "--out", str(out), *atlas_args(files, 1), "--features", "sift"],
        "does not match its image's grid": ["segment", target, "--out", str(out), *a1,
                                            "--atlas-label", str(files / "offgrid_seg.nii.gz")],
        "atlas image nope.nii.gz": ["segment", target, "--out", str(out), "--atlas-image", str(files / "nope.nii.gz"),
                                    "--atlas-label", str(files / "atlas1_seg.nii.gz")],
        "not a synthvox segmentation model": ["segment", target, "--out", str(out), *atlas_args(files, 1),
                                              "--model", str(tmp_path)],
    }
    for expect, args in cases.items():
        assert expect in one_line_error(runner.invoke(app, [*args, "--device", "cpu"])), expect
    assert not out.exists()


def test_a_finetuned_model_votes_beside_the_atlases(files, tmp_path):
    from synthvox.segmentation import finetune

    model = finetune([io.load(files / "atlas1.nii.gz")], [io.load_labels(files / "atlas1_seg.nii.gz")], out_dir=tmp_path / "m",
                     init="random", variant="tiny", steps=2, patch_size=32, batch_size=1, device="cpu", progress=False,
                     head_init="random")  # a voter that knows nothing yet (a probe on random features is confidently wrong)
    out = tmp_path / "seg.nii.gz"
    r = runner.invoke(app, ["segment", str(files / "targets" / "case_a.nii.gz"), "--out", str(out), *atlas_args(files, 1),
                            "--model", str(model), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "model" in r.output and "fusion" in r.output
    seg = io.load_labels(out)
    assert set(torch.unique(seg.data).tolist()) <= {0, 7, 1042}
    # a barely trained network is one voter of two: the registered atlas still carries most of the
    # structure, 0.1 better than the atlas's labels taken as they are (0.677 here): the fusion measured
    # 0.803, and 0.748 when the deformable stage returns the identity, which fails
    ref = io.load_labels(files / "target_seg.nii.gz").data[0]
    unregistered = mean_dice(io.load_labels(files / "atlas1_seg.nii.gz").data[0], ref)  # one grid
    assert mean_dice(seg.data[0], ref) > unregistered + 0.1, (mean_dice(seg.data[0], ref), unregistered)
