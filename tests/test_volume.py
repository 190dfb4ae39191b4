import numpy as np
import pytest
import torch
from conftest import make_affine

from synthvox.errors import InputError
from synthvox.volume import (
    Volume,
    grid_for_spacing,
    resample_like,
    resample_to_grid,
    resample_to_spacing,
    snap_affine,
    to_canonical,
)


def world_of(vol: Volume, idx) -> np.ndarray:
    return vol.affine[:3, :3] @ np.asarray(idx, float) + vol.affine[:3, 3]


def test_canonical_keeps_world_positions(blob_labels):
    aff = make_affine(spacing=(1.0, 1.5, 2.0), angles=(0.1, 0.05, 2.9), flips=(-1, 1, -1))
    vol = Volume(blob_labels, aff)
    can = to_canonical(vol)
    assert sorted(can.shape) == sorted(vol.shape)
    # the columns of the new affine point mostly along +R, +A, +S
    assert all(can.affine[i, i] > 0 for i in range(3))
    # every voxel keeps its world position: compare the centroid of label 42 in world space
    def centroid(v):
        idx = torch.nonzero(v.data[0] == 42).double().mean(0).numpy()
        return world_of(v, idx)
    np.testing.assert_allclose(centroid(can), centroid(vol), atol=1e-6)
    assert torch.equal(torch.bincount(can.data.flatten()), torch.bincount(vol.data.flatten()))


def test_resample_onto_oblique_grid_and_back_keeps_label_volume(blob_labels):
    src_aff = make_affine(spacing=(1.0, 1.0, 1.0), angles=(0, 0, 0), origin=(0, 0, 0))
    vol = Volume(blob_labels, src_aff)
    dst_aff = make_affine(spacing=(0.7, 0.9, 1.1), angles=(0.35, -0.25, 0.6), origin=(0.0, 0.0, 0.0))
    # choose a destination grid that covers the source: centre it on the source's centre
    shape = (34, 34, 34)
    centre = src_aff[:3, :3] @ (np.array(vol.shape) - 1) / 2
    dst_aff[:3, 3] = centre - dst_aff[:3, :3] @ (np.array(shape) - 1) / 2
    there = resample_to_grid(vol, shape, dst_aff, mode="nearest")
    back = resample_like(there, vol, mode="nearest")
    for lab in (7, 42, 3):
        v_src = (vol.data == lab).sum().item() * 1.0
        v_there = (there.data == lab).sum().item() * np.prod(there.spacing)
        v_back = (back.data == lab).sum().item() * 1.0
        # "within a voxel's worth" per boundary layer: relative tolerance from the surface-to-volume ratio
        surface = float(((vol.data == lab).float().sum()) ** (2 / 3)) * 6
        assert abs(v_there - v_src) < 0.5 * surface, (lab, v_src, v_there)
        assert abs(v_back - v_src) < 0.5 * surface, (lab, v_src, v_back)
    assert set(torch.unique(back.data).tolist()) <= {0, 3, 7, 42}


def test_linear_resampling_matches_world_function():
    # an image that is a linear function of world coordinates is reproduced exactly by linear resampling
    src_aff = make_affine(spacing=(1.0, 1.2, 2.0), angles=(0.2, 0.1, -0.3), origin=(-5, -6, -12))
    shape = (20, 18, 14)
    ii = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    world = ii @ src_aff[:3, :3].T + src_aff[:3, 3]
    f = lambda w: 0.3 * w[..., 0] - 0.2 * w[..., 1] + 0.1 * w[..., 2]  # noqa: E731
    vol = Volume(torch.from_numpy(f(world)).float()[None], src_aff)
    dst_aff = make_affine(spacing=(1.5, 1.5, 1.5), angles=(-0.1, 0.3, 0.2), origin=(-2, -1, -4))
    out = resample_to_grid(vol, (6, 6, 5), dst_aff, mode="linear")
    jj = np.stack(np.meshgrid(*[np.arange(s) for s in (6, 6, 5)], indexing="ij"), -1)
    w2 = jj @ dst_aff[:3, :3].T + dst_aff[:3, 3]
    vox = (w2 - src_aff[:3, 3]) @ np.linalg.inv(src_aff[:3, :3]).T
    inside = np.all((vox >= 0) & (vox <= np.array(shape) - 1), axis=-1)
    assert inside.sum() > 50
    np.testing.assert_allclose(out.data[0].numpy()[inside], f(w2)[inside], atol=1e-3)


def test_resample_to_spacing_keeps_field_of_view(smooth_image):
    aff = make_affine(spacing=(1.0, 1.2, 2.0))
    vol = Volume(smooth_image, aff)
    out = resample_to_spacing(vol, 2.0)
    np.testing.assert_allclose(out.spacing, [2.0, 2.0, 2.0], atol=1e-6)
    assert out.shape == (8, 12, 24)
    c_old = world_of(vol, (np.array(vol.shape) - 1) / 2)
    c_new = world_of(out, (np.array(out.shape) - 1) / 2)
    np.testing.assert_allclose(c_old, c_new, atol=1e-6)
    shape, a = grid_for_spacing(vol.shape, aff, (0.5, 0.6, 1.0))
    assert shape == (32, 40, 48)


