"""Distillation (``finetune --atlas-image ... --unlabelled DIR``): atlas fusion's labels of a study's
unlabelled scans, weighted by their confidence, trained on beside the atlases."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from test_atlas import labels_of
from test_cli_mistakes import one_line_error, tree
from test_registration import phantom, warped_pair
from typer.testing import CliRunner

from synthvox import io, readers
from synthvox.cli import app
from synthvox.errors import InputError
from synthvox.losses.dice_ce import WeightedDiceCELoss
from synthvox.segmentation import distill, read_meta
from synthvox.segmentation.atlas import Atlas
from synthvox.segmentation.augment import AugmentConfig
from synthvox.segmentation.config import FinetuneConfig
from synthvox.segmentation.data import PseudoLabels, draw_batch, draw_weighted_batch, prepare_subject
from synthvox.segmentation.modeldir import load_model_dir
from synthvox.train.checkpointing import checkpoint_name
from synthvox.volume import Volume

runner = CliRunner()
AFF = np.eye(4)
MR = {"method": "percentile", "modality": "mr"}
#: tiny settings: the tiny network (leaky ReLUs learn reliably at its 4 channels), 32³ patches, a few steps
TINY = dict(init="random", variant="tiny", model_overrides={"activation": "leaky"}, patch_size=32, batch_size=1,
            device="cpu", progress=False)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Two atlases (a 32³ phantom with labels 0/7/1042, and another phantom in an inverted contrast) and
    two unlabelled scans (the first phantom deformed) as files."""
    d = tmp_path_factory.mktemp("distill")
    img = phantom(32)
    io.save(Volume(img * 1000, AFF), d / "atlas1.nii.gz")
    io.save(Volume(labels_of(img), AFF), d / "atlas1_seg.nii.gz", labels=True)
    other = phantom(32, seed=1)
    io.save(Volume((other.max() - other) * (other > 0) * 300, AFF), d / "atlas2.nii.gz")
    io.save(Volume(labels_of(other), AFF), d / "atlas2_seg.nii.gz", labels=True)
    (d / "scans").mkdir()
    for i, amp in enumerate((2.0, 3.0)):
        scan, _ = warped_pair(img, amp=amp)
        io.save(Volume(scan * 900, AFF), d / "scans" / f"case{i}.nii.gz")
    io.save(Volume(labels_of(img)[:, :20], AFF), d / "offgrid_seg.nii.gz", labels=True)
    return d


def atlases_of(d, n: int = 1) -> list[Atlas]:
    return [Atlas(io.load(d / f"atlas{i}.nii.gz"), io.load_labels(d / f"atlas{i}_seg.nii.gz"), f"atlas{i}.nii.gz")
            for i in range(1, n + 1)]


def scans_of(d) -> dict[str, Volume]:
    return {readers.image_stem(p): io.load(p) for p in sorted((d / "scans").iterdir())}


def atlas_args(d, n: int = 1) -> list[str]:
    return [a for i in range(1, n + 1) for a in ("--atlas-image", str(d / f"atlas{i}.nii.gz"), "--atlas-label",
                                                 str(d / f"atlas{i}_seg.nii.gz"))]


def same_weights(a, b) -> bool:
    na, _ = load_model_dir(a)
    nb, _ = load_model_dir(b)
    return all(torch.equal(va, vb) for va, vb in zip(na.state_dict().values(), nb.state_dict().values()))


def test_weighted_loss_is_monais_at_unit_weights_and_ignores_voxels_of_weight_zero():
    """Broken on purpose, each fails (at the check that weights of 2 everywhere give MONAI's loss): the
    weight left out of the cross-entropy's sum, or out of the Dice intersection, or the cross-entropy
    divided by the voxel count instead of the weights' sum."""
    from monai.losses import DiceCELoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (2, 1, 6, 5, 4), generator=g)
    for bg in (False, True):
        monai = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, include_background=bg)(logits, y)
        torch.testing.assert_close(WeightedDiceCELoss(bg)(logits, y), monai)
        torch.testing.assert_close(WeightedDiceCELoss(bg)(logits, y, torch.full(y.shape, 2.0, dtype=torch.float64)), monai)
    w = (torch.rand(y.shape, generator=g) > 0.4).double() * torch.rand(y.shape, generator=g, dtype=torch.float64)
    loss = WeightedDiceCELoss()(logits, y, w)
    (grad,) = torch.autograd.grad(loss, logits)
    zero = (w == 0).expand_as(grad)
    assert zero.any() and (grad[zero] == 0).all() and (grad[~zero] != 0).any()
    # other labels and logits where the weight is zero: the same loss
    y2 = torch.where(w == 0, (y + 1) % 3, y)
    logits2 = torch.where(zero, torch.randn(logits.shape, generator=g, dtype=torch.float64), logits.detach())
    torch.testing.assert_close(WeightedDiceCELoss()(logits2, y2, w), loss.detach())


