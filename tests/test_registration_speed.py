"""The faster registration kernels (issue 11 item 2) compute what the plain versions compute, and the
early stop and the data-term region do what they say."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synthvox.registration import affine, fov, grids, mind, sampling
from synthvox.registration.convex import box3, cost_volume, coupled_convex, displacement_offsets
from synthvox.registration.instance import instance_optimise
from synthvox.registration.warp import invert_field
from synthvox.volume import sample_at, voxel_grid


def _avg_box3(x: torch.Tensor, passes: int) -> torch.Tensor:
    y = x[None]
    for _ in range(passes):
        y = F.avg_pool3d(F.pad(y, (1,) * 6, mode="replicate"), 3, stride=1)
    return y[0]


def test_box3_matches_avg_pool_and_its_gradient_is_exact():
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 7, 8, 9), (12, 5, 2, 6), (80, 4, 5, 6)]:
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        assert torch.allclose(box3(x, 3), _avg_box3(x, 3), atol=1e-12)
    x = torch.randn(3, 6, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: box3(t, 3), (x,))
    y = torch.randn(3, 6, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    (box3(y, 2) * x.detach()).sum().backward()
    ref = torch.autograd.grad((_avg_box3(y, 2) * x.detach()).sum(), y)[0]
    assert torch.allclose(y.grad, ref, atol=1e-12)


def _mind_by_convolution(x: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """The reference's formulation: one-hot kernels of a dilated convolution."""
    first, second = mind._pair_offsets()
    k1, k2 = torch.zeros(12, 27), torch.zeros(12, 27)
    rows = torch.arange(12)
    k1[rows, first[:, 0] * 9 + first[:, 1] * 3 + first[:, 2]] = 1
    k2[rows, second[:, 0] * 9 + second[:, 1] * 3 + second[:, 2]] = 1
    padded = F.pad(x[None], (dilation,) * 6, mode="replicate")
    diff = F.conv3d(padded, k1.view(12, 1, 3, 3, 3), dilation=dilation) - F.conv3d(padded, k2.view(12, 1, 3, 3, 3), dilation=dilation)
    ssd = F.avg_pool3d(F.pad(diff**2, (radius,) * 6, mode="replicate"), 2 * radius + 1, stride=1)
    m = ssd - ssd.min(dim=1, keepdim=True).values
    var = m.mean(dim=1, keepdim=True)
    mv = var.mean()
    var = torch.maximum(torch.minimum(var, mv * 1e3), torch.clamp(mv * 1e-3, min=torch.finfo(x.dtype).tiny))
    return torch.exp(-m / var)[:, list(mind._ORDER)][0]


def test_mind_by_slices_equals_the_convolution():
    x = torch.rand(1, 20, 17, 23, generator=torch.Generator().manual_seed(1))
    for radius, dilation in ((1, 2), (2, 1)):
        assert torch.allclose(mind.mind_ssc(x, radius, dilation), _mind_by_convolution(x, radius, dilation), atol=1e-5)


def test_mind_by_slabs_equals_the_whole_volume(monkeypatch):
    """Slabs of one, two and five slices (a last slab shorter than the others) give the whole-volume
    values, borders included; the batched input still takes the whole-volume path."""
    g = torch.Generator().manual_seed(6)
    x = torch.rand(1, 11, 9, 13, generator=g, dtype=torch.float64)
    ref = mind.mind_ssc(x[None])[0]  # batched: the whole-volume formulation
    assert torch.allclose(_mind_by_convolution(x.float()), ref.float(), atol=1e-5)
    for per_slab in (9 * 13, 2 * 9 * 13, 5 * 9 * 13):
        monkeypatch.setattr(mind, "SLAB_VOXELS", per_slab)
        out = mind.mind_ssc(x)
        assert out.shape == (12, 11, 9, 13) and out.dtype == torch.float64
        assert torch.allclose(out, ref, atol=1e-12)
    assert torch.equal(mind.mind_ssc(torch.ones(1, 6, 5, 4)), torch.ones(12, 6, 5, 4))


def test_fft_correlation_equals_conv3d():
    g = torch.Generator().manual_seed(2)
    inp, ker = torch.randn(5, 21, 19, 17, generator=g), torch.randn(5, 9, 8, 7, generator=g)
    ref = F.conv3d(inp[None], ker[None])[0, 0]
    out = affine._correlate(inp, ker)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-3)