@pytest.mark.parametrize("base", [0, 2**24 + 1, 3_000_000_000, 2**53 + 1, 2**62 + 7])
def test_nearest_resampling_keeps_every_label_id_exactly(base):
    """Moved labels (register, apply --labels, segment's training labels) go through this path."""
    gen = torch.Generator().manual_seed(0)
    small = torch.randint(0, 50, (1, 7, 8, 9), generator=gen)
    lab = torch.where(small > 0, small + base, torch.zeros_like(small))
    aff = make_affine()
    m = make_affine(spacing=(0.9, 1.1, 1.7), angles=(0.2, 0.1, -0.3), origin=(-9.0, 21.0, 4.0))
    out = resample_to_grid(Volume(lab, aff), (6, 9, 8), m, mode="nearest").data
    ref = resample_to_grid(Volume(small, aff), (6, 9, 8), m, mode="nearest").data
    assert out.dtype == torch.int64
    assert torch.equal(out, torch.where(ref > 0, ref + base, torch.zeros_like(ref)))


def test_nearest_integer_sampling_matches_grid_sample():
    import torch.nn.functional as F

    from synthvox.volume import normalise_coords, sample_at

    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, 30, (2, 5, 6, 7), generator=gen)
    vox = torch.rand(4, 5, 6, 3, generator=gen) * 9 - 2
    grid = normalise_coords(vox, (5, 6, 7))[None]
    for padding in ("zeros", "border"):
        ref = F.grid_sample(data.float()[None], grid, mode="nearest", padding_mode=padding, align_corners=True)[0]
        assert torch.equal(sample_at(data, vox, mode="nearest", padding=padding), ref.round().long())


@pytest.mark.parametrize("spacing", [float("nan"), float("inf"), 0.0, -1.0, (1.0, float("nan"), 1.0)])
def test_grid_for_spacing_refuses_non_finite_or_non_positive(spacing):
    with pytest.raises(InputError, match="positive, finite"):
        grid_for_spacing((8, 8, 8), np.eye(4), spacing)


@pytest.mark.parametrize("shape,minimum,ok", [((24, 24, 2), 4, False), ((4, 4, 4), 4, True), ((8, 8, 3), (2, 2, 4), False),
                                              ((8, 8, 4), (2, 2, 4), True)])
def test_check_min_size_names_input_stage_and_need(shape, minimum, ok):
    from synthvox.volume import check_min_size

    if ok:
        check_min_size(shape, minimum, "moving image", "the affine stage")
        return
    with pytest.raises(InputError, match=r"moving image is too small for the affine stage: .* needs at least"):
        check_min_size(shape, minimum, "moving image", "the affine stage")


@pytest.mark.parametrize("voxel", [1.0, 0.01, 4.0])
def test_snap_affine_takes_float32_header_copies_to_one_matrix(voxel):
    """Oblique affines and their copies as float32 headers store them (rounded to float32, or moved by up
    to 2e-7 relative, as MGH's products of float32 fields are) snap to the very same matrix but for the
    rare entry that lies within that noise of a midpoint of the grid (at most 1% of the copies, each
    then one grid step apart in one entry); the snap is a fixed point and places the corners of a 256³
    grid within 0.06 of a voxel of the original, for 10 micrometre and 4 mm voxels too (the grid follows
    the voxel size's power of two). Fails with a fixed 1e-4 mm grid (0.01 mm voxels end up 4 voxels
    off) and with float32 rounding instead of the snap (half the copies differ)."""
    rng = np.random.default_rng(3)
    corners = np.array([[i, j, k, 1.0] for i in (0, 255) for j in (0, 255) for k in (0, 255)]).T
    copies = differ = 0
    for _ in range(200):
        a = make_affine(spacing=rng.uniform(0.7, 1.4, 3) * voxel, angles=rng.uniform(-0.6, 0.6, 3),
                        origin=rng.uniform(-150, 150, 3) * voxel)
        snapped = snap_affine(a)
        assert np.array_equal(snap_affine(snapped), snapped)
        assert np.abs((snapped - a) @ corners).max() < 0.06 * float(np.linalg.norm(a[:3, :3], axis=0).mean())
        for copy in (a.astype(np.float32).astype(np.float64), a * (1 + rng.uniform(-2e-7, 2e-7, (4, 4)))):
            copy[3] = (0, 0, 0, 1)
            off = np.flatnonzero(snap_affine(copy) != snapped)
            copies, differ = copies + 1, differ + bool(off.size)
            assert off.size <= 1, (snap_affine(copy) - snapped)
    assert differ <= 0.01 * copies, (differ, copies)
