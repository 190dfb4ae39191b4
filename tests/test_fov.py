"""Field-of-view independence (issue 22): of the network's features, and of the intensity scaling before it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from synthvox.errors import InputError
from synthvox.models.extract import card_scaling, foreground_range, normalise_intensity
from synthvox.models.unet import UNet

#: edge voxels added on every side; a multiple of 2**levels, so the pooling grid stays where it was
PAD = 8
#: voxels of the 48³ image whose receptive field (about 11 voxels for levels=1) lies inside it
INNER = (slice(16, 32),) * 3


def _net(norm: str, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    net = UNet(out_channels=4, base_channels=4, levels=1, norm=norm).double()
    for m in net.modules():  # statistics and affine parameters that are not the identity
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
        if isinstance(m, (torch.nn.BatchNorm3d, torch.nn.InstanceNorm3d)) or type(m).__name__ == "VoxelNorm":
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net


def _inner_change(net: UNet) -> float:
    """Largest change of the features of the inner voxels when the image is padded with ``PAD`` edge
    voxels on every side, relative to the features' largest magnitude there."""
    x = torch.rand(1, 1, 48, 48, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x[..., :24] += 1.0  # an edge to see
    with torch.no_grad():
        a = net(x)[(slice(None), slice(None), *INNER)]
        b = net(F.pad(x, (PAD,) * 6, mode="replicate"))[(slice(None), slice(None), *(slice(s.start + PAD, s.stop + PAD) for s in INNER))]
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
def test_features_beyond_the_receptive_field_do_not_see_padding(norm: str) -> None:
    """A voxel's features depend only on the image within its receptive field with batch normalisation
    in eval mode (fixed statistics), with ``norm="layer"`` (over each voxel's channels) and without a
    normalisation. This test can fail: the batch-normalised network in train mode (statistics of the
    batch, i.e. of the whole field of view) changes by ~10 % (the next test), and so does instance
    normalisation."""
    net = _net(norm).eval()
    assert _inner_change(net) < 1e-9


@pytest.mark.parametrize("norm", ["instance", "group"])
def test_features_with_statistics_over_the_volume_see_padding(norm: str) -> None:
    """Instance and group normalisation take their statistics over the whole volume: padding moves
    every voxel's features."""
    assert _inner_change(_net(norm).eval()) > 1e-3


def test_batch_normalisation_in_train_mode_sees_padding() -> None:
    """The failing case of the first test, shown: batch statistics are the field of view's."""
    assert _inner_change(_net("batch").train()) > 1e-3


# ------------------------------------------------------------------------------------- intensity scaling


def _head(size: int = 40, seed: int = 0) -> torch.Tensor:
    """An MR-like ``(1, X, Y, Z)`` image: noisy air around an ellipsoid of three tissues, a bright rim."""
    g = torch.Generator().manual_seed(seed)
    r = torch.linspace(-1, 1, size)
    zz, yy, xx = torch.meshgrid(r, r, r, indexing="ij")
    d = (xx / 0.8) ** 2 + (yy / 0.7) ** 2 + (zz / 0.75) ** 2
    img = torch.where(d < 1, 300.0, 0.0) + torch.where(d < 0.5, 100.0, 0.0) - torch.where(d < 0.1, 250.0, 0.0)
    img = img + torch.where((d > 0.9) & (d < 1), 500.0, 0.0)  # fat
    img = img * (1.0 + 0.3 * xx + 0.2 * yy)  # a bias field: no plateau at the top of the histogram
    return (img + 8.0 * torch.randn(img.shape, generator=g)).abs()[None]


def _range(x: torch.Tensor, scaling: str) -> tuple[float, float]:
    """The intensities that ``normalise_intensity`` maps to 0 and to 1."""
    if scaling == "foreground":
        lo, hi = foreground_range(x)
        return float(lo), float(hi)
    flat = x.reshape(-1).double()
    return float(torch.quantile(flat, 0.005)), float(torch.quantile(flat, 0.995))


@pytest.mark.parametrize("padding", ["zeros", "noise"])
def test_foreground_scaling_does_not_move_with_background_and_percentile_scaling_does(padding: str) -> None:
    """Adding air around the head (as much again as the image, zeros or the same noise) leaves the
    foreground scaling where it was (the same voxels scaled within 1 %), and moves the whole-volume
    percentile scaling by more than 10 %."""
    x = _head()
    pad = F.pad(x[None], (20,) * 6)[0]
    if padding == "noise":
        g = torch.Generator().manual_seed(3)
        pad = torch.where(pad == 0, (8.0 * torch.randn(pad.shape, generator=g)).abs(), pad)
        pad[(slice(None), *(slice(20, 60),) * 3)] = x
    inside = (slice(None), *(slice(20, 60),) * 3)
    a = normalise_intensity(x, "mr", scaling="foreground")
    b = normalise_intensity(pad, "mr", scaling="foreground")[inside]
    assert float((a - b).abs().max()) < 0.01
    lo, hi = _range(x, "foreground")
    assert abs(_range(pad, "foreground")[1] - hi) < 0.01 * (hi - lo)
    a = normalise_intensity(x, "mr", scaling="percentile")
    b = normalise_intensity(pad, "mr", scaling="percentile")[inside]
    assert float((a - b).abs().max()) > 0.1


def test_foreground_scaling_puts_tissue_where_the_percentiles_did() -> None:
    """The foreground median at 1/3: tissue about as bright as the percentile scaling makes it, in
    [0, 1]; a constant image, and CT (a fixed window), are unaffected."""
    x = _head()
    a, b = normalise_intensity(x, "mr", scaling="foreground"), normalise_intensity(x, "mr")
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    tissue = x > 150
    assert abs(float(a[tissue].median()) - float(b[tissue].median())) < 0.2
    flat = torch.full((1, 8, 8, 8), 5.0)
    assert torch.equal(normalise_intensity(flat, "mr", scaling="foreground"), torch.zeros_like(flat))
    ct = torch.linspace(-1000, 1500, 4096).reshape(1, 16, 16, 16)
    assert torch.equal(normalise_intensity(ct, scaling="foreground"), normalise_intensity(ct))
    with pytest.raises(InputError, match="scaling"):
        normalise_intensity(x, scaling="otsu")


def test_the_card_names_the_scaling_and_percentile_stays_the_default_for_instance_norm() -> None:
    net = UNet(levels=1, base_channels=4, out_channels=4)
    assert card_scaling(net) == "percentile"  # no card: the scaling every network so far was used with
    net.model_card = {"intensity_scaling": "foreground"}
    assert card_scaling(net) == "foreground"
    net.model_card = {"intensity_scaling": "bogus"}
    assert card_scaling(net) == "percentile"
    # a batch-normalised network whose card names none is used with the scaling that ignores air
    bn = UNet(levels=1, base_channels=4, out_channels=4, norm="batch")
    assert card_scaling(bn) == "foreground"
    bn.model_card = {"intensity_scaling": "percentile"}
    assert card_scaling(bn) == "percentile"
