"""Atlas segmentation: labels carried by registration and fused (majority, locally weighted, + model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_registration import CFG, phantom, warped_pair

from synthvox.errors import InputError
from synthvox.metrics import dice_per_label
from synthvox.segmentation.atlas import Atlas, RegisteredAtlas, Target, fuse, segment_with_atlases
from synthvox.volume import Volume


def labels_of(img: torch.Tensor) -> torch.Tensor:
    """Label ids 0 / 7 / 1042 from the phantom's intensity bands (a big id on purpose)."""
    return ((img > 0.2).long() * 7 + (img > 0.55).long() * 1035)


def mean_dice(seg: torch.Tensor, ref: torch.Tensor, ids=(7, 1042)) -> float:
    return float(np.mean(list(dice_per_label(seg, ref, list(ids)).values())))


def on_grid(lab: torch.Tensor, distance: torch.Tensor | None = None) -> RegisteredAtlas:
    """An atlas already on the target grid (zero displacement), for testing the fusion alone."""
    shape = tuple(lab.shape[1:])
    atlas = Atlas(Volume(lab.float(), np.eye(4)), Volume(lab, np.eye(4)))
    return RegisteredAtlas(atlas, torch.zeros((3, *shape)), distance, {})


def target_of(shape) -> Target:
    return Target(Volume(torch.ones((1, *shape)), np.eye(4)), torch.ones(shape, dtype=torch.bool))


def blocks(shape=(12, 10, 8)) -> list[torch.Tensor]:
    """Three label maps that disagree on one slab each."""
    base = torch.zeros((1, *shape), dtype=torch.int64)
    base[:, 2:10, 2:8, 2:6] = 5
    a, b, c = base.clone(), base.clone(), base.clone()
    a[:, 0:2] = 900  # only atlas a claims the first slabs
    b[:, 10:] = 900
    return [a, b, c]


def test_majority_vote_keeps_ids_and_follows_the_majority():
    maps = blocks()
    t = target_of(maps[0].shape[1:])
    f = fuse(t, [on_grid(m) for m in maps], [0, 5, 900], fusion="majority")
    seg, w = f.labels, f.mean_weights
    assert seg.dtype == torch.int64 and tuple(seg.shape) == tuple(maps[0].shape[1:])
    assert torch.equal(seg, maps[2][0])  # each disagreement is one atlas against two
    assert w == [1.0, 1.0, 1.0]


def test_fused_probabilities_and_the_atlases_agreement():
    maps = blocks()
    maps[0][:, 4:6, 2:8, 2:6] = 900  # atlas a also dissents inside the structure
    t = target_of(maps[0].shape[1:])
    f = fuse(t, [on_grid(m) for m in maps], [0, 5, 900], fusion="majority", probabilities=True)
    p = f.probabilities
    assert p.shape == (3, *maps[0].shape[1:])
    torch.testing.assert_close(p.sum(0), torch.ones(p.shape[1:]), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor([0, 5, 900])[p.argmax(0)], f.labels, rtol=0, atol=0)
    # where the three agree the share is 1, where one atlas dissents 2/3; the figure averages the
    # fused foreground (every voxel but background)
    fg = f.labels != 0
    expected = float(torch.where((maps[0][0] == maps[1][0]) & (maps[1][0] == maps[2][0]), 1.0, 2 / 3)[fg].mean())
    assert f.agreement == pytest.approx(expected, abs=1e-6) and 2 / 3 < f.agreement < 1
    same = fuse(t, [on_grid(maps[2])] * 3, [0, 5, 900], fusion="majority")
    assert same.agreement == pytest.approx(1.0) and same.probabilities is None


def test_weighted_vote_prefers_the_atlas_that_matches_locally():
    maps = blocks()
    shape = tuple(maps[0].shape[1:])
    d_good, d_bad = torch.zeros(shape), torch.ones(shape) * 10
    # atlas a matches the target far better than b and c: its claim on the first slabs wins there
    reg = [on_grid(maps[0], d_good), on_grid(maps[1], d_bad), on_grid(maps[2], d_bad)]
    f = fuse(target_of(shape), reg, [0, 5, 900], fusion="weighted", beta=0.5)
    seg, w = f.labels, f.mean_weights
    assert (seg[0:2] == 900).all()
    assert (seg[10:] == 0).all()  # b's claim is outvoted by the better atlas a (and c)
    assert w[0] > w[1] == pytest.approx(w[2])
    with pytest.raises(InputError, match="feature differences"):
        fuse(target_of(shape), [on_grid(maps[0])], [0, 5, 900], fusion="weighted")


