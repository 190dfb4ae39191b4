"""Spatial transforms: affine sampling, elastic fields, and identical warping of images and labels."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from synthvox.synth.spatial import (
    AffineParams,
    AffineRange,
    ElasticParams,
    ElasticRange,
    apply_spatial,
    elastic_displacement,
    sample_affine,
    sample_elastic,
    sampling_grid,
    warp_image,
    warp_labels,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_sample_affine_ranges_and_determinant():
    g = _gen(1)
    rng = AffineRange()
    for _ in range(200):
        a = sample_affine(g, rng)
        assert all(0.5 <= s <= 1.5 for s in a.scale)
        assert all(abs(h) <= 0.5 for h in a.shear)
        r = a.rotation_matrix()
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-9)
        assert np.linalg.det(r) == pytest.approx(1.0, abs=1e-9)
        m = a.matrix()
        # Volume ratio is the product of scales; flips only change the sign.
        assert abs(np.linalg.det(m)) == pytest.approx(float(np.prod(a.scale)), rel=1e-9)
        assert np.sign(np.linalg.det(m)) == (-1) ** sum(a.flip)


def test_sample_affine_is_deterministic_and_json_round_trips():
    a = sample_affine(_gen(7))
    b = sample_affine(_gen(7))
    assert a == b
    assert sample_affine(_gen(8)) != a
    back = AffineParams.from_dict(json.loads(json.dumps(a.to_dict())))
    np.testing.assert_allclose(back.matrix(), a.matrix())
    assert back.flip == a.flip


def test_rotations_are_uniform_over_so3():
    g = _gen(3)
    rng = AffineRange(scale=(1, 1), shear=0.0, flip_prob=0.0)
    rots = np.stack([sample_affine(g, rng).rotation_matrix() for _ in range(3000)])
    # Uniform on SO(3): every entry has mean 0 and variance 1/3; the image of an axis is uniform on
    # the sphere (its z component uniform in [-1, 1]).
    assert np.abs(rots.mean(axis=0)).max() < 0.05
    np.testing.assert_allclose((rots**2).mean(axis=0), 1 / 3, atol=0.04)
    z = rots[:, 2, 2]
    hist, _ = np.histogram(z, bins=5, range=(-1, 1))
    assert hist.min() > 0.8 * len(z) / 5


def test_limited_rotation_angle():
    g = _gen(4)
    rng = AffineRange(scale=(1, 1), shear=0.0, flip_prob=0.0, max_rotation_deg=15.0)
    angles = []
    for _ in range(300):
        r = sample_affine(g, rng).rotation_matrix()
        angles.append(math.degrees(math.acos(np.clip((np.trace(r) - 1) / 2, -1, 1))))
    assert max(angles) <= 15.0 + 1e-6
    assert max(angles) > 10.0


def test_identity_grid_leaves_image_unchanged(smooth_image):
    img = smooth_image[None]
    grid = sampling_grid(img.shape[2:])
    torch.testing.assert_close(warp_image(img, grid), img, atol=1e-5, rtol=0)


def test_quarter_turn_matches_rot90_for_image_and_labels(smooth_image, blob_labels):
    # A 90 degree rotation about z on a square x-y grid lands on grid points: it must equal rot90,
    # which checks the axis conventions of the grid.
    img = smooth_image[:, :16, :16, :][None]
    lab = blob_labels[:, :16, :16, :][None]
    half = math.sqrt(0.5)
    rot = AffineParams(rotation=(half, 0.0, 0.0, half))  # +90 degrees about z
    out_img, out_lab = apply_spatial(img, lab, rot)
    # output(p) = input(R (p - c) + c): R maps x to y, so output[x, y] = input[c - (y - c), x]
    expected_img = torch.rot90(img, k=-1, dims=(2, 3))
    expected_lab = torch.rot90(lab, k=-1, dims=(2, 3))
    torch.testing.assert_close(out_img, expected_img, atol=1e-4, rtol=0)
    assert torch.equal(out_lab, expected_lab)


def test_translation_shifts_by_whole_voxels(blob_labels):
    lab = blob_labels[None]
    t = AffineParams(translation=(2.0, 0.0, -3.0))
    _, out = apply_spatial(None, lab, t)
    # output(p) = input(p + t)
    assert torch.equal(out[0, 0, :-2, :, 3:], lab[0, 0, 2:, :, :-3])
    assert out.dtype == lab.dtype


def test_flip_mirrors_about_the_centre(blob_labels):
    lab = blob_labels[None]
    _, out = apply_spatial(None, lab, AffineParams(flip=(False, True, False)))
    assert torch.equal(out, lab.flip(3))


def test_elastic_field_smooth_deterministic_and_scaled():
    p = ElasticParams(seed=5, control_points=(4, 4, 4), std=2.0)
    d1 = elastic_displacement(p, (24, 28, 20))
    d2 = elastic_displacement(p, (24, 28, 20))
    assert d1.shape == (3, 24, 28, 20)
    assert torch.equal(d1, d2)
    assert 0.5 < float(d1.std()) < 4.0
    # Smooth: neighbouring voxels differ by far less than the displacement itself.
    assert float(d1.diff(dim=1).abs().max()) < 0.25 * float(d1.abs().max())
    assert not torch.equal(d1, elastic_displacement(ElasticParams(6, (4, 4, 4), 2.0), (24, 28, 20)))
    assert float(elastic_displacement(ElasticParams(5, (4, 4, 4), 0.0), (8, 8, 8)).abs().max()) == 0.0


def test_image_and_labels_move_together(blob_labels):
    lab = blob_labels[None]
    g = _gen(11)
    aff = sample_affine(g, AffineRange(scale=(0.9, 1.1), shear=0.1, max_rotation_deg=20.0))
    ela = sample_elastic(g, ElasticRange(max_std=1.5))
    onehot = (lab == 7).float()
    out_img, out_lab = apply_spatial(onehot, lab, aff, ela)
    assert set(out_lab.unique().tolist()) <= set(lab.unique().tolist())
    # The linearly warped mask of label 7, thresholded, matches the nearest-warped labels.
    agree = ((out_img > 0.5) == (out_lab == 7)).float().mean()
    assert float(agree) > 0.97
    # Its volume changes by about 1 / det (output p samples the input at M p).
    ratio = int((out_lab == 7).sum()) / int((lab == 7).sum())
    assert ratio == pytest.approx(1 / abs(np.linalg.det(aff.matrix())), rel=0.2)


def test_batched_transforms_match_one_by_one(smooth_image):
    img = smooth_image[None].repeat(3, 1, 1, 1, 1)
    g = _gen(2)
    affs = [sample_affine(g, AffineRange(max_rotation_deg=30.0, scale=(0.8, 1.2))) for _ in range(3)]
    elas = [sample_elastic(g), None, sample_elastic(g)]
    out, _ = apply_spatial(img, None, affs, elas)
    for i in range(3):
        single, _ = apply_spatial(img[i : i + 1], None, affs[i], elas[i])
        torch.testing.assert_close(out[i : i + 1], single, atol=1e-5, rtol=0)
    assert not torch.allclose(out[0], out[1])


def test_warp_labels_keeps_large_ids():
    lab = torch.full((1, 1, 6, 6, 6), 70000, dtype=torch.int64)
    grid = sampling_grid((6, 6, 6))
    assert torch.equal(warp_labels(lab, grid), lab)
