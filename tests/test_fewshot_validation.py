"""What finetuning's check scores: a validation pair, training volumes left out in turn, a mirrored
copy only for labels without sides, else a training-fit check on an augmented copy (never a mirror)."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch
from conftest import two_ellipsoids as layout

from synthvox import io
from synthvox.demo import demo_dir
from synthvox.segmentation import finetune, read_meta
from synthvox.segmentation.config import FinetuneConfig
from synthvox.segmentation.data import common_spacing, label_ids_of, prepare_subject, sample_centres
from synthvox.segmentation.infer import resolve_normalisation
from synthvox.segmentation.modeldir import load_model_dir
from synthvox.segmentation.validation import flipped, plan_validation, sided_labels
from synthvox.train.checkpointing import checkpoint_name
from synthvox.volume import Volume

AFFINE = np.diag([1.5, 1.5, 1.5, 1.0])
NORM = {"method": "percentile", "modality": "mr", "percentiles": [0.5, 99.5]}
CPU = torch.device("cpu")


def symmetric_layout() -> torch.Tensor:
    """A midline structure (1) and a pair that shares one label (2), mirror-symmetric about x = 16."""
    x, y, z = torch.meshgrid(*(torch.arange(32.0),) * 3, indexing="ij")
    lab = torch.zeros(32, 32, 32, dtype=torch.int64)
    lab[((x - 16) / 5) ** 2 + ((y - 16) / 9) ** 2 + ((z - 14) / 8) ** 2 < 1] = 1
    lab[(((x - 6) / 3) ** 2 + ((y - 16) / 5) ** 2 + ((z - 14) / 5) ** 2 < 1) | (((x - 26) / 3) ** 2 + ((y - 16) / 5) ** 2 + ((z - 14) / 5) ** 2 < 1)] = 2
    return lab[None]


def subject(lab: torch.Tensor, ids=None, brightness: float = 1.0):
    ids = ids or sorted(torch.unique(lab).tolist())
    img = Volume(lab.float() * 40 * brightness + 5, AFFINE)
    return prepare_subject(img, Volume(lab, AFFINE), ids, [1.5] * 3, NORM), ids


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    fa, fb = a > 0, b > 0
    return float(2 * (a == b)[fa & fb].sum() / (fa.sum() + fb.sum()))


def test_sides_are_read_from_the_labels():
    split = symmetric_layout()
    assert sided_labels(split) == {}  # a midline structure and a pair under one label: no sides
    x = torch.arange(32).view(1, 32, 1, 1).expand_as(split)
    split[(split == 2) & (x > 16)] = 3  # the pair as left and right labels
    assert sided_labels(split) == {2: 3, 3: 2}
    assert set(sided_labels(torch.searchsorted(torch.tensor([0, 7, 42]), layout()))) == {1, 2}


def test_demo_mr_labels_have_sides_and_are_never_scored_mirrored():
    im = io.load(demo_dir() / "mr.nii.gz")
    lab = io.load_labels(demo_dir() / "mr_seg.nii.gz")
    ids = label_ids_of([lab])
    sub = prepare_subject(im, lab, ids, common_spacing([im]), resolve_normalisation(im.data))
    sided = sided_labels(sub.classes)
    assert len(sided) >= 5  # liver, spleen, kidneys, ...: one side each
    cfg = FinetuneConfig(steps=10, patch_size=[32, 32, 32], val_every=5).resolved()
    plan = plan_validation([sub], None, cfg, ids, CPU)
    assert plan.kind == "training fit" and not plan.held_out and plan.dice_name == "training-fit Dice"
    assert "not held out" in plan.summary and "augmented copy" in plan.summary
    scored = plan.at(5)[0].classes
    # the scored copy is the training volume moved a little, not its mirror image
    assert dice(scored, sub.classes) > 0.5 > 2 * dice(flipped(sub).classes, sub.classes)


def test_single_volume_without_sides_is_scored_mirrored(tmp_path):
    lab = symmetric_layout()
    img = Volume(lab.float() * 60 + 10 + torch.rand(lab.shape) * 5, AFFINE)
    model = finetune([img], [Volume(lab, AFFINE)], FinetuneConfig(), out_dir=tmp_path / "m", init="random", variant="tiny",
                     steps=2, patch_size=32, batch_size=1, val_every=2, device="cpu", progress=False)
    h = read_meta(model).history
    assert h["val_kind"] == "mirrored copy" and h["last_val_on"] == "mirrored copy of training volume 1"
    assert "no left/right sides" in h["val_source"]


def test_single_volume_with_sides_is_a_training_fit_check(tmp_path):
    lab = layout()
    img = Volume(lab.float() + 10 + torch.rand(lab.shape) * 5, AFFINE)
    model = finetune([img], [Volume(lab, AFFINE)], FinetuneConfig(), out_dir=tmp_path / "m", init="random", variant="tiny",
                     steps=2, patch_size=32, batch_size=1, val_every=2, device="cpu", progress=False)
    meta = read_meta(model)
    assert meta.history["val_kind"] == "training fit" and meta.history["val_held_out"] is False
    assert meta.train["val_kind"] == "training fit" and "training fit, not held out" in meta.train["val_source"]
    assert "sided labels 7, 42:" in meta.train["val_source"]  # the sides it found, as label ids
    rows = list(csv.DictReader(open(model / "log.csv")))
    assert rows[-1]["val_on"].startswith("training fit, not held out") and rows[0]["val_on"] == ""


def test_draws_leave_out_the_subject_being_checked():
    subs = [subject(layout(), [0, 7, 42], b)[0] for b in (1.0, 1.5, 2.0)]
    g = torch.Generator().manual_seed(0)
    assert {s for s, _ in sample_centres(subs, 60, 0.6, g, exclude=1)} == {0, 2}
    cfg = FinetuneConfig(steps=12, patch_size=[16] * 3, val_every=4).resolved()
    plan = plan_validation(subs, None, cfg, [0, 7, 42], CPU)
    assert plan.kind == "left out in turn" and plan.held_out
    assert [plan.left_out(i) for i in range(12)] == [0] * 4 + [1] * 4 + [2] * 4
    scored, what = plan.at(8)
    assert scored is subs[1] and what == "training subject 2, left out of the draws since step 4"
    # 10 steps for 3 subjects: each left out for 3 steps before its check, the last check after step 10
    plan = plan_validation(subs, None, FinetuneConfig(steps=10, patch_size=[16] * 3, val_every=4).resolved(), [0, 7, 42], CPU)
    assert [plan.left_out(i) for i in range(10)] == [None, 0, 0, 0, None, 1, 1, 1, 2, 2]
    assert plan.at(10)[1] == "training subject 3, left out of the draws since step 8"
    # a run shorter than one check period still trains on every subject
    plan = plan_validation(subs[:2], None, FinetuneConfig(steps=20, patch_size=[16] * 3, val_every=25).resolved(), [0, 7, 42], CPU)
    assert [plan.left_out(i) for i in range(20)] == [None] * 10 + [0] * 10
    assert plan.at(20) == (subs[0], "training subject 1, left out of the draws since step 10")


def test_several_volumes_are_held_out_in_turn_and_resume_exactly(tmp_path):
    lab = layout()
    imgs = [Volume(lab.float() * b + 10 + torch.rand(lab.shape, generator=torch.Generator().manual_seed(i)) * 5, AFFINE)
            for i, b in enumerate((1.0, 2.0))]
    labs = [Volume(lab, AFFINE)] * 2
    kw = dict(init="random", variant="tiny", steps=6, patch_size=32, batch_size=1, val_every=2, checkpoint_every=3,
              device="cpu", progress=False, seed=3)
    full = finetune(imgs, labs, FinetuneConfig(), out_dir=tmp_path / "a", **kw)
    rows = [r for r in csv.DictReader(open(full / "log.csv")) if r["val_dice"]]
    assert [(r["step"], r["val_on"]) for r in rows] == [
        ("2", "training subject 1, left out of the draws since step 0"),
        ("4", "training subject 2, left out of the draws since step 2"),
        ("6", "training subject 1, left out of the draws since step 4"),
    ]
    meta = read_meta(full)
    assert meta.history["val_kind"] == "left out in turn" and meta.history["val_dice_name"] == "left-out Dice"
    # resumed from step 3 (inside a leave-out period): the same network as the uninterrupted run
    part = tmp_path / "b"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints" / checkpoint_name(3), part / "checkpoints")
    resumed = finetune(imgs, labs, FinetuneConfig(), out_dir=part, resume=True, **kw)
    a, _ = load_model_dir(full)
    b, _ = load_model_dir(resumed)
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k
    assert read_meta(resumed).history["last_val_on"] == meta.history["last_val_on"]


@pytest.mark.parametrize("n", [1, 2])
def test_a_validation_pair_is_scored_when_given(tmp_path, n):
    lab = layout()
    img = Volume(lab.float() + 10 + torch.rand(lab.shape) * 5, AFFINE)
    model = finetune([img] * n, [Volume(lab, AFFINE)] * n, FinetuneConfig(), out_dir=tmp_path / "m", init="random", variant="tiny",
                     steps=1, patch_size=32, batch_size=1, device="cpu", progress=False, val=(img, Volume(lab, AFFINE)))
    h = read_meta(model).history
    assert h["val_kind"] == "validation pair" and h["val_held_out"] and h["last_val_on"] == "validation pair"
