"""Label ensembles: sampling, rendering, identity of shapes under the affine, foreground, envelope."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from synthvox.errors import InputError
from synthvox.shapes import ShapeBank
from synthvox.synth.labels import (
    Foreground,
    LabelConfig,
    LabelParams,
    TemplatePlacement,
    TemplateSet,
    render_labels,
    render_labels_batch,
    sample_label_params,
)
from synthvox.synth.spatial import AffineParams, AffineRange, sample_affine

# Small, fast settings: 32-48 voxel volumes, 32^3 template cubes, a small procedural pool.
FAST = dict(max_resolution=32, procedural_pool=6)


def _ellipsoid(shape=(30, 20, 14)) -> np.ndarray:
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    return x**2 + y**2 + z**2 <= 0.95


def _bank() -> ShapeBank:
    """A solid ellipsoid (60 x 40 x 28 mm) and a thin plate (one voxel thick), at 2 mm."""
    plate = np.zeros((24, 24, 3), dtype=bool)
    plate[:, :, 1] = True
    return ShapeBank.from_masks([_ellipsoid(), plate], 2.0, [{"source": "test", "label": 1}, {"source": "test", "label": 2}])


def _single(index: int, affine: AffineParams, size=(48, 48, 48), voxel_mm=2.0) -> LabelParams:
    centre = tuple((s - 1) / 2 for s in size)
    return LabelParams(tuple(size), voxel_mm, (TemplatePlacement("bank", index, affine, centre),), None)


@pytest.fixture(scope="module")
def bank_set():
    cfg = LabelConfig(size=(48, 48, 48), **FAST)
    return cfg, TemplateSet.from_bank(_bank(), cfg), TemplateSet.procedural(cfg)


def test_params_deterministic_and_json_round_trip():
    cfg = LabelConfig(size=(32, 48, 40), **FAST)
    a = sample_label_params(torch.Generator().manual_seed(3), cfg, 100)
    b = sample_label_params(torch.Generator().manual_seed(3), cfg, 100)
    assert a == b
    assert 20 <= len(a.templates) <= 40
    assert LabelParams.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    c = sample_label_params(torch.Generator().manual_seed(4), cfg, 100)
    assert c != a


def test_param_probabilities():
    cfg = LabelConfig(size=(32, 32, 32), **FAST)
    g = torch.Generator().manual_seed(0)
    ps = [sample_label_params(g, cfg, 10) for _ in range(600)]
    fg = np.mean([p.foreground is not None for p in ps])
    env = np.mean([p.foreground is not None and p.foreground.envelope > 0 for p in ps])
    proc = np.mean([t.source == "procedural" for p in ps for t in p.templates])
    assert fg == pytest.approx(2 / 3, abs=0.06)
    assert env == pytest.approx(1 / 3, abs=0.06)
    assert proc == pytest.approx(cfg.procedural_fraction, abs=0.03)
    assert all(t.source == "procedural" for t in sample_label_params(g, cfg, 0).templates)


def test_rendered_maps_are_contiguous_and_sized():
    for size in ((32, 48, 40), (40, 32, 32)):
        cfg = LabelConfig(size=size, **FAST)
        proc = TemplateSet.procedural(cfg)
        for seed in range(2):
            p = sample_label_params(torch.Generator().manual_seed(seed), cfg, 0)
            lab = render_labels(p, cfg, None, None, procedural=proc)
            assert lab.shape == size and lab.dtype == torch.int64
            ids = lab.unique().tolist()
            assert ids == list(range(len(ids))), ids  # 0..K-1, none missing
            assert len(ids) >= 5  # a scene, not one giant label
            assert len(ids) <= len(p.templates) + 3


def test_identity_keeps_shape_and_volume(bank_set):
    cfg, bank, proc = bank_set
    lab = render_labels_batch([_single(0, AffineParams())], cfg, bank, proc)[0]
    # Placed at the bank's own spacing, the template is the ellipsoid itself (centred).
    ref = np.zeros((48, 48, 48), dtype=bool)
    ref[9:39, 14:34, 17:31] = _ellipsoid()
    got = lab.numpy() > 0
    dice = 2 * (got & ref).sum() / (got.sum() + ref.sum())
    assert dice > 0.9
    assert got.sum() == pytest.approx(ref.sum(), rel=0.06)


def test_volume_ratio_is_the_affine_determinant(bank_set):
    cfg, bank, proc = bank_set
    base = int((render_labels_batch([_single(0, AffineParams())], cfg, bank, proc)[0] > 0).sum())
    g = torch.Generator().manual_seed(1)
    rng = AffineRange(scale=(0.6, 1.3), shear=0.3)
    for _ in range(4):
        a = sample_affine(g, rng)
        vol = int((render_labels_batch([_single(0, a)], cfg, bank, proc)[0] > 0).sum())
        assert vol / base == pytest.approx(float(np.prod(a.scale)), rel=0.08)
        # The same shape rotated (and flipped) has the same volume.
        rot = AffineParams(scale=a.scale, shear=a.shear, rotation=(0.5, 0.5, -0.5, 0.5), flip=(True, False, False))
        vol_rot = int((render_labels_batch([_single(0, rot)], cfg, bank, proc)[0] > 0).sum())
        assert vol_rot == pytest.approx(vol, rel=0.05)


def test_thin_templates_survive(bank_set):
    cfg, bank, proc = bank_set
    lab = render_labels_batch([_single(1, AffineParams())], cfg, bank, proc)[0]
    # A 24 x 24 x 1 voxel plate keeps about its 576 voxels.
    assert int((lab > 0).sum()) == pytest.approx(576, rel=0.35)


def test_later_templates_overwrite_earlier(bank_set):
    cfg, bank, proc = bank_set
    c = (23.5, 23.5, 23.5)
    first = TemplatePlacement("bank", 0, AffineParams(), c)
    second = TemplatePlacement("bank", 0, AffineParams(scale=(0.5, 0.5, 0.5)), (23.5, 23.5, 23.5))
    lab = render_labels_batch([LabelParams((48, 48, 48), 2.0, (first, second), None)], cfg, bank, proc)[0]
    assert int(lab[24, 24, 24]) == 2  # the smaller, later one is on top in the middle
    assert int((lab == 1).sum()) > 0
    swapped = render_labels_batch([LabelParams((48, 48, 48), 2.0, (second, first), None)], cfg, bank, proc)[0]
    alone = render_labels_batch([LabelParams((48, 48, 48), 2.0, (first,), None)], cfg, bank, proc)[0]
    # The big later one hides the small one entirely; the hidden id is dropped (ids stay contiguous).
    assert torch.equal(swapped, alone)


def test_foreground_confines_templates_and_envelope_is_a_shell(bank_set):
    cfg, bank, proc = bank_set
    placements = tuple(
        TemplatePlacement("bank", 0, AffineParams(scale=(0.8, 0.8, 0.8)), (x, y, 23.5)) for x in (10.0, 36.0) for y in (10.0, 36.0)
    )
    plain = LabelParams((48, 48, 48), 2.0, placements, Foreground(seed=3, radius=0.3, roughness=0.1, envelope=0))
    lab = render_labels_batch([plain], cfg, bank, proc)[0].numpy()
    fill = lab.max()  # the sphere's own label comes after the templates
    assert lab[0, 0, 0] == 0 and lab[-1, -1, -1] == 0  # corners: outside the sphere
    inside = lab > 0
    # One compact foreground region: everything labelled is in the sphere, which is mostly filled
    # by its own label or templates, and nothing labelled lies far from the centre.
    x, y, z = np.meshgrid(*[np.arange(48) - 23.5] * 3, indexing="ij")
    r = np.sqrt(x**2 + y**2 + z**2)
    assert r[inside].max() < 48 * 0.3 * np.exp(3 * 0.1) + 2
    free = render_labels_batch([LabelParams((48, 48, 48), 2.0, placements, None)], cfg, bank, proc)[0].numpy()
    assert r[free > 0].max() > r[inside].max() + 3  # without the sphere the templates reach further
    assert (lab == fill).sum() > 0
    env = LabelParams((48, 48, 48), 2.0, placements, Foreground(seed=3, radius=0.3, roughness=0.1, envelope=2))
    lab2 = render_labels_batch([env], cfg, bank, proc)[0].numpy()
    shell = lab2 == lab2.max()
    assert lab2.max() >= fill  # one more label (a template cut away entirely may drop out)
    # It straddles the surface: part of it lies outside the plain foreground, part inside.
    assert (shell & (lab == 0)).sum() > 0.2 * shell.sum()
    assert (shell & (lab > 0)).sum() > 0.2 * shell.sum()
    # The envelope straddles the surface: every shell voxel is within 2 * width of the background,
    # and it encloses the rest of the foreground (no other label touches the background).
    dist = ndimage.distance_transform_edt(lab2 > 0)
    assert dist[shell].max() <= 5
    others = (lab2 > 0) & ~shell
    assert dist[others].min() > 1


def test_batch_equals_single_renders():
    cfg = LabelConfig(size=(32, 32, 32), **FAST)
    ps = [sample_label_params(torch.Generator().manual_seed(s), cfg, 0) for s in (10, 11)]
    proc = TemplateSet.procedural(cfg)
    both = render_labels_batch(ps, cfg, None, proc)
    for i, p in enumerate(ps):
        assert torch.equal(both[i], render_labels(p, cfg, None, None, procedural=proc))
    assert not torch.equal(both[0], both[1])


def test_bank_params_need_a_bank():
    cfg = LabelConfig(size=(32, 32, 32), **FAST)
    p = sample_label_params(torch.Generator().manual_seed(0), cfg, 5)
    with pytest.raises(ValueError, match="no bank"):
        render_labels(p, cfg, None, None)


def test_config_rejects_bad_values():
    with pytest.raises(InputError):
        LabelConfig(size=(0, 32, 32))
    with pytest.raises(InputError):
        LabelConfig(n_templates=(30, 20))
    with pytest.raises(InputError):
        LabelConfig(p_foreground=1.5)


# ----------------------------------------------------------------------------------------------------
# No position shortcut: the foreground's shift and the whole-scene flips and affine (issue 22)

STILL = dict(scene_flip=0.0, scene_affine=0.0, foreground_shift=0.0)


def test_scene_defaults_are_the_reference_values():
    cfg = LabelConfig()
    assert (cfg.foreground_shift, cfg.scene_flip, cfg.scene_affine, cfg.scene_scale, cfg.scene_rotation_deg) == (
        0.25, 0.9, 0.5, 0.4, 45.0)


@pytest.mark.parametrize("key,value", [("foreground_shift", 0.6), ("scene_flip", 1.5), ("scene_affine", -0.1),
                                       ("scene_scale", 1.0), ("scene_rotation_deg", 200.0)])
def test_scene_settings_out_of_range_are_refused(key, value):
    with pytest.raises(InputError, match=key):
        LabelConfig(**{key: value})


def test_scene_draws_follow_their_probabilities_and_records_round_trip():
    cfg = LabelConfig(size=(32, 32, 32), p_foreground=1.0, **FAST)
    params = [sample_label_params(torch.Generator().manual_seed(s), cfg, 0) for s in range(200)]
    flipped = np.mean([p.scene is not None and any(p.scene.flip) for p in params])
    scaled = np.mean([p.scene is not None and p.scene.scale != (1.0, 1.0, 1.0) for p in params])
    assert 0.9 * 7 / 8 - 0.08 < flipped < 0.9 * 7 / 8 + 0.08  # p 0.9, then each axis with p 1/2
    assert 0.42 < scaled < 0.58
    shifts = np.array([p.foreground.shift for p in params])
    assert np.abs(shifts).max() <= 0.25 * 32 + 1e-9 and np.abs(shifts).max() > 0.2 * 32
    for p in params[:5]:
        assert LabelParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    still = sample_label_params(torch.Generator().manual_seed(0), LabelConfig(size=(32, 32, 32), p_foreground=1.0, **FAST, **STILL), 0)
    assert still.scene is None and still.foreground.shift == (0.0, 0.0, 0.0)
    # the templates are drawn as without the scene keys, then moved with the foreground
    moved = params[0]
    assert [(t.source, t.index, t.affine) for t in still.templates] == [(t.source, t.index, t.affine) for t in moved.templates]
    np.testing.assert_allclose([t.centre for t in still.templates],
                               np.array([t.centre for t in moved.templates]) - np.array(moved.foreground.shift), atol=1e-9)


def test_a_record_without_scene_keys_still_replays():
    cfg = LabelConfig(size=(24, 24, 24), p_foreground=1.0, **FAST)
    p = sample_label_params(torch.Generator().manual_seed(1), cfg, 0)
    d = p.to_dict()
    d.pop("scene")
    d["foreground"].pop("shift")
    old = LabelParams.from_dict(d)
    assert old.scene is None and old.foreground.shift == (0.0, 0.0, 0.0)
    assert render_labels(old, cfg, None, None).shape == (24, 24, 24)


def test_the_foreground_moves_by_its_recorded_shift():
    cfg = LabelConfig(size=(40, 40, 40), p_foreground=1.0, p_envelope=0.0, foreground_radius=(0.3, 0.3),
                      foreground_roughness=(0.0, 0.0), n_templates=(1, 1), **FAST, **STILL)
    p = sample_label_params(torch.Generator().manual_seed(0), cfg, 0)
    fg = p.foreground
    for shift in [(8.0, -6.0, 3.0), (-9.0, 0.0, 7.0)]:
        moved = LabelParams(p.size, p.voxel_mm, p.templates, Foreground(fg.seed, fg.radius, fg.roughness, 0, shift))
        centroid = np.argwhere(render_labels(moved, cfg, None, None).numpy() > 0).mean(axis=0)
        np.testing.assert_allclose(centroid, 19.5 + np.asarray(shift), atol=1.0)


def test_the_scene_transform_mirrors_and_moves_the_whole_map():
    cfg = LabelConfig(size=(32, 36, 28), p_foreground=1.0, **FAST, **STILL)
    p = sample_label_params(torch.Generator().manual_seed(5), cfg, 0)
    plain = render_labels(p, cfg, None, None).numpy()
    mirrored = LabelParams(p.size, p.voxel_mm, p.templates, p.foreground, AffineParams(flip=(True, False, True)))
    np.testing.assert_array_equal(render_labels(mirrored, cfg, None, None).numpy() > 0, plain[::-1, :, ::-1] > 0)
    # a scale above one samples beyond the volume: every corner becomes background, the map shrinks
    shrunk = LabelParams(p.size, p.voxel_mm, p.templates, p.foreground, AffineParams(scale=(1.4, 1.4, 1.4)))
    small = render_labels(shrunk, cfg, None, None).numpy()
    assert (small > 0).sum() < 0.6 * (plain > 0).sum()
    assert (small[[0, -1]][:, [0, -1]][:, :, [0, -1]] == 0).all()