def test_weight_maps_are_cut_on_the_labels_grid_and_the_patches_are_draw_batchs():
    """The weight map is sampled with the labels' grid (affine + elastic) and the images and labels are
    those draw_batch gives at the same step. Fails when the weights are sampled linearly, or around
    another centre, or when draw_weighted_batch draws its augmentation in another order."""
    lab = labels_of(phantom(32))
    img = Volume(lab.float() + 3.0, AFF)
    sub = prepare_subject(img, Volume(lab, AFF), [0, 7, 1042], [1.0] * 3, MR,
                          weight=Volume((lab == 7).float(), AFF))
    cfg = FinetuneConfig(steps=10, patch_size=[20, 20, 20], batch_size=3, foreground_fraction=0.5,
                         augment=AugmentConfig(p_affine=1.0, p_elastic=1.0)).resolved()
    for step in range(3):
        x, y, w = draw_weighted_batch([sub], cfg, step, torch.device("cpu"))
        x0, y0 = draw_batch([sub], cfg, step, torch.device("cpu"))
        assert torch.equal(x, x0) and torch.equal(y, y0)
        assert w.shape == y.shape and torch.equal(w, (y == 1).float())


def pseudo_pair(d, flip_low: bool) -> PseudoLabels:
    """The atlas's own labels as the pseudo-labels of a deformed scan, confident (0.9) on a half of the
    volume and not (0.3) on the other; with ``flip_low`` the labels differ where confidence is low."""
    scan = io.load(d / "scans" / "case0.nii.gz")
    lab = labels_of(scan.data / 900)
    conf = torch.full(lab.shape, 0.9)
    conf[:, :, 16:] = 0.3
    if flip_low:
        lab = torch.where(conf < 0.5, torch.where(lab == 0, 7, 0), lab)
    return PseudoLabels([scan], [Volume(lab, AFF)], [Volume(conf, AFF)], ["case0"], 0.5, 3)


def test_voxels_below_the_confidence_floor_do_not_change_the_network(study, tmp_path):
    """Two runs whose pseudo-labels differ only where the confidence is below the floor give the same
    network (draws uniform in the volume, so the labels do not move the patches); labels that differ
    above it give another. Fails when finetune trains its pseudo-labelled steps with the unweighted
    loss, or weighs the voxels below the floor by their confidence."""
    from synthvox.segmentation import finetune

    a = atlases_of(study)[0]
    kw = dict(config=FinetuneConfig(), steps=3, foreground_fraction=0.0, val_every=3, seed=1, **TINY)
    runs = [finetune([a.image], [a.labels], out_dir=tmp_path / f"m{i}", pseudo=pseudo_pair(study, i == 1), **kw)
            for i in range(2)]
    assert same_weights(*runs)
    confident = pseudo_pair(study, True)
    confident.confidence = [Volume(torch.full(confident.labels[0].data.shape, 0.9), AFF)]
    other = finetune([a.image], [a.labels], out_dir=tmp_path / "m2", pseudo=confident, **kw)
    assert not same_weights(runs[0], other)
    meta = read_meta(runs[0])
    assert meta.train["n_pseudo"] == 1 and meta.train["pseudo_labels"]["min_confidence"] == 0.5
    assert "labelled pairs only" in meta.train["pseudo_labels"]["checks"]


