"""Registration: known synthetic warps are recovered; geometry across grids; bad input."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from synthvox.errors import InputError
from synthvox.metrics import folding_percent
from synthvox.registration import RegistrationConfig, register
from synthvox.volume import Volume, resample_to_grid, voxel_grid

N = 40
CFG = RegistrationConfig(spacing=1.0, adam_grid_mm=2.0)


def phantom(n: int = N, seed: int = 0) -> torch.Tensor:
    """A (1, n, n, n) head-like scene: nested ellipsoids, blobs of different intensities, smooth texture."""
    g = torch.Generator().manual_seed(seed)
    x, y, z = torch.meshgrid(*(torch.arange(float(n)),) * 3, indexing="ij")
    c = (n - 1) / 2
    img = torch.zeros(n, n, n)
    img[((x - c) / (0.42 * n)) ** 2 + ((y - c) / (0.38 * n)) ** 2 + ((z - c) / (0.40 * n)) ** 2 < 1] = 0.4
    img[((x - c) / (0.34 * n)) ** 2 + ((y - c) / (0.30 * n)) ** 2 + ((z - c) / (0.32 * n)) ** 2 < 1] = 0.7
    for _ in range(14):
        p = c + (torch.rand(3, generator=g) - 0.5) * 0.45 * n
        r = 1.5 + torch.rand(3, generator=g) * 0.07 * n
        val = float(torch.rand(1, generator=g)) * 0.8 + 0.1
        img[((x - p[0]) / r[0]) ** 2 + ((y - p[1]) / r[1]) ** 2 + ((z - p[2]) / r[2]) ** 2 < 1] = val
    # smooth random texture, as tissue has: makes the displacement observable inside flat regions too
    noise = torch.rand(1, 1, n, n, n, generator=g)
    for _ in range(3):
        noise = torch.nn.functional.avg_pool3d(noise, 5, stride=1, padding=2, count_include_pad=False)
    noise = (noise - noise.mean()) / noise.std()
    img = img + 0.08 * noise[0, 0] * (img > 0)
    return img[None]


def smooth_field(shape: tuple[int, int, int], amp: float = 2.0) -> torch.Tensor:
    """A smooth displacement field (3, X, Y, Z) in voxels, max about ``amp``."""
    v = voxel_grid(shape)
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    n = float(max(shape))
    return amp * torch.stack([
        torch.sin(2 * np.pi * y / n) * torch.cos(2 * np.pi * z / n),
        torch.sin(2 * np.pi * z / n + 0.5) * torch.cos(np.pi * x / n),
        torch.cos(2 * np.pi * x / n) * torch.sin(np.pi * y / n + 0.3),
    ])


def warped_pair(image: torch.Tensor, amp: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``moving(y) = image(y + g(y))`` and the displacement ``u`` with ``image(x) = moving(x + u(x))``."""
    from synthvox.volume import sample_at

    shape = tuple(image.shape[1:])
    grid = voxel_grid(shape)  # type: ignore[arg-type]
    g = smooth_field(shape, amp)  # type: ignore[arg-type]
    moving = sample_at(image, grid + g.permute(1, 2, 3, 0), padding="border")
    u = -g.clone()
    for _ in range(30):  # u(x) = -g(x + u(x))
        u = -sample_at(g, grid + u.permute(1, 2, 3, 0), padding="border")
    return moving, u