def test_separable_interior_equals_the_3d_erosion():
    m = torch.rand(20, 24, 18, generator=torch.Generator().manual_seed(3)) > 0.2
    for margin in (2, [3, 1, 2]):
        ms = [margin] * 3 if isinstance(margin, int) else margin
        pad = (ms[2], ms[2], ms[1], ms[1], ms[0], ms[0])
        outside = 1.0 - F.pad(m.float()[None, None], pad, value=0.0)
        ref = torch.minimum(m.float(), 1.0 - F.max_pool3d(outside, tuple(2 * v + 1 for v in ms), stride=1)[0, 0])
        assert torch.equal(fov.interior(m, margin), ref)


def test_fov_weight_from_positions_equals_resampling_ones():
    """The eroded cover computed from the sample positions is the erosion of an all-ones MOVING sampled
    with zero padding, for oblique transforms that cut MOVING's field of view on every side."""
    from synthvox.volume import Volume

    rng = np.random.default_rng(7)
    a = np.diag([1.3, 0.9, 2.0, 1.0])
    a[:3, 3] = [3.0, -5.0, 7.0]
    moving = Volume(torch.rand(1, 40, 50, 30), a)
    grid = np.diag([2.0, 2.0, 2.0, 1.0])
    grid[:3, 3] = [-20.0, -10.0, -5.0]
    for trial in range(3):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        q[:, 0] *= np.sign(np.linalg.det(q))
        world = np.eye(4)
        world[:3, :3] = q if trial else np.eye(3)
        centre = a[:3, :3] @ np.array([20.0, 25.0, 15.0]) + a[:3, 3]  # rotations about MOVING's centre
        world[:3, 3] = centre - world[:3, :3] @ centre + rng.normal(size=3) * 5
        ones = Volume(torch.ones((1, *moving.shape)), moving.affine)
        cover = grids.resample_through(ones, world, (45, 50, 40), grid).data[0]
        for margin in (2, [3, 1, 2]):
            expected = fov.interior((cover > 0.999).float(), margin)
            got = fov.fov_weight(moving, world, (45, 50, 40), grid, margin)
            assert 0 < float(expected.sum()) < expected.numel() and torch.equal(got, expected)


def test_inner_box_is_the_interior_of_an_all_ones_grid():
    for shape, margin in (((20, 24, 18), 2), ((20, 24, 18), [3, 1, 2]), ((5, 6, 30), [3, 3, 3])):
        assert torch.equal(fov.inner_box(shape, margin), fov.interior(torch.ones(shape), margin))


def test_channels_last_cost_volume_and_convex_match_the_direct_formula():
    g = torch.Generator().manual_seed(4)
    ff = box3(torch.rand(6, 12, 11, 10, generator=g), 2)
    fm = torch.roll(ff, 1, 1)
    wf = (torch.rand(12, 11, 10, generator=g) > 0.3).float()
    wm = torch.rand(12, 11, 10, generator=g)
    r = 2
    cost = cost_volume(ff, fm, r, wf, wm, smooth=0)
    off = displacement_offsets(r).long()
    mp = F.pad(fm[None], (r,) * 6, mode="replicate")[0]
    wp = F.pad(wm[None, None], (r,) * 6, mode="replicate")[0, 0]
    sl = [tuple(slice(int(v) + r, int(v) + r + n) for v, n in zip(o, (12, 11, 10))) for o in off.T]
    raw = torch.stack([(ff - mp[(slice(None), *q)]).pow(2).sum(0) for q in sl])
    wts = torch.stack([wf * wp[q] for q in sl])
    ref = wts * raw + (1 - wts) * raw.mean()
    assert torch.allclose(cost, ref, atol=1e-5)
    # the shift by one voxel along x is found everywhere inside
    field = coupled_convex(cost_volume(ff, fm, r), r)
    assert float((field[0, 3:-3, 3:-3, 3:-3] - 1.0).abs().max()) < 0.35


def test_invert_field_inverts_a_smooth_field():
    shape = (24, 20, 18)
    x = voxel_grid(shape)
    u = torch.stack([1.5 * torch.sin(x[..., 1] / 5.0), 1.0 * torch.cos(x[..., 2] / 6.0), 0.8 * torch.sin(x[..., 0] / 7.0)])
    w = invert_field(u, tol=1e-4)
    inner = (slice(4, -4),) * 3
    # z + w(z) + u(z + w(z)) = z
    back = w + sample_at(u, x + w.permute(1, 2, 3, 0), padding="border")
    assert float(back[(slice(None), *inner)].abs().max()) < 1e-3


