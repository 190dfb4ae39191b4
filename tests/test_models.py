"""The UNet, its variants, self-describing weights and feature extraction."""

from __future__ import annotations

import json

import pytest
import torch

from synthvox.errors import InputError
from synthvox.models import (
    UNet,
    build_model,
    count_parameters,
    default_weights_path,
    extract_features,
    load_default_model,
    load_model,
    normalise_intensity,
    save_model,
)


def test_default_matches_reference_size() -> None:
    n = count_parameters(build_model("default"))
    assert 5.8e6 < n < 6.0e6
    assert count_parameters(build_model("tiny")) < n < count_parameters(build_model("large"))
    net = build_model("default")
    assert net.layer_channels()["bottleneck"] == 256 and net.out_channels == 16 and net.levels == 4


def test_any_input_size_keeps_shape() -> None:
    net = build_model("tiny").eval()
    x = torch.rand(2, 1, 37, 41, 29)
    with torch.no_grad():
        y = net(x)
        layers = net.forward_layers(x, ["enc3", "bottleneck", "dec1", "out"])
    assert y.shape == (2, 16, 37, 41, 29)
    padded = net.padded_shape((37, 41, 29))
    assert padded == (48, 48, 32)
    for name, t in layers.items():
        assert tuple(t.shape[2:]) == tuple(p // net.layer_scale(name) for p in padded)
    # the crop is the output on the padded input
    assert torch.allclose(layers["out"][:, :, :37, :41, :29], y, atol=1e-6)


@pytest.mark.parametrize("norm", ["instance", "none"])
def test_prenorm_taps_are_each_levels_last_convolution(norm: str) -> None:
    """``prenorm``: the level's last convolution before normalisation and activation; the network's
    output is unchanged (an in-place activation does not reach back into the tap)."""
    net = UNet(base_channels=4, levels=2, out_channels=4, norm=norm).eval()
    x = torch.rand(1, 1, 16, 16, 16)
    names = net.layer_names()
    with torch.no_grad():
        block, pre = net.forward_layers(x, names), net.forward_layers(x, names, prenorm=True)
        enc0 = net.encoders[0]
        expected = enc0[1][0](enc0[0](net.stem(x)))
    assert torch.allclose(pre["enc0"], expected)
    assert float(pre["enc0"].min()) < 0 <= float(block["enc0"].min())  # before the ReLU: negatives remain
    for name in names:
        assert pre[name].shape == block[name].shape
        assert torch.allclose(pre[name], block[name]) == (name == "out")
    assert torch.allclose(pre["out"], net(x), atol=1e-6)


def test_initialisation_is_seeded_without_touching_global_rng() -> None:
    state = torch.random.get_rng_state()
    a, b, c = build_model("tiny", seed=3), build_model("tiny", seed=3), build_model("tiny", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    wa, wb, wc = (next(m.parameters()) for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize("norm,activation", [("batch", "leaky"), ("group", "gelu"), ("none", "relu")])
def test_norm_and_activation_options(norm: str, activation: str) -> None:
    net = build_model("tiny", norm=norm, activation=activation)
    y = net(torch.rand(2, 1, 16, 16, 16))
    assert y.shape == (2, 16, 16, 16, 16) and torch.isfinite(y).all()


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError):
        build_model("huge")
    with pytest.raises(ValueError):
        UNet(norm="weird")
    with pytest.raises(ValueError):
        UNet(activation="swish")
    with pytest.raises(ValueError):
        build_model("tiny").forward_layers(torch.rand(1, 1, 16, 16, 16), ["enc9"])


def test_save_load_round_trip_exact(tmp_path) -> None:
    net = build_model("tiny", seed=1, norm="batch")
    net(torch.rand(2, 1, 16, 16, 16))  # give batch norm non-trivial running statistics
    save_model(net, tmp_path / "m", extra={"steps": 12})
    loaded = load_model(tmp_path / "m")
    assert not loaded.training and loaded.config() == net.config()
    for (k, v), (k2, v2) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["extra"]["steps"] == 12 and cfg["n_parameters"] == count_parameters(net)
    # loading by file path works too; half precision halves the file and loads back as float32
    save_model(net, tmp_path / "h", half=True)
    half = load_model(tmp_path / "h" / "model.safetensors")
    assert (tmp_path / "h" / "model.safetensors").stat().st_size < 0.6 * (tmp_path / "m" / "model.safetensors").stat().st_size
    w, wh = next(net.parameters()), next(half.parameters())
    assert wh.dtype == torch.float32 and torch.allclose(w, wh, rtol=1e-3, atol=1e-4)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


def test_load_errors_are_one_line(tmp_path) -> None:
    net = build_model("tiny")
    d = save_model(net, tmp_path / "m")
    with pytest.raises(InputError) as e:
        load_model(tmp_path / "missing")
    assert "not found" in _one_line(e)
    # truncated weights
    w = d / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as e:
        load_model(d)
    assert "corrupt" in _one_line(e) or "truncated" in _one_line(e)
    # intact weights, but a config that no longer describes them
    w.write_bytes(data)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architecture"]["base_channels"] = 8
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError) as e:
        load_model(d)
    assert "do not match" in _one_line(e)
    (d / "config.json").write_text("{not json")
    with pytest.raises(InputError) as e:
        load_model(d)
    _one_line(e)
    (d / "config.json").unlink()
    with pytest.raises(InputError):
        load_model(d)
    # garbage with a valid config and no checksum: safetensors rejects it without unpickling anything
    d2 = save_model(net, tmp_path / "g")
    cfg = json.loads((d2 / "config.json").read_text())
    del cfg["sha256"]
    (d2 / "config.json").write_text(json.dumps(cfg))
    (d2 / "model.safetensors").write_bytes(b"\x80\x04garbage-not-a-safetensors-file" * 10)
    with pytest.raises(InputError) as e:
        load_model(d2)
    _one_line(e)


def test_default_weights_path_or_clear_error() -> None:
    p = default_weights_path()
    if p is None:
        with pytest.raises(InputError, match="no pretrained default weights"):
            load_default_model()
    else:
        assert isinstance(load_default_model(), UNet)


def test_normalise_intensity() -> None:
    g = torch.Generator().manual_seed(0)
    mr = torch.rand(1, 20, 20, 20, generator=g) * 300
    mr[0, 0, 0, 0] = 1e6  # one outlier must not squash the rest
    n = normalise_intensity(mr, "mr")
    assert n.min() >= 0 and n.max() <= 1 and float(n.median()) > 0.3
    ct = torch.full((1, 10, 10, 10), -1000.0)
    ct[:, 3:7] = 40.0
    ct[:, 7:] = 1500.0
    auto = normalise_intensity(ct)  # looks like HU -> CT default window
    assert torch.allclose(auto, normalise_intensity(ct, "ct"))
    win = normalise_intensity(ct, ct_window=(-100, 200))
    assert float(win[0, 0].max()) == 0.0 and float(win[0, 9].min()) == 1.0
    assert 0.4 < float(win[0, 5, 0, 0]) < 0.5
    with pytest.raises(InputError):
        normalise_intensity(mr, "pet")
    with pytest.raises(InputError):
        normalise_intensity(ct, "ct", ct_window=(200, -100))
    assert torch.equal(normalise_intensity(torch.ones(1, 4, 4, 4)), torch.zeros(1, 4, 4, 4))


@pytest.mark.parametrize("lo,hi", [(-3e38, 3e38), (-1e38, 1e38), (0.0, 3.4e38), (1e30, 1e30 * (1 + 1e-6))])
def test_normalise_intensity_does_not_overflow_float32(lo, hi) -> None:
    """Differences of finite float32 values can overflow; the result must stay finite, in [0, 1]."""
    x = (torch.linspace(0, 1, 4000, dtype=torch.float64).reshape(1, 10, 20, 20) * (hi - lo) + lo).float()
    assert torch.isfinite(x).all()
    for modality in ("mr", "ct"):
        n = normalise_intensity(x.float(), modality)
        assert torch.isfinite(n).all() and n.min() >= 0 and n.max() <= 1
    assert float(normalise_intensity(x.float(), "mr").max()) == 1.0


@pytest.mark.parametrize("window", [(float("-inf"), 100.0), (0.0, float("inf")), (float("nan"), 1.0), (5.0, 5.0)])
def test_normalise_intensity_refuses_non_finite_windows(window) -> None:
    with pytest.raises(InputError, match="CT window"):
        normalise_intensity(torch.rand(1, 4, 4, 4), "ct", ct_window=window)


def test_extract_features_direct_and_sliding_window() -> None:
    net = build_model("tiny", norm="none", seed=2)
    g = torch.Generator().manual_seed(1)
    img = torch.rand(1, 40, 36, 20, generator=g)
    direct = extract_features(net, img, "cpu", patch=64)
    with torch.no_grad():
        assert torch.allclose(direct, net(img[None])[0], atol=1e-5)
    sw = extract_features(net, img, "cpu", patch=32, overlap=0.5)
    assert sw.shape == (16, 40, 36, 20) and sw.dtype == torch.float32 and torch.isfinite(sw).all()
    # away from window borders the windows see the same context: blended features agree with the direct ones
    corr = torch.corrcoef(torch.stack([sw.flatten(), direct.flatten()]))[0, 1]
    assert corr > 0.9
    assert net.training  # the caller's mode is restored
    with pytest.raises(InputError):
        extract_features(net, img[0], "cpu")
