"""The feature probe (benchmarks/features.py): its measures on features whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks import common, features


def _labels() -> np.ndarray:
    lab = np.zeros((24, 24, 24), np.int64)
    lab[4:12, 4:20, 4:20] = 1
    lab[12:20, 4:20, 4:12] = 2
    lab[12:20, 4:20, 12:20] = 3
    return lab


def test_knn_transfer_perfect_random_and_chance() -> None:
    lab = _labels()
    onehot = torch.from_numpy(np.stack([lab == c for c in range(4)]).astype(np.float32))
    rng = np.random.default_rng(0)
    assert features.knn_transfer(onehot, lab, onehot * 3.0, lab, 50, 5, rng) == 1.0
    noise = torch.randn(8, *lab.shape, generator=torch.Generator().manual_seed(0))
    acc = features.knn_transfer(noise, lab, torch.randn_like(noise), lab, 80, 5, rng)
    assert 0.15 < acc < 0.55  # chance is 1/3


def test_local_matching_finds_unique_features_and_not_shifted_ones() -> None:
    lab = _labels()
    regions = features._regions(lab)
    assert regions["boundary"].any() and regions["interior"].any()
    assert not (regions["interior"] & regions["boundary"]).any()
    rng = np.random.default_rng(0)
    coords = torch.stack(torch.meshgrid(*(torch.arange(24.0),) * 3, indexing="ij"))  # unique per voxel
    assert features.local_match(coords, coords, regions["boundary"], 100, rng) == 1.0
    shifted = coords + torch.tensor([3.0, 0, 0])[:, None, None, None]  # each query looks like the voxel 3 further on
    assert features.local_match(coords, shifted, regions["interior"], 100, rng) == 0.0
    near = coords + torch.tensor([1.0, 0, 0])[:, None, None, None]  # one voxel off still counts
    assert features.local_match(coords, near, regions["interior"], 100, rng) == 1.0
    flat = torch.zeros(1, 24, 24, 24)  # no information: the first candidate (a corner offset) always wins
    assert features.local_match(flat, flat, regions["interior"], 100, rng) == 0.0


@pytest.mark.skipif(not common.has_shared_data(), reason="shared data not found")
def test_quick_probe_on_one_subject(tmp_path) -> None:
    assert features.main(["--quick", "--datasets", "nichart", "--subjects", "Subj1", "--reg-pairs", "0", "--fov", "none",
                          "--out", str(tmp_path)]) == 0
    import json

    p = json.loads((tmp_path / "features.json").read_text())
    mean = p["results"]["nichart"]["mean"]
    assert set(mean) == {"intensity", "mind", next(k for k in mean if k.startswith("net["))}
    assert mean["mind"]["boundary"] > mean["intensity"]["boundary"]  # MIND localises better than raw intensity across contrasts
    assert all(0 <= v <= 1 for row in mean.values() for v in row.values())
    assert (tmp_path / "features.md").read_text().count("|") > 10
    assert "inter" not in mean["mind"]  # one subject: no inter-subject pair


@pytest.mark.skipif(not common.has_shared_data(), reason="shared data not found")
def test_inter_subject_affine_dice_on_mind_beats_the_headers() -> None:
    """Two subjects: both directions, MIND-SSC only (intensity has no such row); the affine stage on MIND
    lands well above the headers' 0.19 mean Dice of these pairs."""
    rows = features.inter_subject_affine(["Subj1", "Subj2"], [("intensity", None, "intensity"), ("mind", None, "mind")])
    assert [r["pair"] for r in rows] == ["Subj2->Subj1", "Subj1->Subj2"]
    assert all("intensity" not in r and 0.45 < r["mind"] < 0.9 for r in rows)