def endpoint_error(disp_mm: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> float:
    return float((disp_mm - truth).norm(dim=0)[mask].mean())


def test_mind_recovers_known_warp():
    img = phantom()
    moving, u = warped_pair(img)
    aff = np.eye(4)
    fg = img[0] > 0.05
    before = endpoint_error(torch.zeros_like(u), u, fg)
    res = register(Volume(img, aff), Volume(moving, aff), features="mind", config=CFG, init="none")
    epe = endpoint_error(res.displacement, u, fg)
    assert before > 1.5
    assert epe < 1.0, f"mean endpoint error {epe:.2f} voxels (before {before:.2f})"
    assert res.report["folding_percent"] < 1.0
    assert folding_percent(res.displacement, affine=aff) == res.report["folding_percent"]
    # the moved image matches fixed better than the unregistered moving
    err_before = float((moving - img).abs()[0][fg].mean())
    err_after = float((res.moved.data - img).abs()[0][fg].mean())
    assert err_after < 0.7 * err_before


def test_net_features_pipeline_with_random_tiny_network():
    """Plumbing of --features net/both with an untrained network (random features cannot register)."""
    from synthvox import models
    img = phantom(32)
    moving, _ = warped_pair(img)
    aff = np.eye(4)
    net = models.build_model("tiny", seed=0)
    for kind in ("net", "both"):
        res = register(Volume(img, aff), Volume(1.0 - moving, aff), features=kind, weights=net, config=CFG,
                       init="none", affine=False)
        assert torch.isfinite(res.displacement).all()
        assert res.moved.shape == (32, 32, 32)
        assert res.report["features"] == kind


def _trained_weights() -> str | None:
    import os

    path = os.environ.get("SYNTHVOX_TEST_WEIGHTS")
    if path:
        return path
    from synthvox.models import default_weights_path

    p = default_weights_path()
    return str(p) if p is not None else None


def test_shipped_network_beside_mind_on_a_contrast_inverted_copy():
    """With the shipped weights (or SYNTHVOX_TEST_WEIGHTS), ``both`` at the card's share registers a
    contrast-inverted copy of the phantom to a mean endpoint error below 1 voxel; doing nothing leaves
    1.64 (asserted below). Measured 2026-12-08 on the shipped weights: both 0.77, mind alone 0.69.

    ``net`` alone is not asked for: on this 40 mm phantom the shipped network alone ends at 3.29 voxels
    (2.52 with the phantom scaled to the network's 2.25 mm), worse than doing nothing, so no bound both
    meets and nothing misses exists for it (this test, run with ``features="net"``, fails). The shipped
    weights' own quality is checked on real data by test_shipped_weights.py. A random network of the
    same architecture also passes here (both 0.73: MIND-SSC carries a synthetic phantom), so what this
    guards is the network's share in ``both``: the network at full weight fails it."""
    weights = _trained_weights()
    if weights is None:
        pytest.fail("no shipped weights and no SYNTHVOX_TEST_WEIGHTS: the package's default registration features need them")
    img = phantom()
    moving, u = warped_pair(img)
    inverted = 1.0 - moving  # another "modality": dark where bright
    aff = np.eye(4)
    fg = img[0] > 0.05
    assert endpoint_error(torch.zeros_like(u), u, fg) > 1.5  # doing nothing does not meet the bound
    res = register(Volume(img, aff), Volume(inverted, aff), features="both", weights=weights, config=CFG, init="none")
    epe = endpoint_error(res.displacement, u, fg)
    assert epe < 1.0, f"mean endpoint error {epe:.2f} voxels with both features"
    assert res.report["folding_percent"] < 1.0


def test_both_gives_the_network_the_share_its_card_or_the_config_says():
    """--features both: the network's share of the feature variance comes from net_share, else the
    weights' card, else one half; it changes the registration, and a share outside (0, 1) is refused."""
    from synthvox.registration.descriptors import combine

    img = phantom(32)
    moving, _ = warped_pair(img)
    aff = np.eye(4)
    fixed, mov = Volume(img, aff), Volume(moving, aff)
    shares = {}
    for name, weights, cfg in (("card", _Recorder({"registration": {"net_share": 0.2}}), CFG),
                               ("config", _Recorder({"registration": {"net_share": 0.2}}), replace(CFG, net_share=0.9)),
                               ("none", _Recorder(), CFG)):
        res = register(fixed, mov, features="both", weights=weights, config=cfg, init="none", affine=False)
        shares[name] = (res.report["network_share"], res.displacement)
    assert [shares[k][0] for k in ("card", "config", "none")] == [0.2, 0.9, 0.5]
    assert not torch.allclose(shares["card"][1], shares["config"][1])
    res = register(fixed, mov, features="net", weights=_Recorder(), config=CFG, init="none", affine=False)
    assert res.report["network_share"] is None
    for bad in (0.0, 1.0, -0.5, 2.0, float("nan")):
        with pytest.raises(InputError, match="net_share"):
            RegistrationConfig(net_share=bad)
    # the shares split the unit variance of the combined features
    g = torch.Generator().manual_seed(0)
    sets = {"mind": 3.0 * torch.randn(12, 8, 8, 8, generator=g), "net": 0.5 * torch.randn(16, 8, 8, 8, generator=g)}
    scales = {k: float(v.reshape(v.shape[0], -1).var(dim=1).sum()) ** 0.5 for k, v in sets.items()}
    both = combine(sets, scales, {"net": 0.2, "mind": 0.8})
    var = both.reshape(both.shape[0], -1).var(dim=1)
    assert abs(float(var[:12].sum()) - 0.8) < 1e-4 and abs(float(var[12:].sum()) - 0.2) < 1e-4
    equal = combine(sets, scales)
    assert abs(float(equal.reshape(28, -1).var(dim=1)[:12].sum()) - 0.5) < 1e-4


def test_different_grids_and_orientations_line_up_in_world():
    from conftest import make_affine

    img = phantom()
    fixed_aff = make_affine(spacing=(1.0, 1.0, 1.0), angles=(0.1, 0.0, -0.2), origin=(-20.0, -15.0, -20.0))
    fixed = Volume(img, fixed_aff)
    # moving: the same object sampled on a rotated, flipped, anisotropic grid covering it
    mov_aff = make_affine(spacing=(1.3, 0.9, 1.6), angles=(0.5, -0.3, 0.9), origin=(0.0, 0.0, 0.0), flips=(-1, 1, -1))
    centre_f = fixed_aff[:3, :3] @ np.full(3, (N - 1) / 2) + fixed_aff[:3, 3]
    mshape = (40, 52, 34)
    mov_aff[:3, 3] = centre_f - mov_aff[:3, :3] @ ((np.asarray(mshape) - 1) / 2)
    moving = resample_to_grid(fixed, mshape, mov_aff)
    # the best any method can do: the moving grid's content put back through the true geometry
    ideal = resample_to_grid(moving, fixed.shape, fixed_aff).data[0]
    # and its header is off by 12 mm: the initial alignment has to find it
    off = np.eye(4)
    off[:3, 3] = (12.0, -8.0, 6.0)
    moving = Volume(moving.data, off @ moving.affine)
    res = register(fixed, moving, features="mind", config=CFG, init="moments")
    fg = img[0] > 0.05

    def corr(b: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([img[0][fg], b[fg]]))[0, 1])

    headers_only = resample_to_grid(moving, fixed.shape, fixed_aff).data[0]
    assert corr(headers_only) < 0.5
    assert corr(res.moved.data[0]) > corr(ideal) - 0.05, (corr(res.moved.data[0]), corr(ideal))
    assert res.moved.shape == fixed.shape and np.allclose(res.moved.affine, fixed_aff)
    # the recovered transform undoes the header offset: fixed world -> moving world shifts by about `off`
    shift = (res.displacement.permute(1, 2, 3, 0).double()[fg]).mean(0).numpy()
    assert np.allclose(shift, off[:3, 3], atol=1.0), shift
    assert np.abs(res.world_affine[:3, :3] - np.eye(3)).max() < 0.08
    assert res.report["folding_percent"] < 1.0


