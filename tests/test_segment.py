"""Inference: the model frame and back, label ids, sliding windows, test-time flips, model directories.

These tests use hand-made networks whose output is a known function of the intensity, so geometry
errors (wrong spacing, orientation or affine on the way to the model's frame and back) show up as a
loss of overlap, without any training.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_affine
from torch import nn

from synthvox.errors import InputError
from synthvox.models import build_model
from synthvox.segmentation.infer import (
    probabilities_to_labels_on_grid,
    segment,
    segment_with,
    sliding_window_probabilities,
)
from synthvox.segmentation.modeldir import (
    SegmentationMeta,
    SegmentationNet,
    is_model_dir,
    load_model_dir,
    read_meta,
    save_model_dir,
)
from synthvox.volume import Volume, resample_to_grid

IDS = [0, 7, 42]


class IntensityClassifier(nn.Module):
    """Logits that pick the class whose reference level (0, 0.5, 1) is nearest to the intensity."""

    def __init__(self, levels=(0.0, 0.5, 1.0)) -> None:
        super().__init__()
        self.register_buffer("levels", torch.tensor(levels).view(1, -1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -100.0 * (x - self.levels) ** 2


def world_labels(shape, affine) -> torch.Tensor:
    """Two ellipsoids defined in world space (mm), sampled on any grid: ids 0, 7, 42."""
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    w = idx @ affine[:3, :3].T + affine[:3, 3]
    c = np.array([0.0, 0.0, 0.0])
    d = w - c
    lab = np.zeros(len(w), np.int64)
    lab[((d[:, 0] / 14) ** 2 + (d[:, 1] / 11) ** 2 + (d[:, 2] / 12) ** 2) < 1] = 7
    lab[(((d[:, 0] - 4) / 6) ** 2 + ((d[:, 1] + 2) / 5) ** 2 + ((d[:, 2] - 1) / 6) ** 2) < 1] = 42
    return torch.from_numpy(lab.reshape(shape))[None]


def intensity_of(lab: torch.Tensor) -> torch.Tensor:
    img = torch.zeros(lab.shape)
    img[lab == 7] = 50.0
    img[lab == 42] = 100.0
    return img


def meta(spacing=(1.5, 1.5, 1.5), patch=(32, 32, 32)) -> SegmentationMeta:
    return SegmentationMeta(label_ids=list(IDS), spacing=list(spacing), patch_size=list(patch),
                            normalisation={"method": "percentile", "modality": "mr", "percentiles": [0.0, 100.0]})


def dice(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    a, b = a == k, b == k
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_oblique_anisotropic_input_keeps_grid_and_lines_up():
    affine = make_affine(spacing=(0.9, 1.3, 2.2), angles=(0.3, -0.2, 0.5), origin=(-20.0, -18.0, -25.0), flips=(-1, 1, 1))
    # centre the field of view on the world origin, where the ellipsoids are
    shape = (44, 34, 22)
    centre = affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    affine[:3, 3] = -centre
    lab = world_labels(shape, affine)
    image = Volume(intensity_of(lab), affine)
    seg = segment_with(IntensityClassifier(), meta(), image, device="cpu")
    assert seg.shape == image.shape
    assert seg.data.shape == (1, *shape)
    np.testing.assert_array_equal(seg.affine, image.affine)
    assert seg.data.dtype == torch.int64
    assert set(torch.unique(seg.data).tolist()) == set(IDS)
    # resampling to 1.5 mm and back loses only partial-volume boundary voxels
    assert dice(seg.data, lab, 7) > 0.9
    assert dice(seg.data, lab, 42) > 0.85


def test_probabilities_back_on_grid_linear_then_argmax():
    # a probability map with a sharp boundary, at 2 mm; the target grid is 1 mm and shifted
    prob = torch.zeros(2, 10, 10, 10)
    prob[1, 5:] = 1.0
    prob[0] = 1.0 - prob[1]
    a_src = np.diag([2.0, 2.0, 2.0, 1.0])
    a_dst = np.diag([1.0, 1.0, 1.0, 1.0])
    out = probabilities_to_labels_on_grid(prob, a_src, (20, 20, 20), a_dst, [3, 9], slab_voxels=400)
    assert out.shape == (1, 20, 20, 20)
    assert set(torch.unique(out).tolist()) == {3, 9}
    # the boundary lies halfway between source voxels 4 and 5 (world 8 and 10 mm) -> 9 mm
    assert (out[0, :9] == 3).all() and (out[0, 10:] == 9).all()
    # identical grid: plain argmax
    same = probabilities_to_labels_on_grid(prob, a_src, (10, 10, 10), a_src, [3, 9])
    assert torch.equal(same[0], torch.tensor([3, 9])[prob.argmax(0)])


def test_sliding_window_matches_whole_volume_and_flips_are_undone():
    torch.manual_seed(0)
    net = IntensityClassifier()
    x = torch.rand(1, 40, 36, 28)
    whole = torch.softmax(net(x[None]), 1)[0]
    sw = sliding_window_probabilities(net, x, (16, 16, 16), torch.device("cpu"), overlap=0.5)
    assert torch.allclose(sw, whole, atol=1e-5)
    # a network that is not flip-equivariant: test-time flips must still give probabilities on the
    # original (unflipped) positions, i.e. the average of the net applied to each flipped copy
    ramp = torch.linspace(0, 1, 40).view(1, 1, 40, 1, 1)

    class Positional(nn.Module):
        def forward(self, t):
            r = ramp[:, :, : t.shape[2]].expand_as(t)
            return torch.cat([10 * r, 10 * t], 1)

    flipped = sliding_window_probabilities(Positional(), x, (40, 36, 28), torch.device("cpu"), tta=(0,))
    a = torch.softmax(Positional()(x[None]), 1)[0]
    b = torch.softmax(Positional()(x[None].flip(2)), 1)[0].flip(1)
    assert torch.allclose(flipped, (a + b) / 2, atol=1e-5)


def test_model_dir_round_trip_and_no_pickles(tmp_path):
    backbone = build_model("tiny", seed=1)
    net = SegmentationNet(backbone, backbone.out_channels, len(IDS))
    with torch.no_grad():
        net.head.bias.copy_(torch.tensor([0.0, 0.0, 50.0]))  # everything becomes class 2 -> id 42
        net.head.weight.zero_()
    m = meta()
    save_model_dir(net, m, tmp_path / "model")
    assert is_model_dir(tmp_path / "model")
    files = [p for p in (tmp_path / "model").rglob("*") if p.is_file()]
    assert files and all(p.suffix in (".json", ".safetensors") for p in files)
    desc = json.loads((tmp_path / "model" / "segmentation.json").read_text())
    assert desc["label_ids"] == IDS and desc["orientation"] == "RAS" and desc["spacing"] == [1.5, 1.5, 1.5]
    assert desc["normalisation"]["modality"] == "mr"
    loaded, m2 = load_model_dir(tmp_path / "model")
    assert m2.label_ids == IDS
    x = torch.rand(1, 1, 32, 32, 32)
    assert torch.allclose(loaded(x), net.eval()(x), atol=1e-5)
    img = Volume(torch.rand(1, 20, 24, 18), make_affine())
    seg = segment(tmp_path / "model", img)
    assert seg.shape == img.shape and (seg.data == 42).all()


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="not a synthvox segmentation model"):
        read_meta(tmp_path)
    with pytest.raises(InputError, match="not found"):
        read_meta(tmp_path / "nope")
    (tmp_path / "segmentation.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(InputError, match="wrong format"):
        read_meta(tmp_path)
    with pytest.raises(InputError, match="single-channel"):
        segment_with(IntensityClassifier(), meta(), Volume(torch.rand(2, 8, 8, 8), np.eye(4)))
    with pytest.raises(InputError, match="3D"):
        segment_with(IntensityClassifier(), meta(), Volume(torch.rand(1, 8, 8, 1), np.eye(4)))


def test_resampled_input_segments_consistently():
    """The same anatomy on two different grids segments to the same world-space labels."""
    a1 = np.diag([1.0, 1.0, 1.0, 1.0])
    a1[:3, 3] = -24.0
    lab1 = world_labels((48, 48, 48), a1)
    img1 = Volume(intensity_of(lab1), a1)
    a2 = make_affine(spacing=(1.7, 1.1, 1.4), angles=(0.0, 0.4, -0.3), flips=(1, -1, 1))
    a2[:3, 3] = -a2[:3, :3] @ (np.array([28, 40, 32]) - 1) / 2
    img2 = resample_to_grid(img1, (28, 40, 32), a2)
    s1 = segment_with(IntensityClassifier(), meta(), img1)
    s2 = segment_with(IntensityClassifier(), meta(), img2)
    back = resample_to_grid(s2, s1.shape, s1.affine, mode="nearest")
    assert dice(back.data, s1.data, 7) > 0.9
