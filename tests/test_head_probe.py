"""The new head's start from a linear probe on the pretrained features (segmentation/head.py).

Shown to fail on broken versions: with the head's weights left at their random start (the copy in
``init_head_by_probe`` removed) the class map agrees on under a third of the voxels; with the prior
correction dropped from ``fit_probe`` the rare class takes the ambiguous points and
``test_bias_follows_the_true_class_frequencies`` fails; with the standardisation not folded back
(``weight = w``) the raw-feature predictions are wrong and both probe tests fail.
"""

from __future__ import annotations

import torch
from torch import nn

from synthvox.segmentation.head import fit_probe, init_head_by_probe, probe_samples
from synthvox.segmentation.modeldir import SegmentationNet


def _blobs(n: int, centres: torch.Tensor, scale: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    k = centres.shape[0]
    y = torch.arange(k).repeat_interleave(n)
    x = centres[y] + torch.randn(len(y), centres.shape[1], generator=g) * 0.3
    return x * scale + 5.0, y  # features far from standardised: the fold-back must hold


def test_probe_separates_classes_on_raw_features() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 2.0, 1.0], [1.0, 1.0, 3.0]])
    scale = torch.tensor([100.0, 0.01, 3.0])
    x, y = _blobs(300, centres, scale, g)
    w, b = fit_probe(x, y, torch.bincount(y).double())
    acc = float(((x @ w.T + b).argmax(1) == y).float().mean())
    assert acc > 0.97, acc


def test_bias_follows_the_true_class_frequencies() -> None:
    """Sampled alike but 99:1 in the volumes, the point halfway between two classes goes to the common one."""
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0], [1.0]])
    x, y = _blobs(500, centres, torch.ones(1), g)
    w, b = fit_probe(x, y, torch.tensor([99_000.0, 1_000.0]))
    mid = torch.tensor([[0.5 + 5.0]])
    assert int((mid @ w.T + b).argmax(1)) == 0
    w2, b2 = fit_probe(x, y, torch.tensor([1_000.0, 99_000.0]))
    assert int((mid @ w2.T + b2).argmax(1)) == 1


class _Features(nn.Module):
    """A fixed 'pretrained' backbone: the intensity, its square and a constant, per voxel."""

    out_channels = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x * x, torch.ones_like(x)], dim=1)


def test_head_starts_from_the_probe() -> None:
    g = torch.Generator().manual_seed(2)
    classes = torch.randint(0, 3, (1, 12, 12, 12), generator=g)
    image = classes.float() * 0.4 + 0.05 * torch.randn(classes.shape, generator=g)
    net = SegmentationNet(_Features(), 3, 3)
    x, y, counts = probe_samples(net.backbone, [image], [classes], 3, g)
    assert x.shape == (classes.numel(), 3) and counts.sum() == classes.numel()
    init_head_by_probe(net.head, net.backbone, [image], [classes], seed=0)
    with torch.no_grad():
        pred = net(image[None])[0].argmax(0)
    assert float((pred == classes[0]).float().mean()) > 0.95


def test_probe_is_deterministic_for_a_seed() -> None:
    g = torch.Generator().manual_seed(3)
    classes = torch.randint(0, 3, (1, 20, 20, 20), generator=g)
    image = classes.float() + 0.3 * torch.randn(classes.shape, generator=g)
    heads = []
    for _ in range(2):
        net = SegmentationNet(_Features(), 3, 3)
        init_head_by_probe(net.head, net.backbone, [image], [classes], seed=7)
        heads.append(net.head.weight.detach().clone())
    assert torch.equal(heads[0], heads[1])