def test_labels_dice_and_ids_preserved():
    """The labels are carried, their ids kept, and registration closes at least half of the gap between
    the Dice of the labels carried through the headers alone (0.767 on this pair) and 1: it measured
    0.907, the affine stage alone 0.834, so a deformable stage that returns the identity fails."""
    from synthvox.metrics import dice_per_label

    img = phantom()
    moving, _ = warped_pair(img)
    aff = np.eye(4)
    labels = (img > 0.2).long() * 7 + (img > 0.55).long() * 35  # ids 0, 7, 42
    mlabels = (moving > 0.2).long() * 7 + (moving > 0.55).long() * 35
    headers = float(np.mean(list(dice_per_label(mlabels, labels, [7, 42]).values())))  # one grid: no resampling
    res = register(Volume(img, aff), Volume(moving, aff), config=CFG, init="none",
                   moving_labels=Volume(mlabels, aff), fixed_labels=Volume(labels, aff))
    assert res.moved_labels is not None
    assert set(torch.unique(res.moved_labels.data).tolist()) <= set(torch.unique(mlabels).tolist())
    assert res.report["mean_dice"] > headers + 0.5 * (1.0 - headers), (res.report["mean_dice"], headers)
    for stage in ("init", "features", "affine", "convex", "adam", "compose", "total"):
        assert stage in res.report["seconds"]


def test_register_takes_its_config_keyword_overrides_and_auto():
    """``register(fixed, moving, config, **overrides)``: fields of the config by keyword on top of it (a
    misspelt one is a one-line error naming the closest field); ``features="auto"`` means what the
    weights' card recorded, resolved once by registration.network.resolve_features. (Shown to fail with
    the overrides dropped: the report's transform stayed deformable; and with auto left unresolved:
    an unknown feature kind.)"""
    img = phantom(24)
    aff = np.eye(4)
    fixed, mov = Volume(img, aff), Volume(torch.roll(img, 1, dims=1), aff)
    rec = _Recorder({"registration": {"features_auto": "both", "net_share": 0.2}})
    res = register(fixed, mov, CFG, features="auto", weights=rec, init="none", transform="rigid", affine_iters=(5, 5))
    rep = res.report
    assert rep["features"] == "both" and rep["network_share"] == 0.2 and rec.shapes
    assert rep["transform"] == "rigid" and rep["config"]["affine_iters"] == [5, 5] and rep["config"]["spacing"] == 1.0
    plain = _Recorder()  # no card: auto is MIND-SSC, and the network never runs
    assert register(fixed, mov, features="auto", weights=plain, config=CFG, init="none", transform="rigid",
                    affine_iters=(5, 5)).report["features"] == "mind"
    assert not plain.shapes
    with pytest.raises(InputError) as err:
        register(fixed, mov, CFG, adam_iter=5)
    assert str(err.value) == "unknown registration setting(s): adam_iter (did you mean adam_iters?)"
    with pytest.raises(InputError, match="adam_iters"):
        register(fixed, mov, CFG, adam_iters="many")
    with pytest.raises(InputError, match="transform"):
        register(fixed, mov, CFG, transform="bent")


