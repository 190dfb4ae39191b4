"""The new head's starting weights: a linear probe on the pretrained features (linear probing, then finetuning).

A segmentation network is the pretrained UNet plus a new 1x1x1 convolution to class logits. Started
from random weights, that head sends random gradients into the pretrained network for the first
hundreds of steps, which distorts the features before the head has learnt to read them (Kumar et al.,
"Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution", ICLR 2022: linear
probing first, then finetuning, keeps more of what pretraining learnt and generalises better). Here
the probe is a multinomial logistic regression on the backbone's features of the training volumes
(every class sampled alike, its bias then corrected to the classes' true frequencies), solved with
L-BFGS in seconds, and it becomes the head's initial weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: Voxels drawn per class and training volume for the probe.
PROBE_VOXELS_PER_CLASS = 4000
#: L2 penalty on the probe's weights (on standardised features).
PROBE_L2 = 1e-3
#: L-BFGS iterations of the probe.
PROBE_ITERATIONS = 100


@torch.no_grad()
def probe_samples(
    backbone: nn.Module,
    images: Sequence[torch.Tensor],
    classes: Sequence[torch.Tensor],
    n_classes: int,
    generator: torch.Generator,
    roi: Sequence[int] | None = None,
    per_class: int = PROBE_VOXELS_PER_CLASS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features ``(N, C)`` and classes ``(N,)`` of up to ``per_class`` voxels of each class of each
    volume, and each class's voxel count over all volumes ``(n_classes,)``.

    ``images`` are ``(1, X, Y, Z)`` model-frame volumes, ``classes`` their ``(1, X, Y, Z)`` class maps;
    with ``roi`` the features come window by window (the training patch: what the head will see, and
    bounded memory on large volumes), else in one pass.
    """
    from synthvox.models.extract import sliding_window

    was_training = backbone.training
    backbone.eval()
    feats, labs = [], []
    counts = torch.zeros(n_classes, dtype=torch.float64)
    try:
        for image, cls in zip(images, classes):
            x = image[None].float()
            f = (backbone(x) if roi is None else sliding_window(backbone, x, roi, x.device))[0]  # (C, X, Y, Z)
            f = f.reshape(f.shape[0], -1).T.float().cpu()
            c = cls.reshape(-1).cpu()
            counts += torch.bincount(c, minlength=n_classes)[:n_classes].double()
            for k in torch.unique(c).tolist():
                idx = torch.nonzero(c == k).reshape(-1)
                if len(idx) > per_class:
                    idx = idx[torch.randperm(len(idx), generator=generator)[:per_class]]
                feats.append(f[idx])
                labs.append(c[idx])
    finally:
        backbone.train(was_training)
    return torch.cat(feats), torch.cat(labs), counts


def fit_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    counts: torch.Tensor,
    l2: float = PROBE_L2,
    iterations: int = PROBE_ITERATIONS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression ``labels ~ softmax(W x + b)``: returns ``W (K, C)`` and ``b (K,)``
    on the raw features (the standardisation folded in), the bias corrected from the sample's class
    frequencies to ``counts``' (a class never seen keeps a very negative bias)."""
    n_classes = int(counts.numel())
    x = features.double()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    y = labels.long()
    w = torch.zeros(n_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iterations, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(z @ w.T + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        sampled = torch.bincount(y, minlength=n_classes)[:n_classes].double()
        prior = torch.log(counts.clamp_min(1.0) / counts.sum()) - torch.log(sampled.clamp_min(1.0) / sampled.sum())
        prior[sampled == 0] = -20.0
        weight = w / sd
        bias = b - (weight * mu).sum(1) + prior
    return weight.float(), bias.float()


def init_head_by_probe(
    head: nn.Conv3d,
    backbone: nn.Module,
    images: Sequence[torch.Tensor],
    classes: Sequence[torch.Tensor],
    seed: int,
    roi: Sequence[int] | None = None,
) -> None:
    """Set the 1x1x1 ``head``'s weights to the linear probe of ``backbone``'s features on the training
    volumes (:func:`probe_samples` in windows of ``roi``, :func:`fit_probe`); deterministic for a ``seed``."""
    from synthvox.seeding import PROBE_VOXELS, generator

    n_classes = head.out_channels
    x, y, counts = probe_samples(backbone, images, classes, n_classes, generator(seed, PROBE_VOXELS), roi)
    weight, bias = fit_probe(x, y, counts)
    with torch.no_grad():
        head.weight.copy_(weight.reshape(head.weight.shape).to(head.weight))
        head.bias.copy_(bias.to(head.bias))
