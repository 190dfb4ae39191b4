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


def test_finetune_starts_its_head_from_the_probe(tmp_path) -> None:
    """finetune's head after one step at a negligible learning rate is the probe of its training volume
    (and is not with ``head_init="random"``). Fails with the call in segmentation/loop.py removed."""
    import numpy as np
    from conftest import two_ellipsoids

    from synthvox.segmentation import FinetuneConfig, finetune, load_model_dir, read_meta
    from synthvox.segmentation.data import prepare_subject
    from synthvox.volume import Volume

    lab = two_ellipsoids()
    g = torch.Generator().manual_seed(0)
    img = torch.zeros(lab.shape)
    for k, m in {0: 10.0, 7: 80.0, 42: 150.0}.items():
        img[lab == k] = m
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    image, labels = Volume(img + 5.0 * torch.randn(lab.shape, generator=g), affine), Volume(lab, affine)
    heads = {}
    for how in ("probe", "random"):
        out = finetune([image], [labels], FinetuneConfig(), out_dir=tmp_path / how, init="random", variant="tiny",
                       model_overrides={"activation": "leaky"}, steps=1, lr=1e-9, patch_size=32, batch_size=1,
                       device="cpu", progress=False, head_init=how)
        heads[how] = load_model_dir(out)[0]
    meta = read_meta(tmp_path / "probe")
    sub = prepare_subject(image, labels, meta.label_ids, meta.spacing, meta.normalisation)
    probe, random = heads["probe"].head, heads["random"].head
    expected = nn.Conv3d(probe.in_channels, probe.out_channels, 1)
    init_head_by_probe(expected, heads["probe"].backbone, [sub.image], [sub.classes], seed=0, roi=meta.patch_size)
    assert torch.allclose(probe.weight, expected.weight, atol=1e-3)
    assert torch.allclose(probe.bias, expected.bias, atol=1e-3)
    assert not torch.allclose(random.weight, expected.weight, atol=1e-1)