def test_bad_inputs():
    img = phantom(24)
    aff = np.eye(4)
    far = np.eye(4)
    far[:3, 3] = (500.0, 0.0, 0.0)
    with pytest.raises(InputError, match="do not overlap"):
        register(Volume(img, aff), Volume(img, far), init="none", config=CFG)
    with pytest.raises(InputError, match="grid"):
        register(Volume(img, aff), Volume(img, aff), moving_labels=Volume(torch.zeros(1, 20, 24, 24, dtype=torch.long), aff))
    with pytest.raises(InputError, match="constant"):
        register(Volume(img, aff), Volume(torch.zeros_like(img), aff))
    with pytest.raises(InputError, match="features"):
        register(Volume(img, aff), Volume(img, aff), features="sift")
    with pytest.raises(InputError, match="init"):
        register(Volume(img, aff), Volume(img, aff), init="magic")


class _Recorder(torch.nn.Module):
    """A tiny network that records the spatial shape of every input it is given."""

    def __init__(self, card: dict | None = None) -> None:
        super().__init__()
        from synthvox.models import build_model

        self.net = build_model("tiny", seed=0)
        self.shapes: list[tuple[int, ...]] = []
        if card is not None:
            self.model_card = card

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape[2:]))
        return self.net(x)


def test_the_network_sees_both_images_at_its_own_spacing():
    """--features net: the network runs at the spacing its card gives (or net_spacing), its features
    come back on the working grid."""
    from synthvox.registration.descriptors import FeatureExtractor

    img = phantom(32)
    moving, _ = warped_pair(img)
    aff = np.eye(4)
    card = {"data": {"size": [32, 32, 32], "synth": {"labels": {"fov_mm": 64.0}}}}  # trained at 2 mm
    rec = _Recorder(card)
    res = register(Volume(img, aff), Volume(moving, aff), features="net", weights=rec, config=CFG, init="none",
                   affine=False)
    assert res.report["network_spacing_mm"] == 2.0 and res.report["working_spacing_mm"] == 1.0
    assert rec.shapes and all(max(s) < 32 for s in rec.shapes)  # 1 mm working grid seen at 2 mm
    rec.shapes.clear()
    res = register(Volume(img, aff), Volume(moving, aff), features="both", weights=rec, init="none", affine=False,
                   config=RegistrationConfig(spacing=1.0, adam_grid_mm=2.0, net_spacing=0.5))
    assert res.report["network_spacing_mm"] == 0.5
    assert rec.shapes and all(min(s) > 40 for s in rec.shapes)
    assert torch.isfinite(res.displacement).all()
    plain = _Recorder()  # no card: the working grid as it is
    res = register(Volume(img, aff), Volume(moving, aff), features="net", weights=plain, config=CFG, init="none",
                   affine=False)
    assert res.report["network_spacing_mm"] is None and (32, 32, 32) in plain.shapes
    # the features of a zoomed network lie on the image's grid, and zoom 1 is the plain network
    ex = FeatureExtractor(kind="net", model=plain.net)
    f1 = ex.raw(img, "fixed")["net"]
    f2 = FeatureExtractor(kind="net", model=plain.net, net_zoom=1.6).raw(img, "fixed")["net"]
    assert f1.shape == f2.shape and f1.shape[1:] == (32, 32, 32)
    assert not torch.allclose(f1, f2)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(InputError, match="net_spacing"):
            RegistrationConfig(spacing=1.0, net_spacing=bad)
        with pytest.raises(InputError, match="zoom"):
            FeatureExtractor(kind="net", model=plain.net, net_zoom=bad)
    # one zoom per axis: an anisotropic grid seen isotropically
    f3 = FeatureExtractor(kind="net", model=plain.net, net_zoom=(1.0, 1.0, 2.0)).raw(img, "fixed")["net"]
    assert f3.shape == f1.shape
    with pytest.raises(InputError, match="zoom"):
        FeatureExtractor(kind="net", model=plain.net, net_zoom=(1.0, 2.0))
    # an axis that is not zoomed keeps its size, however thin: the network sees the plain image
    thin = img[:, :, :, :6].contiguous()
    plain.shapes.clear()
    f4 = FeatureExtractor(kind="net", model=plain, net_zoom=(2.0, 1.0, 1.0)).raw(thin, "fixed")["net"]
    assert f4.shape[1:] == (32, 32, 6) and plain.shapes == [(63, 32, 6)]