def _pair(seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ff = box3(torch.rand(4, 32, 32, 32, generator=g), 3) * 10
    shift = torch.zeros(3, 32, 32, 32)
    shift[0] = 1.5
    fm = sample_at(ff, voxel_grid((32, 32, 32)) - shift.permute(1, 2, 3, 0), padding="border")
    return ff, fm


def test_early_stop_takes_fewer_steps_and_ends_near_the_full_run():
    ff, fm = _pair()
    full, early = {}, {}
    a = instance_optimise(ff, fm, stride=2, iters=150, stats=full)
    b = instance_optimise(ff, fm, stride=2, iters=150, tol=0.01, patience=10, stats=early)
    assert full["steps"] == 150 and 20 <= early["steps"] < 150
    inner = (slice(None), *(slice(8, -8),) * 3)
    assert float((a[inner] - b[inner]).abs().mean()) < 0.25
    # both recover the shift inside
    assert abs(float(b[inner][0].mean()) - 1.5) < 0.3


def test_data_term_on_alternating_halves_ends_near_the_whole_one():
    """``subsample=2``: each step sees every second point, the next step the others; the field ends
    close to the one fitted on all points every step, and recovers the shift."""
    ff, fm = _pair()
    a = instance_optimise(ff, fm, stride=2, iters=60)
    b = instance_optimise(ff, fm, stride=2, iters=60, subsample=2)
    assert not torch.equal(a, b)  # the halves were used
    inner = (slice(None), *(slice(8, -8),) * 3)
    assert float((a[inner] - b[inner]).abs().mean()) < 0.25
    assert abs(float(b[inner][0].mean()) - 1.5) < 0.3


def test_region_of_the_data_term():
    ff, fm = _pair()
    every = torch.ones(32, 32, 32, dtype=torch.bool)
    a = instance_optimise(ff, fm, stride=2, iters=30)
    b = instance_optimise(ff, fm, stride=2, iters=30, region=every)
    assert torch.allclose(a, b, atol=1e-5)  # the whole grid: the same as no region
    inner = torch.zeros(32, 32, 32, dtype=torch.bool)
    inner[6:-6, 6:-6, 6:-6] = True
    c = instance_optimise(ff, fm, stride=2, iters=30, region=inner)
    sl = (slice(None), *(slice(10, -10),) * 3)
    assert abs(float(c[sl][0].mean()) - float(a[sl][0].mean())) < 0.2
    assert np.isfinite(c.numpy()).all()


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_points_sampled_by_threads_equal_grid_sample_values_and_gradients(padding):
    """The points split over threads are sampled exactly as by one ``grid_sample``, forward and
    backward, whatever the number of workers (also when the chunks are uneven)."""
    g = torch.Generator().manual_seed(0)
    vol = torch.randn(5, 17, 13, 11, generator=g)
    pos0 = torch.rand(3 * sampling.MIN_CHUNK + 7, 3, generator=g) * 2.4 - 1.2  # some outside the grid
    weights = torch.randn(5, pos0.shape[0], generator=g)
    ref_pos = pos0.clone().requires_grad_()
    ref = F.grid_sample(vol[None], ref_pos.view(1, -1, 1, 1, 3), mode="bilinear", padding_mode=padding,
                        align_corners=True)[0, :, :, 0, 0]
    (ref * weights).sum().backward()
    for workers in (1, 2, 3):
        pos = pos0.clone().requires_grad_()
        out = sampling.sample_points(vol, pos, padding, workers)
        (out * weights).sum().backward()
        assert torch.equal(out, ref)
        assert torch.equal(pos.grad, ref_pos.grad)


def test_register_gives_the_same_result_on_one_or_two_threads_and_restores_them(monkeypatch):
    """Independent tasks side by side on one intra-op thread each, and the sampled points of the fits
    split between the threads: the result does not depend on the number of threads, and torch's
    setting is what it was afterwards."""
    from test_registration import CFG, phantom, warped_pair

    monkeypatch.setattr(sampling, "MIN_CHUNK", 64)  # a 32^3 phantom has too few points to split otherwise

    from synthvox.registration import register
    from synthvox.volume import Volume

    img = phantom(32)
    moving, _ = warped_pair(img, amp=1.5)
    aff4 = np.diag([1.0, 1.0, 1.0, 1.0])
    before = torch.get_num_threads()
    try:
        out = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            res = register(Volume(img, aff4), Volume(moving, aff4), features="mind", config=CFG)
            assert torch.get_num_threads() == n
            out[n] = res
        assert torch.equal(out[1].warp.data, out[2].warp.data)
        assert torch.equal(out[1].inverse_warp.data, out[2].inverse_warp.data)
        assert out[1].report["initial_choice"] == out[2].report["initial_choice"]
    finally:
        torch.set_num_threads(before)