@pytest.mark.skipif(not common.has_shared_data(), reason="shared data not found")
def test_registration_rows_compute_each_network_once_per_image_and_keep_networks_apart() -> None:
    """The probe's registration section: ``net`` and ``both`` of one network share its features of
    each image (one pass per image), two networks never share them, and a network loaded twice from
    the same weights is recognised."""
    from synthvox.models.registry import build_model
    from synthvox.registration.descriptors import FeatureExtractor

    a, b, a_again = build_model("tiny", seed=0), build_model("tiny", seed=1), build_model("tiny", seed=0)
    calls: list[int] = []
    original = FeatureExtractor._net

    def counting(self, image, modality):
        calls.append(id(self.model))
        return original(self, image, modality)

    FeatureExtractor._net = counting
    try:
        rows = features.registration_dice([("a", a), ("b", b)], 1, quick=True)
        # fixed and moving once each for net and both, and the moving image on each registration's own
        # working grid (matched_fov: after its own affine, so not shared)
        assert calls.count(id(a)) == 2 + 2 and calls.count(id(b)) == 2 + 2 and len(calls) == 8
        img = torch.rand(1, 12, 12, 12)
        with common.FeatureCache():
            same = [FeatureExtractor(kind="net", model=m).raw(img, "fixed")["net"] for m in (a, a_again)]
        assert torch.equal(*same) and len(calls) == 9  # the copy of a's weights: from the cache
    finally:
        FeatureExtractor._net = original
    assert set(rows) == {"mind", "net:a", "both:a", "net:b", "both:b"}
    assert rows["net:a"]["pairs"] != rows["net:b"]["pairs"]
    assert all(0 <= r["mean_dice"] <= 1 for r in rows.values())


def _tiny(norm: str):
    from synthvox.models.unet import UNet

    torch.manual_seed(0)
    return UNet(out_channels=4, base_channels=4, levels=1, norm=norm).eval()


def test_fov_variants_keep_the_original_voxels_where_the_offset_says() -> None:
    """Features that are the image itself do not change in the central half under any change; features
    that are not where the offset says do."""
    x = torch.rand(2, 40, 40, 40, generator=torch.Generator().manual_seed(0))
    for change in features.FOV_CHANGES:
        v, off = features.fov_variant(x, change, 8)
        assert features.fov_change(x, v, off) == 0.0
        assert features.fov_change(x, v, off + 1) > 1.0  # independent noise one voxel off: twice the variance
    assert features.fov_variant(x, "pad", 8)[0].shape[1:] == (56, 56, 56)
    assert features.fov_variant(x, "crop", 8)[0].shape[1:] == (24, 24, 24)
    assert features.fov_variant(x, "shift", 8)[0].shape[1:] == (40, 40, 40)
    assert features.central_half((40, 41)) == (slice(10, 30), slice(10, 31))


def test_fov_rows_instance_norm_moves_frozen_statistics_and_layer_norm_do_not() -> None:
    """On a tiny network whose receptive field (about 11 voxels) ends inside the central half of an 80³
    image however it is changed by 4 voxels: instance normalisation moves with the field of view, the
    frozen-statistics control and ``norm="layer"`` do not (to float32 precision); the ``+S`` rows scale
    after the change."""
    g = torch.Generator().manual_seed(1)
    raw = 100.0 * torch.rand(1, 80, 80, 80, generator=g)
    raw[..., :40] += 200.0
    inst = features.fov_features(_tiny("instance"), raw, list(features.FOV_CHANGES), ["foreground"], margin=4)
    assert set(inst) == {"once", "frozen", "+foreground"}
    assert all(inst["once"][c] > 1e-4 for c in features.FOV_CHANGES)
    assert all(inst["frozen"][c] < 1e-5 for c in features.FOV_CHANGES)
    layer = features.fov_features(_tiny("layer"), raw, ["pad"], ["percentile"], margin=4)
    assert set(layer) == {"once", "+percentile"} and layer["once"]["pad"] < 1e-5  # no instance norm: no control
    net = _tiny("instance")
    before = net(raw[None] / 300.0)
    with features.FrozenNormStats(net):
        pass
    assert torch.equal(net(raw[None] / 300.0), before)  # the layers are themselves again after the control


@pytest.mark.skipif(not common.has_shared_data(), reason="shared data not found")
def test_fov_term_on_a_nichart_t1_mind_does_not_move() -> None:
    """MIND-SSC is local: no change in the central half; a network's rows per subject and change."""
    model = _tiny("layer")
    res = features.fov_term(["Subj1"], [("tiny", model)], ["pad"], ["foreground"])
    assert res["mean"]["mind"] == {"pad": 0.0}
    assert set(res["rows"]) == {"mind", "tiny", "tiny +foreground"}
    assert res["rows"]["tiny"]["Subj1"]["pad"] < 1e-5
    assert 0 <= res["rows"]["tiny +foreground"]["Subj1"]["pad"] < 1
