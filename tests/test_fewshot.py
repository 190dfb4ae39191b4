"""Few-shot finetuning: accuracy on a re-rendered copy, label ids, frames, augmentation, resume, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import make_affine
from conftest import two_ellipsoids as layout

import synthvox.models
from synthvox.errors import InputError
from synthvox.segmentation import AugmentConfig, finetune, read_meta, segment
from synthvox.segmentation.augment import PatchAugment, extract_patch, sample_patch_augment
from synthvox.segmentation.config import FinetuneConfig
from synthvox.segmentation.data import draw_batch, prepare_subject
from synthvox.segmentation.modeldir import load_model_dir
from synthvox.train.checkpointing import FORMATS, checkpoint_name, list_checkpoints, load_checkpoint
from synthvox.volume import Volume

IDS = (0, 7, 42)
AFFINE = np.diag([1.5, 1.5, 1.5, 1.0])
#: The tiny variant's 4-channel first level learns far more reliably with leaky ReLUs than with ReLUs.
LEAKY = {"activation": "leaky"}


def render(lab: torch.Tensor, means: dict[int, float], noise: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(lab.shape)
    for k, m in means.items():
        img[lab == k] = m
    return img + noise * torch.randn(lab.shape, generator=g)


def dice(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    a, b = a == k, b == k
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def quick(tmp, images, labels, **kw):
    # an explicit config: these tiny volumes at their own spacing, not the CPU's defaults (48³ at 3 mm or coarser)
    args = dict(config=FinetuneConfig(), out_dir=tmp, init="random", variant="tiny", model_overrides=LEAKY, steps=2,
                patch_size=32, batch_size=1, device="cpu", progress=False)
    args.update(kw)
    return finetune(images, labels, **args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    lab = layout()
    img = Volume(render(lab, {0: 10.0, 7: 80.0, 42: 150.0}, 5.0, 0), AFFINE)
    out = finetune([img], [Volume(lab, AFFINE)], FinetuneConfig(), out_dir=tmp_path_factory.mktemp("seg") / "model", init="random",
                   variant="tiny", model_overrides=LEAKY, steps=STEPS, patch_size=32, batch_size=2, lr=3e-3, device="cpu", seed=0,
                   progress=False, val_every=STEPS)
    return out, lab


STEPS = 70


def test_finetune_reaches_high_dice_on_a_rerendered_copy(trained):
    model, lab = trained
    # same layout, other intensities (brighter background, other contrast) and stronger noise
    test = Volume(render(lab, {0: 25.0, 7: 120.0, 42: 175.0}, 12.0, 1), AFFINE)
    seg = segment(model, test)
    assert seg.shape == test.shape
    np.testing.assert_array_equal(seg.affine, AFFINE)
    assert set(torch.unique(seg.data).tolist()) == set(IDS)  # ids 0, 7, 42 come back, not 0, 1, 2
    d7, d42 = dice(seg.data, lab, 7), dice(seg.data, lab, 42)
    assert d7 > 0.8 and d42 > 0.8, (d7, d42)


def test_model_dir_records_the_frame(trained):
    model, _ = trained
    meta = read_meta(model)
    assert meta.label_ids == list(IDS)
    assert meta.spacing == [1.5, 1.5, 1.5] and meta.orientation == "RAS"
    assert meta.normalisation["modality"] == "mr"
    assert meta.train["steps"] == STEPS and meta.train["init"] == "random"
    assert meta.history["steps"] == STEPS and 0.0 <= meta.history["last_val_dice"] <= 1.0
    log = (model / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss") and len(log) == STEPS + 1
    assert all(p.suffix in (".json", ".safetensors", ".csv") for p in model.rglob("*") if p.is_file())


def test_oblique_anisotropic_input_gives_labels_on_its_grid(trained):
    model, lab = trained
    affine = make_affine(spacing=(1.2, 1.6, 2.4), angles=(0.2, -0.3, 0.4), flips=(1, -1, 1))
    img = Volume(render(lab, {0: 10.0, 7: 80.0, 42: 150.0}, 5.0, 2)[:, :, :30, :20], affine)
    seg = segment(model, img)
    assert seg.data.shape == (1, 32, 30, 20)
    np.testing.assert_array_equal(seg.affine, affine)
    assert set(torch.unique(seg.data).tolist()) <= set(IDS)


def test_augmentation_moves_image_and_labels_together():
    lab = layout()
    idx = torch.searchsorted(torch.tensor(IDS), lab)
    img = idx.float() / 2  # intensity 0, 0.5, 1 per class
    g = torch.Generator().manual_seed(3)
    cfg = AugmentConfig(p_affine=1.0, p_elastic=1.0, p_gamma=0, p_contrast=0, p_bias=0, p_blur=0, p_lowres=0, p_noise=0)
    centre = torch.tensor([15.0, 16.0, 14.0])
    for _ in range(3):
        aug = sample_patch_augment(g, cfg)
        assert aug.affine is not None and aug.elastic is not None
        x, y = extract_patch(img, idx, centre, (24, 24, 24), aug, torch.device("cpu"))
        assert x.shape == (1, 24, 24, 24) and y.dtype == torch.int64
        # the linearly sampled image rounds to its nearest-sampled label almost everywhere...
        agree = ((x - y.float() / 2).abs() <= 0.25 + 1e-4).float().mean()
        assert agree > 0.97
        # ... which a label map off by one voxel does not
        assert ((x[:, 1:] - y[:, :-1].float() / 2).abs() <= 0.25 + 1e-4).float().mean() < agree - 0.02
    # identity: exactly the crop around the centre
    none = PatchAugment(None, None, None, None, None, None, None, None, False)
    x, y = extract_patch(img, idx, torch.tensor([15.5, 15.5, 15.5]), (8, 8, 8), none, torch.device("cpu"))
    assert torch.equal(y, idx[:, 12:20, 12:20, 12:20]) and torch.allclose(x, img[:, 12:20, 12:20, 12:20])


def test_patches_oversample_foreground_and_are_reproducible():
    lab = layout()
    lab[lab == 42] = 7
    lab[:, 27:30, 3:6, 3:6] = 42  # a tiny structure: 27 voxels, 0.08% of the volume
    img = render(lab, {0: 0.0, 7: 50.0, 42: 100.0}, 0.0, 0)
    sub = prepare_subject(Volume(img, AFFINE), Volume(lab, AFFINE), IDS, [1.5] * 3, {"method": "percentile", "modality": "mr"})
    cfg = FinetuneConfig(steps=10, patch_size=[9, 9, 9], batch_size=12, augment=AugmentConfig(p_affine=0, p_elastic=0)).resolved()
    x1, y1 = draw_batch([sub], cfg, 5, torch.device("cpu"))
    x2, y2 = draw_batch([sub], cfg, 5, torch.device("cpu"))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)  # step i of seed s is the same in every run
    x3, _ = draw_batch([sub], cfg, 6, torch.device("cpu"))
    assert not torch.equal(x1, x3)
    centres = torch.cat([draw_batch([sub], cfg, s, torch.device("cpu"))[1][:, 0, 4, 4, 4] for s in range(10)])
    # the tiny structure is chosen as often as the large one among foreground-centred patches
    assert (centres == 2).float().mean() > 0.15


def test_resume_continues_exactly(tmp_path):
    lab = layout()
    img = Volume(render(lab, {0: 10.0, 7: 80.0, 42: 150.0}, 5.0, 0), AFFINE)
    kw = dict(steps=4, checkpoint_every=2, val_every=4, seed=5)
    full = quick(tmp_path / "a", [img], [Volume(lab, AFFINE)], **kw)
    assert [s for s, _ in list_checkpoints(full / "checkpoints")] == [2, 4]
    # an interrupted run: only the step-2 checkpoint exists, and the log has run past it
    part = tmp_path / "b"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints" / checkpoint_name(2), part / "checkpoints")
    shutil.copy(full / "log.csv", part / "log.csv")
    resumed = quick(part, [img], [Volume(lab, AFFINE)], resume=True, **kw)
    a, _ = load_model_dir(full)
    b, _ = load_model_dir(resumed)
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k
    assert read_meta(resumed).history["steps"] == 4
    # the log reads as one run: rows 3 and 4 were cut back and written again, once each
    steps = [line.split(",")[0] for line in (resumed / "log.csv").read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3", "4"]
    # the checkpoint is the training format, tagged as finetuning: pretraining will not resume it
    _, state = load_checkpoint(part / "checkpoints" / checkpoint_name(4), kind="finetune")
    assert state["step"] == 4 and state["format"] == FORMATS["finetune"]
    with pytest.raises(InputError, match="not a synthvox pretraining checkpoint"):
        load_checkpoint(part / "checkpoints" / checkpoint_name(4))
    # resuming with other labels is refused
    other = lab.clone()
    other[other == 42] = 3
    with pytest.raises(InputError, match="different settings"):
        quick(part, [img], [Volume(other, AFFINE)], resume=True, **kw)
    # a model directory with checkpoints of the format before the shared one says so
    old = tmp_path / "old"
    (old / "checkpoints").mkdir(parents=True)
    (old / "checkpoints" / "step_0000002.safetensors").write_bytes(b"")
    (old / "log.csv").write_text("step,loss\n")
    with pytest.raises(InputError, match="no checkpoint found.*format before"):
        quick(old, [img], [Volume(lab, AFFINE)], resume=True, **kw)


def test_a_signal_stops_finetuning_with_a_checkpoint_and_resume_continues_exactly(tmp_path, monkeypatch):
    """SIGTERM during step 3 (the training runner's stop flag): the step finishes, a checkpoint at step 3
    is written, finetune exits with status 143 without a model; --resume then gives the network of the
    run that was never stopped, and the log reads as one run."""
    import os
    import signal

    import synthvox.segmentation.loop as loop

    lab = layout()
    img = Volume(render(lab, {0: 10.0, 7: 80.0, 42: 150.0}, 5.0, 0), AFFINE)
    kw = dict(steps=5, checkpoint_every=4, val_every=2, seed=2)
    full = quick(tmp_path / "a", [img], [Volume(lab, AFFINE)], **kw)
    real = loop.draw_batch

    def draw(subjects, cfg, step, *args):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(subjects, cfg, step, *args)

    monkeypatch.setattr(loop, "draw_batch", draw)
    with pytest.raises(SystemExit) as stopped:
        quick(tmp_path / "b", [img], [Volume(lab, AFFINE)], **kw)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert [s for s, _ in list_checkpoints(tmp_path / "b" / "checkpoints")] == [3]
    assert not (tmp_path / "b" / "segmentation.json").exists()
    monkeypatch.setattr(loop, "draw_batch", real)
    resumed = quick(tmp_path / "b", [img], [Volume(lab, AFFINE)], resume=True, **kw)
    a, _ = load_model_dir(full)
    b, _ = load_model_dir(resumed)
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k
    rows = [line.split(",")[:2] for line in (resumed / "log.csv").read_text().splitlines()[1:]]
    assert rows == [line.split(",")[:2] for line in (full / "log.csv").read_text().splitlines()[1:]]


def test_train_modes_freeze_what_they_say(tmp_path):
    lab = layout()
    img = Volume(render(lab, {0: 10.0, 7: 80.0, 42: 150.0}, 5.0, 0), AFFINE)
    from synthvox.models import build_model

    init = build_model("tiny", seed=0, **LEAKY)
    head_only, _ = load_model_dir(quick(tmp_path / "h", [img], [Volume(lab, AFFINE)], train="head", lr=1e-2, steps=1))
    for k, v in init.state_dict().items():
        assert torch.equal(head_only.backbone.state_dict()[k], v), k
    dec, _ = load_model_dir(quick(tmp_path / "d", [img], [Volume(lab, AFFINE)], train="decoder", lr=1e-2, steps=1))
    sd = dec.backbone.state_dict()
    enc = [k for k in sd if k.startswith(("stem.", "encoders.", "bottleneck."))]
    rest = [k for k in sd if k.startswith(("decoders.", "head.")) and sd[k].is_floating_point()]
    assert enc and rest
    assert all(torch.equal(sd[k], init.state_dict()[k]) for k in enc)
    assert any(not torch.equal(sd[k], init.state_dict()[k]) for k in rest)


def test_bad_inputs(tmp_path, monkeypatch):
    lab = layout()
    img = Volume(render(lab, {0: 10.0, 7: 80.0, 42: 150.0}, 5.0, 0), AFFINE)
    good = Volume(lab, AFFINE)
    with pytest.raises(InputError, match="does not match its image's grid"):
        quick(tmp_path / "m", [img], [Volume(lab, make_affine())])
    with pytest.raises(InputError, match="does not match its image's grid"):
        quick(tmp_path / "m", [img], [Volume(lab[:, :, :, :20], AFFINE)])
    with pytest.raises(InputError, match="only one label"):
        quick(tmp_path / "m", [img], [Volume(torch.zeros_like(lab), AFFINE)])
    with pytest.raises(InputError, match="single-channel"):
        quick(tmp_path / "m", [Volume(torch.cat([img.data, img.data]), AFFINE)], [good])
    with pytest.raises(InputError, match="2 images but 1 label"):
        quick(tmp_path / "m", [img, img], [good])
    with pytest.raises(InputError, match="--train"):
        quick(tmp_path / "m", [img], [good], train="encoder")
    with pytest.raises(InputError, match="--patch"):
        quick(tmp_path / "m", [img], [good], patch_size=16)
    with pytest.raises(InputError, match="not in the training labels"):
        other = lab.clone()
        other[other == 42] = 5
        quick(tmp_path / "m", [img], [good], val=(img, Volume(other, AFFINE)))
    with monkeypatch.context() as m:  # a version without shipped weights (the shipped ones: test_shipped_weights.py)
        m.setattr(synthvox.models, "default_weights_path", lambda: None)
        with pytest.raises(InputError, match="no default pretrained weights"):
            quick(tmp_path / "m", [img], [good], init="default", model_overrides=None)
    assert not (tmp_path / "m" / "segmentation.json").exists()
    json.dumps(FinetuneConfig().resolved().to_json())  # the recorded config is plain JSON


def test_model_directory_is_a_run_folder(tmp_path):
    lab = layout()
    img = Volume(render(lab, {0: 10.0, 7: 80.0, 42: 150.0}, 5.0, 0), AFFINE)
    model = quick(tmp_path / "m", [img], [Volume(lab, AFFINE)], steps=1)
    (model / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="already holds a model"):
        quick(model, [img], [Volume(lab, AFFINE)], steps=1)
    quick(model, [img], [Volume(lab, AFFINE)], steps=2, force=True)
    assert read_meta(model).history["steps"] == 2 and (model / "notes.txt").read_text() == "mine"
    assert len((model / "log.csv").read_text().splitlines()) == 3