def test_pseudo_labels_are_segment_with_atlases_and_resume_reuses_them(study, tmp_path, monkeypatch):
    """The pseudo-label of a scan is the label map `synthvox segment --atlas-image` writes for it (two
    atlases of two contrasts), its confidence the fused probability of that label; an interrupted run
    resumed registers nothing again and ends with the network of the run that was never stopped. Fails
    when the pseudo-labels are fused another way (majority), when the confidence is another function of
    the probabilities, or when a finished pseudo-label is registered again."""
    atlases, scans = atlases_of(study, 2), {"case1": scans_of(study)["case1"]}
    kw = dict(steps=4, checkpoint_every=2, val_every=4, seed=3, **TINY)
    full = distill.distil(atlases, scans, FinetuneConfig(), out_dir=tmp_path / "full", **kw)
    seg = tmp_path / "seg.nii.gz"
    r = runner.invoke(app, ["segment", str(study / "scans" / "case1.nii.gz"), "--out", str(seg), *atlas_args(study, 2),
                            "--probabilities", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    pseudo = io.load_labels(full / "pseudo" / "case1_labels.nii.gz")
    assert torch.equal(pseudo.data, io.load_labels(seg).data)
    conf = io.load(full / "pseudo" / "case1_confidence.nii.gz")
    prob = io.load(tmp_path / "seg_probabilities.nii.gz", allow_4d=True)
    torch.testing.assert_close(conf.data[0], prob.data.max(0).values)
    rec = json.loads((full / "pseudo" / "case1.json").read_text())
    assert rec["scan"] == "case1" and rec["key"]["fusion"] == "weighted" and 0 < rec["agreement"] <= 1

    # interrupted after the step-2 checkpoint: its pseudo-labels, the checkpoint and the log are there
    part = tmp_path / "part"
    shutil.copytree(full / "pseudo", part / "pseudo")
    (part / "checkpoints").mkdir()
    shutil.copy(full / "checkpoints" / checkpoint_name(2), part / "checkpoints")
    shutil.copy(full / "log.csv", part)

    def no_registration(*args, **kwargs):
        raise AssertionError("a finished pseudo-label was registered again")

    monkeypatch.setattr(distill, "segment_with_atlases", no_registration)
    with pytest.raises(InputError, match="already holds a model"):  # without --resume: refused, nothing touched
        distill.distil(atlases, scans, FinetuneConfig(), out_dir=part, **kw)
    resumed = distill.distil(atlases, scans, FinetuneConfig(), out_dir=part, resume=True, **kw)
    assert same_weights(full, resumed)
    record = read_meta(resumed).train["pseudo_labels"]
    assert record["reused"] == 1 and record["made"] == 0 and record["scans"] == ["case1"]
    # pseudo-labels made from other atlases are refused, not mixed in
    other = atlases_of(study, 1)
    with pytest.raises(InputError, match="made from other atlases or settings"):
        distill.distil(other, scans, FinetuneConfig(), out_dir=part, resume=True, **kw)


def test_finetune_with_unlabelled_scans_from_the_command_line(study, tmp_path):
    """`finetune --atlas-image --atlas-label --unlabelled DIR`, then `segment --model` on the folder."""
    model = tmp_path / "model"
    args = ["finetune", *atlas_args(study), "--unlabelled", str(study / "scans"), "--out", str(model), "--init", "random", "--variant", "tiny",
            "--steps", "3", "--patch", "32", "--batch", "1", "--device", "cpu"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith(f"wrote {model} (3 steps, 2 pseudo-labelled scans (2 registered now, 0 reused)"), last
    assert "pseudo-labels 2/2 case1" in r.output
    assert sorted(p.name for p in (model / "pseudo").iterdir()) == [
        "case0.json", "case0_confidence.nii.gz", "case0_labels.nii.gz", "case1.json", "case1_confidence.nii.gz",
        "case1_labels.nii.gz"]
    train = json.loads((model / "segmentation.json").read_text())["train"]
    rec = train["pseudo_labels"]
    assert rec["atlases"] == ["atlas1.nii.gz"] and rec["scans"] == ["case0", "case1"] and rec["fusion"] == "weighted"
    assert "fused probability" in rec["confidence"] and rec["pseudo_dir"] == "pseudo"
    assert train["n_train"] == 1 and train["n_pseudo"] == 2
    # --resume with every step done registers nothing again; --force starts over
    r = runner.invoke(app, [*args, "--resume"])
    assert r.exit_code == 0, r.output
    assert "(3 steps, 2 pseudo-labelled scans (0 registered now, 2 reused)" in r.output
    pred = tmp_path / "pred"
    r = runner.invoke(app, ["segment", "--model", str(model), "-i", str(study / "scans"), "-o", str(pred), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    seg = io.load_labels(pred / "case0.nii.gz")
    assert seg.shape == (32, 32, 32) and set(torch.unique(seg.data).tolist()) <= {0, 7, 1042}


def test_distillation_mistakes_are_one_line_errors_that_write_nothing(study, tmp_path):
    """Each is refused before anything is written (the model folder does not appear)."""
    out = tmp_path / "m"
    atlas = atlas_args(study)
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "scan.nii.gz").write_bytes(b"not a nifti")
    (tmp_path / "twice").mkdir()
    for name in ("case0.nii.gz", "case0.nrrd"):
        (tmp_path / "twice" / name).write_bytes(b"")
    base = ["finetune", "--out", str(out), "--steps", "2", "--device", "cpu"]
    cases = {
        "no images (*.nii": [*atlas, "--unlabelled", str(tmp_path / "empty")],
        "unlabelled image scan.nii.gz": [*atlas, "--unlabelled", str(tmp_path / "broken")],
        "unlabelled image not found": [*atlas, "--unlabelled", str(tmp_path / "nope.nii.gz")],
        "have the same name": [*atlas, "--unlabelled", str(tmp_path / "twice")],
        "does not match its image's grid": ["--atlas-image", str(study / "atlas1.nii.gz"), "--atlas-label",
                                            str(study / "offgrid_seg.nii.gz"), "--unlabelled", str(study / "scans")],
        "not both": [*atlas, "--image", str(study / "atlas1.nii.gz"), "--label", str(study / "atlas1_seg.nii.gz")],
        "1 --atlas-image but 0 --atlas-label": ["--atlas-image", str(study / "atlas1.nii.gz"), "--unlabelled", str(study / "scans")],
        "needs labelled images": ["--unlabelled", str(study / "scans")],
        "--min-confidence": [*atlas, "--unlabelled", str(study / "scans"), "--min-confidence", "1"],
        "--fusion must be one of": [*atlas, "--unlabelled", str(study / "scans"), "--fusion", "staple"],
        "unknown --features": [*atlas, "--unlabelled", str(study / "scans"), "--features", "sift"],
        "--fusion go(es) with --unlabelled": [*atlas, "--fusion", "majority"],
        "--features, --min-confidence go(es) with --unlabelled": [*atlas, "--features", "net", "--min-confidence", "0.2"],
    }
    for expect, extra in cases.items():
        assert expect in one_line_error(runner.invoke(app, [*base, *extra])), expect
        assert not out.exists(), expect


def test_a_failed_registration_keeps_the_finished_pseudo_labels_only(study, tmp_path, monkeypatch):
    """A failure on the first scan leaves no model folder; one on the second keeps the first scan's
    pseudo-labels (and nothing else), which --resume then reuses. Fails when the clean-up removes the
    finished pseudo-labels (or keeps a folder with nothing to resume)."""
    atlases, scans = atlases_of(study), scans_of(study)
    real = distill.segment_with_atlases
    calls = []

    def fail_on(n):
        def segment(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise InputError("registration failed")
            return real(*args, **kwargs)
        return segment

    kw = dict(steps=1, **TINY)
    monkeypatch.setattr(distill, "segment_with_atlases", fail_on(1))
    with pytest.raises(InputError, match="registration failed"):
        distill.distil(atlases, scans, FinetuneConfig(), out_dir=tmp_path / "a" / "m", **kw)
    assert not (tmp_path / "a").exists()
    calls.clear()
    monkeypatch.setattr(distill, "segment_with_atlases", fail_on(2))
    with pytest.raises(InputError, match="registration failed"):
        distill.distil(atlases, scans, FinetuneConfig(), out_dir=tmp_path / "m", **kw)
    assert tree(tmp_path / "m") == ["pseudo", "pseudo/case0.json", "pseudo/case0_confidence.nii.gz", "pseudo/case0_labels.nii.gz"]
    monkeypatch.setattr(distill, "segment_with_atlases", real)
    model = distill.distil(atlases, scans, FinetuneConfig(), out_dir=tmp_path / "m", resume=True, **kw)
    record = read_meta(model).train["pseudo_labels"]
    assert record["made"] == 1 and record["reused"] == 1