def test_model_probabilities_are_one_more_voter_and_uncovered_voxels_are_background():
    shape = (6, 6, 6)
    lab = torch.zeros((1, *shape), dtype=torch.int64)
    lab[:, :3] = 3
    prob = torch.zeros((2, *shape))
    prob[1, :, :3] = 1.0  # the model says label 8 on the first half of the second axis
    prob[0, :, 3:] = 1.0
    reg = [on_grid(lab), on_grid(lab)]
    seg = fuse(target_of(shape), reg, [0, 3, 8], fusion="majority", model_probabilities=(prob, [0, 8])).labels
    # two atlases outvote the model where they disagree; where they say background, so does the model
    assert torch.equal(seg, lab[0])
    seg = fuse(target_of(shape), reg[:1], [0, 3, 8], fusion="majority", model_probabilities=(prob * 2, [0, 8])).labels
    assert (seg[:3, :3] == 8).all()  # a confident model outvotes a single atlas
    far = on_grid(lab)
    far.displacement[0] += 100.0  # every voxel maps outside the atlas
    seg = fuse(target_of(shape), [far], [0, 3], fusion="majority").labels
    assert (seg == 0).all()


def test_atlases_registered_onto_a_deformed_target_beat_no_registration():
    img = phantom(32)
    lab = labels_of(img)
    moving, _ = warped_pair(img, amp=2.5)
    tlab = labels_of(moving)
    aff = np.eye(4)
    inverted = (img.max() - img) * (img > 0)  # another contrast
    atlases = [Atlas(Volume(img, aff), Volume(lab, aff), name="same"),
               Atlas(Volume(inverted, aff), Volume(lab, aff), name="inverted")]
    before = mean_dice(lab[0], tlab[0])
    lines: list[str] = []
    for fusion in ("majority", "weighted"):
        res = segment_with_atlases(Volume(moving, aff), atlases, fusion=fusion, config=CFG, log=lines.append)
        assert res.labels.shape == moving.shape[1:] and np.allclose(res.labels.affine, aff)
        assert set(torch.unique(res.labels.data).tolist()) <= {0, 7, 1042}
        after = mean_dice(res.labels.data[0], tlab[0])
        assert after > before + 0.03 and after > 0.85, (fusion, before, after)
        assert [a["name"] for a in res.report["atlases"]] == ["same", "inverted"]
        assert res.report["fusion"] == fusion and res.report["label_ids"] == [0, 7, 1042]
    assert any("registered" in line for line in lines) and any("fusion" in line for line in lines)
    assert all(0 < a["mean_weight"] <= 1 for a in res.report["atlases"])


def test_atlases_are_registered_on_the_atlas_spacing_unless_a_config_is_given(monkeypatch):
    import synthvox.registration as reg
    from synthvox.segmentation import atlas as atlas_mod

    used = []
    real = reg.register

    def spy(*args, **kwargs):
        used.append(kwargs["config"])
        return real(*args, **kwargs)

    monkeypatch.setattr(reg, "register", spy)
    img = phantom(32)
    atlases = [Atlas(Volume(img, np.eye(4)), Volume(labels_of(img), np.eye(4)))]
    segment_with_atlases(Volume(img, np.eye(4)), atlases, fusion="majority")
    segment_with_atlases(Volume(img, np.eye(4)), atlases, fusion="majority", config=CFG)
    assert used[0].spacing == atlas_mod.ATLAS_SPACING != reg.RegistrationConfig().spacing
    assert used[1] is CFG


def test_bad_atlases_and_settings_are_refused():
    img = phantom(24)
    aff = np.eye(4)
    lab = labels_of(img)
    good = Atlas(Volume(img, aff), Volume(lab, aff))
    with pytest.raises(InputError, match="at least one atlas"):
        segment_with_atlases(Volume(img, aff), [])
    with pytest.raises(InputError, match="grid"):
        segment_with_atlases(Volume(img, aff), [Atlas(Volume(img, aff), Volume(lab[:, :20], aff))])
    with pytest.raises(InputError, match="only one label"):
        segment_with_atlases(Volume(img, aff), [Atlas(Volume(img, aff), Volume(torch.zeros_like(lab), aff))])
    with pytest.raises(InputError, match="non-integer"):
        segment_with_atlases(Volume(img, aff), [Atlas(Volume(img, aff), Volume(lab.float() + 0.3, aff))])
    with pytest.raises(InputError, match="fusion"):
        segment_with_atlases(Volume(img, aff), [good], fusion="staple")
    with pytest.raises(InputError, match="beta"):
        segment_with_atlases(Volume(img, aff), [good], beta=0)
    with pytest.raises(InputError, match="single-channel"):
        segment_with_atlases(Volume(img.repeat(2, 1, 1, 1), aff), [good])


