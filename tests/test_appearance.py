"""The appearance model: sampling, replay, and what each step does to a constructed input."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from synthvox.errors import InputError
from synthvox.synth.appearance import (
    AppearanceConfig,
    AppearanceParams,
    add_noise,
    apply_gamma,
    bias_field,
    gaussian_blur,
    gibbs_ringing,
    gmm_intensities,
    kspace_spikes,
    low_resolution,
    normalise,
    perlin_noise,
    render,
    render_batch,
    sample_appearance,
    sharpen,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def blob_map(shape=(32, 36, 28), n_labels=6, seed=0) -> torch.Tensor:
    """Label ids 0..n_labels-1: smooth random regions inside a ball (0 outside)."""
    fields = torch.stack([perlin_noise(shape, (8.0,), seed * 100 + i) for i in range(n_labels - 1)])
    lab = fields.argmax(0) + 1
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) - (n - 1) / 2 for n in shape], indexing="ij")
    r = sum((g / (n / 2)) ** 2 for g, n in zip(grids, shape))
    lab[r > 0.8] = 0
    assert len(torch.unique(lab)) == n_labels
    return lab


def axis_profile(img: torch.Tensor, axis: int) -> torch.Tensor:
    """Power along one axis's frequencies, summed over the other axes (non-negative frequencies)."""
    p = torch.fft.fft(img.double(), dim=axis).abs() ** 2
    dims = [d for d in range(3) if d != axis]
    prof = p.sum(dim=dims)
    return prof[: img.shape[axis] // 2 + 1]


def hf_ratio(out: torch.Tensor, ref: torch.Tensor, axis: int, lo: float) -> float:
    """Power above ``lo`` (fraction of Nyquist) along ``axis`` in ``out`` relative to ``ref``."""
    po, pr = axis_profile(out, axis), axis_profile(ref, axis)
    k0 = int(math.ceil(lo * (len(po) - 1)))
    return float(po[k0:].sum() / pr[k0:].sum())


# --------------------------------------------------------------------------- sampling and replay


def test_same_generator_seed_gives_same_params_and_image():
    lab = blob_map()
    cfg = AppearanceConfig.all_on()
    p1 = sample_appearance(gen(3), 6, cfg)
    p2 = sample_appearance(gen(3), 6, cfg)
    assert p1 == p2
    assert p1 != sample_appearance(gen(4), 6, cfg)
    a, b = render(lab, p1), render(lab, p1)
    assert torch.equal(a, b)
    assert a.shape == (1, *lab.shape) and a.dtype == torch.float32


def test_params_json_round_trip_replays_exactly():
    lab = blob_map()
    for seed, cfg in [(0, AppearanceConfig.all_on(max_components=3)), (1, AppearanceConfig())]:
        p = sample_appearance(gen(seed), 6, cfg)
        text = json.dumps(p.to_dict())
        q = AppearanceParams.from_dict(json.loads(text))
        assert q == p
        assert torch.equal(render(lab, q), render(lab, p))


def test_from_dict_rejects_foreign_keys():
    d = sample_appearance(gen(0), 3).to_dict()
    with pytest.raises(InputError):
        AppearanceParams.from_dict({**d, "colour": 3})
    with pytest.raises(InputError):
        AppearanceParams.from_dict({k: v for k, v in d.items() if k != "means"})


def test_switching_one_step_leaves_the_other_draws_alone():
    a = sample_appearance(gen(7), 5, AppearanceConfig.all_on())
    b = sample_appearance(gen(7), 5, AppearanceConfig.all_on(gibbs_prob=0.0))
    assert b.gibbs is None and a.gibbs is not None
    assert dataclasses.replace(a, gibbs=None) == b


def test_labels_homogeneous_and_views_differ():
    lab = blob_map(n_labels=8)
    cfg = AppearanceConfig.all_off()
    stats = []
    for seed in (0, 1):
        p = sample_appearance(gen(seed), 8, cfg)
        img = render(lab, p)[0]
        means = torch.stack([img[lab == i].mean() for i in range(8)])
        stds = torch.stack([img[lab == i].std() for i in range(8)])
        # intensities follow the drawn means (normalisation is affine, up to clipped tails)
        drawn = torch.tensor([m[0] for m in p.means])
        assert torch.corrcoef(torch.stack([means, drawn]))[0, 1] > 0.99
        assert stds.mean() < 0.3 * means.std()
        stats.append(means)
    assert (stats[0] - stats[1]).abs().max() > 0.2


def test_gaussian_mixture_weights_and_dark_background():
    lab = torch.zeros(40, 40, 40, dtype=torch.long)
    lab[:, 20:] = 1
    img = gmm_intensities(lab, [(0.0,), (50.0, 200.0)], [(0.0,), (0.0, 0.0)], [(1.0,), (0.3, 0.7)], seed=5)
    assert torch.all(img[lab == 0] == 0)
    inside = img[lab == 1]
    assert set(torch.unique(inside).tolist()) == {50.0, 200.0}
    assert abs((inside == 50.0).float().mean().item() - 0.3) < 0.02
    cfg = AppearanceConfig.all_off(background_dark_prob=1.0)
    p = sample_appearance(gen(0), 4, cfg)
    assert p.means[0] == (0.0,) and p.stds[0] == (0.0,)


@pytest.mark.parametrize("cfg", [AppearanceConfig(), AppearanceConfig.all_on(max_components=3)], ids=["default", "all_on"])
def test_any_sampled_params_give_a_finite_unit_range_image(cfg):
    lab = blob_map((24, 24, 24), n_labels=5, seed=2)
    for seed in range(20):
        img = render(lab, sample_appearance(gen(seed), 5, cfg))
        assert torch.isfinite(img).all()
        assert img.min() >= 0.0 and img.max() <= 1.0
        assert img.max() - img.min() > 0.5  # not collapsed


def test_odd_anisotropic_shape_and_batch_matches_single():
    lab = blob_map((37, 64, 50), n_labels=4, seed=3)
    labs = torch.stack([lab, lab.flip(0)])
    ps = [sample_appearance(gen(s), 4, AppearanceConfig.all_on()) for s in (10, 11)]
    out = render_batch(labs, ps)
    assert out.shape == (2, 1, 37, 64, 50)
    for i in range(2):
        assert torch.allclose(out[i], render(labs[i], ps[i]), atol=1e-5)


def test_bad_labels_are_input_errors():
    p = sample_appearance(gen(0), 3)
    with pytest.raises(InputError):
        render(torch.full((8, 8, 8), 3), p)  # id 3 with 3 labels
    with pytest.raises(InputError):
        render(torch.zeros(8, 8, 8), p)  # float
    with pytest.raises(InputError):
        render(torch.zeros(8, 8, dtype=torch.long), p)
    with pytest.raises(InputError):
        AppearanceConfig(gamma_prob=1.5)
    with pytest.raises(InputError):
        AppearanceConfig(blur_sigma=(2.0, 1.0))


# ------------------------------------------------------------------------------------- fields


def test_bias_field_is_smooth_positive_and_low_frequency():
    shape = (40, 36, 44)
    b = bias_field(shape, (4, 5, 3), seed=1, strength=0.3)
    assert b.shape == shape and (b > 0).all()
    log = b.log()
    assert 0.1 < log.std() < 0.6

    def beyond(f: torch.Tensor, cycles: float) -> float:
        """Energy fraction beyond ``cycles`` per field of view (mirror-extended: no wrap-around edge)."""
        for d in range(3):
            f = torch.cat([f, f.flip(d)], d)
        spec = torch.fft.fftn(f.double() - f.double().mean()).abs() ** 2
        k = torch.meshgrid(*[torch.fft.fftfreq(n, d=1 / n) for n in f.shape], indexing="ij")
        return float(spec[torch.sqrt(sum(ki**2 for ki in k)) > 2 * cycles].sum() / spec.sum())

    assert beyond(log, 8) < 1e-4  # no energy beyond 8 cycles per field of view
    assert beyond(blob_map(shape, 4).float(), 8) > 0.01  # unlike a label map's
    assert torch.equal(b, bias_field(shape, (4, 5, 3), seed=1, strength=0.3))
    assert not torch.equal(b, bias_field(shape, (4, 5, 3), seed=2, strength=0.3))


def test_the_renderer_multiplies_by_the_recorded_bias_field():
    """A constant-by-region image rendered with and without a bias: their ratio is the field that the
    parameters record, up to the normalisation's scale (background 0, so the lower percentile is 0).
    Replaced a check of ``(img * b) / img == b``, which no change to the renderer could fail; this
    fails when ``render_batch`` skips the bias or draws it with another seed (each checked by
    compiling that edit of ``render_batch``)."""
    from synthvox.synth.appearance import Bias

    shape = (32, 36, 28)
    lab = blob_map(shape, 6)
    plain = AppearanceParams(means=tuple((float(m),) for m in (0, 40, 80, 120, 160, 200)), stds=((0.0,),) * 6,
                             weights=((1.0,),) * 6, seed=0)
    bias = Bias((4, 5, 3), 0.3, 11)
    biased = dataclasses.replace(plain, bias=bias)
    a, b = render_batch(lab[None], [plain])[0, 0], render_batch(lab[None], [biased])[0, 0]
    inside = (a > 0) & (a < 1) & (b > 0) & (b < 1)
    assert inside.float().mean() > 0.3
    field = bias_field(shape, bias.coarse_shape, bias.seed, bias.strength)
    scale = (b[inside] / a[inside]) / field[inside]
    assert float(scale.std() / scale.mean()) < 1e-4
    assert float(field[inside].log().std()) > 0.05  # a field that the check can see


def test_perlin_octaves_set_the_correlation_length():
    shape = (48, 48, 48)
    fine = perlin_noise(shape, (2.0,), seed=0)
    coarse = perlin_noise(shape, (16.0,), seed=0)

    def corr(f, lag):
        return torch.corrcoef(torch.stack([f[:-lag].flatten(), f[lag:].flatten()]))[0, 1]

    assert corr(coarse, 4) > 0.8 and corr(fine, 4) < 0.2
    two = perlin_noise(shape, (4.0, 16.0), seed=3, stds=(1.0, 2.0))
    assert torch.equal(two, perlin_noise(shape, (4.0, 16.0), seed=3, stds=(1.0, 2.0)))
    assert 0.5 < two.std() / 2.0 < 1.2


# -------------------------------------------------------------------------------------- steps


def test_gamma_is_monotonic_and_keeps_the_range():
    x = torch.linspace(-0.2, 3.0, 32 * 32 * 32).reshape(32, 32, 32)
    for g in (0.5, 1.0, 2.0):
        y = apply_gamma(x, g).flatten()
        assert torch.all(y[1:] >= y[:-1])
        assert y.min() == 0 and abs(y.max().item() - 3.0) < 1e-5
    assert torch.allclose(apply_gamma(x, 1.0), x.clamp_min(0), atol=1e-6)
    assert apply_gamma(x, 2.0)[16, 16, 16] < x[16, 16, 16]  # gamma > 1 darkens mid-tones


def test_blur_removes_high_frequencies_along_chosen_axes_only():
    noise = torch.randn(32, 40, 36, generator=gen(0))
    out = gaussian_blur(noise, (1.5, 0.0, 1.0))
    assert hf_ratio(out, noise, 0, 0.5) < 0.05
    assert hf_ratio(out, noise, 2, 0.5) < 0.1
    # along the untouched axis the profile keeps its shape: high/low ratio unchanged
    po, pr = axis_profile(out, 1), axis_profile(noise, 1)
    assert 0.8 < float((po[15:].sum() / po[1:6].sum()) / (pr[15:].sum() / pr[1:6].sum())) < 1.25
    # per-volume sigmas in a batch equal one-by-one blurs; the mean is kept
    batch = torch.stack([noise, noise.flip(1)])
    both = gaussian_blur(batch, [(1.5, 0.0, 1.0), (0.0, 2.0, 0.0)])
    assert torch.allclose(both[0], out, atol=1e-5)
    assert torch.allclose(both[1], gaussian_blur(noise.flip(1), (0.0, 2.0, 0.0)), atol=1e-5)
    assert abs(out.mean() - noise.mean()) < 1e-2


def test_sharpen_adds_high_frequencies():
    img = gaussian_blur(torch.randn(32, 32, 32, generator=gen(1)), (1.0, 1.0, 1.0))
    out = sharpen(img, 1.0, 1.0)
    for axis in range(3):
        assert hf_ratio(out, img, axis, 0.3) > 1.5


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_low_resolution_removes_high_frequencies_along_its_axis_only(axis):
    noise = torch.randn(36, 40, 44, generator=gen(axis))
    out = low_resolution(noise, axis, 4.0)
    assert out.shape == noise.shape
    assert hf_ratio(out, noise, axis, 0.5) < 0.05
    for other in {0, 1, 2} - {axis}:
        po, pr = axis_profile(out, other), axis_profile(noise, other)
        flat = (po[len(po) // 2 :].sum() / po[1:6].sum()) / (pr[len(pr) // 2 :].sum() / pr[1:6].sum())
        assert 0.8 < float(flat) < 1.25
    # partial volume: a 1-voxel-thin bright sheet perpendicular to the axis is smeared and dimmed
    sheet = torch.zeros(36, 40, 44)
    sheet.select(axis, 17).fill_(1.0)
    smeared = low_resolution(sheet, axis, 5.0)
    line = smeared.movedim(axis, 0)[:, 5, 5]
    assert line.max() < 0.5 and (line > 0.05).sum() >= 5
    assert abs(line.sum() - 1.0) < 0.1  # the sheet's total signal is kept


def test_low_resolution_non_integer_factor_and_odd_size():
    x = torch.randn(2, 37, 23, 50, generator=gen(4))
    out = low_resolution(x, 2, 3.7)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert hf_ratio(out[0], x[0], 2, 0.4) < 0.1


def test_gibbs_rings_near_an_edge_along_its_axis():
    step = torch.zeros(48, 32, 24)
    step[12:36] = 1.0  # two sharp edges along axis 0
    out = gibbs_ringing(step, 0, 0.4)
    line = out[:, 5, 5]
    assert line.max() > 1.05 and line.min() < -0.05  # over- and undershoot
    inside = line[14:34]
    turns = ((inside[1:-1] - inside[:-2]) * (inside[2:] - inside[1:-1]) < 0).sum()
    assert turns >= 4  # oscillates
    assert torch.allclose(out[:, 0, 0], out[:, 20, 10], atol=1e-5)  # nothing along the other axes
    untouched = gibbs_ringing(step, (1, 2), 0.4)  # constant along those axes: nothing to truncate
    assert torch.allclose(untouched, step, atol=1e-5)


@pytest.mark.parametrize("pos", [(3, -5, 4), (2, 6, 0), (-4, 0, -3), (0, 0, 12)])
def test_kspace_spikes_add_energy_at_the_chosen_frequencies(pos):
    img = blob_map((32, 28, 24), 4).float() + 1.0
    out = kspace_spikes(img, [pos], 0.1, phases=[0.7])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    fi, fo = torch.fft.fftn(img.double()), torch.fft.fftn(out.double())
    diff = (fo - fi).abs()
    idx = tuple(p % n for p, n in zip(pos, img.shape))
    mirror = tuple(-p % n for p, n in zip(pos, img.shape))
    expected = 0.1 * img.abs().mean().item() * img.numel()
    self_conj = idx == mirror
    assert abs(diff[idx].item() - expected * (1 if not self_conj else abs(math.cos(0.7)))) < 1e-3 * expected
    diff[idx] = 0
    diff[mirror] = 0
    assert diff.max() < 1e-4 * expected  # nowhere else
    if not self_conj:  # a plane wave of amplitude 2 m mean(|img|)
        assert abs((out - img).abs().max().item() - 2 * 0.1 * img.abs().mean().item()) < 0.02


def test_noise_has_the_requested_std():
    img = torch.full((40, 40, 40), 5.0)
    g = add_noise(img, 0.2, seed=1)
    assert abs((g - img).std().item() - 0.2) < 0.005 and abs((g - img).mean().item()) < 0.005
    r = add_noise(img, 0.2, seed=1, kind="rician")
    assert abs(r.std().item() - 0.2) < 0.01  # high SNR: about Gaussian
    zero = add_noise(torch.zeros(40, 40, 40), 0.2, seed=1, kind="rician")
    assert (zero >= 0).all() and abs(zero.mean().item() - 0.2 * math.sqrt(math.pi / 2)) < 0.005  # Rayleigh
    assert torch.equal(g, add_noise(img, 0.2, seed=1)) and not torch.equal(g, add_noise(img, 0.2, seed=2))


def test_normalise_clips_outliers_per_volume():
    x = torch.rand(2, 30, 30, 30, generator=gen(0))
    x[0, 0, 0, 0] = 1000.0
    x[1] *= 50
    y = normalise(x)
    assert y.min() == 0 and y.max() == 1
    assert abs(y[0].median().item() - 0.5) < 0.02 and abs(y[1].median().item() - 0.5) < 0.02
    assert torch.equal(normalise(torch.ones(8, 8, 8)), torch.zeros(8, 8, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_renders_on_cuda_deterministically():
    lab = blob_map().cuda()
    p = sample_appearance(gen(0), 6, AppearanceConfig.all_on())
    a = render(lab, p)
    assert a.device.type == "cuda" and torch.equal(a, render(lab, p))
    assert torch.isfinite(a).all() and a.min() >= 0 and a.max() <= 1