def test_weighted_fusion_on_network_features_sees_the_target_at_the_network_spacing():
    """--features net with weighted fusion: the fusion's features, like registration's, come from the
    network run at its card's spacing (here 2 mm on a 1 x 1 x 2 mm target: zoom 0.5, 0.5, 1)."""
    from test_registration import _Recorder

    img = phantom(32)
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    rec = _Recorder({"data": {"size": [32, 32, 32], "synth": {"labels": {"fov_mm": 64.0}}}})
    atlases = [Atlas(Volume(img, aff), Volume(labels_of(img), aff), name="a")]
    res = segment_with_atlases(Volume(img, aff), atlases, features="net", weights=rec, fusion="weighted", config=CFG)
    assert res.labels.shape == img.shape[1:]
    assert (17, 17, 32) in rec.shapes  # the fusion weights: 32 x 32 x 32 voxels at 1 x 1 x 2 mm, seen at 2 mm


def test_weighted_fusion_weighs_the_feature_sets_and_sees_the_spacing_as_registration_does(monkeypatch):
    """--features both with weighted fusion: the target's features give the network the share that
    registration gives it (the config's net_share, else the card's), and the network sees the target
    at the config's net_spacing when one is given."""
    from dataclasses import replace

    from test_registration import _Recorder

    from synthvox.segmentation import atlas as atlas_mod

    targets = []
    real = atlas_mod.prepare_target
    monkeypatch.setattr(atlas_mod, "prepare_target", lambda *a, **k: targets.append(real(*a, **k)) or targets[-1])
    img = phantom(32)
    aff = np.eye(4)
    atlases = [Atlas(Volume(img, aff), Volume(labels_of(img), aff), name="a")]
    card = {"data": {"size": [32, 32, 32], "synth": {"labels": {"fov_mm": 64.0}}}, "registration": {"net_share": 0.2}}
    for cfg in (CFG, replace(CFG, net_share=0.7, net_spacing=4.0)):
        rec = _Recorder(card)
        segment_with_atlases(Volume(img, aff), atlases, features="both", weights=rec, fusion="weighted", config=cfg)
        assert ((9, 9, 9) if cfg.net_spacing == 4.0 else (17, 17, 17)) in rec.shapes  # 32 voxels of 1 mm at 4 or 2 mm
    assert [t.shares["net"] for t in targets] == [0.2, 0.7]
    assert all(t.shares["mind"] == pytest.approx(1 - t.shares["net"]) for t in targets)
    # the shares split the target's features' variance: the network's channels carry its share
    for t, share in zip(targets, (0.2, 0.7)):
        f = t.features.reshape(t.features.shape[0], -1)[:, t.foreground.reshape(-1)]
        net_var = float(f[12:].var(dim=1).sum())  # MIND-SSC's 12 channels come first
        assert abs(net_var - share) < 0.05


def test_auto_features_are_resolved_by_the_weights_card():
    """``features="auto"`` with weighted fusion: the card's choice (the shipped card: mind) gives the same
    labels as naming it. Failed with "unknown feature kind 'auto'" before segment_with_atlases used the
    resolved kind."""
    from synthvox.models.card import auto_features

    img = phantom(32)
    moving, _ = warped_pair(img, amp=2.5)
    aff = np.eye(4)
    atlases = [Atlas(Volume(img, aff), Volume(labels_of(img), aff))]
    chosen = auto_features()  # the shipped weights' card
    res = segment_with_atlases(Volume(moving, aff), atlases, fusion="weighted", features="auto", config=CFG)
    named = segment_with_atlases(Volume(moving, aff), atlases, fusion="weighted", features=chosen, config=CFG)
    assert res.report["features"] == chosen
    assert torch.equal(res.labels.data, named.labels.data)
