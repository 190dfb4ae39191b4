"""Voxel-level multi-positive supervised contrastive loss across two views (the method's pretraining loss).

For each training pair (one label map rendered twice) and each chosen network layer, ``n_voxels``
locations are drawn on that layer's grid; the features of both views at those locations go through a
small projection head (used only in training) and are L2-normalised. Every embedding is an anchor; its
positives are all other embeddings (same view or the other one) whose label, the most frequent label
id in the block of input voxels under that location, is the same. The loss is the supervised
contrastive loss of Khosla et al. (2020) with temperature ``tau``::

    L_i = -1/|P(i)| sum_{p in P(i)} log( exp(s_ip / tau) / sum_{a != i} w_a exp(s_ia / tau) )

with ``w_a = 1`` or, with ``balance=True``, weights that give every label the same total weight in the
denominator. Only ``(M, M)`` similarity matrices are formed (a batched matmul of ``(M, D)``
embeddings), never an ``(M, M, D)`` tensor. Labels are arbitrary ids: permuting them changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: How the loss draws its voxel locations (see :class:`MultiLayerContrastiveLoss`).
SAMPLING = ("uniform", "balanced")

#: Stand-in for -inf on masked logits: finite so that fully masked rows stay NaN-free in backward.
_MASKED = -1.0e4


def supcon_loss(
    emb: torch.Tensor, labels: torch.Tensor, temperature: float = 0.33, balance: bool = False
) -> torch.Tensor:
    """Multi-positive supervised contrastive loss of one or more independent sets of embeddings.

    Args:
        emb: ``(B, M, D)`` embeddings (normalised inside); each of the ``B`` sets is independent
            (label ids are only compared within a set).
        labels: ``(B, M)`` integer labels; negative values mark embeddings to ignore.
        temperature: softmax temperature.
        balance: weight the denominator so that each label present contributes the same total weight
            (a rare structure is not drowned by the background).

    Returns:
        Scalar: the mean over sets of the mean over anchors that have at least one positive. A set
        without any anchor with a positive contributes zero (it still counts in the mean over sets, so
        that splitting a batch across processes and averaging gives the same value).
    """
    if emb.ndim != 3 or labels.shape != emb.shape[:2]:
        raise ValueError(f"supcon_loss expects emb (B, M, D) and labels (B, M); got {tuple(emb.shape)} and {tuple(labels.shape)}")
    b, m, _ = emb.shape
    with torch.autocast(device_type=emb.device.type, enabled=False):
        z = F.normalize(emb.float(), dim=-1)
        sim = torch.bmm(z, z.transpose(1, 2)) / float(temperature)  # (B, M, M)
        valid = labels >= 0
        eye = torch.eye(m, dtype=torch.bool, device=emb.device)
        contrast = valid[:, None, :] & valid[:, :, None] & ~eye  # pairs (i, a) with a != i, both valid
        same = labels[:, :, None] == labels[:, None, :]
        pos = same & contrast
        logits = sim.masked_fill(~contrast, _MASKED)
        if balance:
            # per-embedding weight 1 / (count of its label), rescaled so that the weights of the valid
            # embeddings sum to their number: each label present gets the same total weight.
            count = (same & valid[:, None, :]).sum(-1).clamp(min=1).float()  # (B, M)
            inv = torch.where(valid, 1.0 / count, torch.zeros_like(count))
            n_valid = valid.sum(-1, keepdim=True).float()
            n_classes = inv.sum(-1, keepdim=True).clamp(min=1e-6)
            w = inv * n_valid / n_classes
            logits = logits + torch.log(w.clamp(min=1e-12))[:, None, :]
        log_denom = torch.logsumexp(logits, dim=-1, keepdim=True)
        log_prob = sim - log_denom
        n_pos = pos.sum(-1)
        mean_pos = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(-1) / n_pos.clamp(min=1)
        anchor = n_pos > 0
        per_set = -torch.where(anchor, mean_pos, torch.zeros_like(mean_pos)).sum(-1) / anchor.sum(-1).clamp(min=1)
        return per_set.sum() / b


def block_mode_labels(
    labels: torch.Tensor, scale: int, coarse_index: torch.Tensor, coarse_shape: Sequence[int]
) -> torch.Tensor:
    """The most frequent label id in the ``scale**3`` input block under each chosen coarse voxel.

    Args:
        labels: ``(B, X, Y, Z)`` integer labels on the (padded) input grid; ``-1`` for padding.
        scale: the layer's downsampling factor (``X == coarse_shape[0] * scale``).
        coarse_index: ``(B, n)`` flat indices into the coarse grid.
        coarse_shape: ``(x, y, z)`` of the coarse grid.

    Returns:
        ``(B, n)`` labels (ties go to the smallest id; a block of mostly padding gives ``-1``).
    """
    bsz = labels.shape[0]
    flat = labels.reshape(bsz, -1)
    if scale == 1:
        return flat.gather(1, coarse_index)
    _, ys, zs = (int(s) for s in labels.shape[1:])
    cy, cz = int(coarse_shape[1]), int(coarse_shape[2])
    ci = coarse_index // (cy * cz)
    cj = (coarse_index // cz) % cy
    ck = coarse_index % cz
    base = (ci * scale * ys + cj * scale) * zs + ck * scale  # (B, n) index of each block's corner
    r = torch.arange(scale, device=labels.device)
    offsets = (r[:, None, None] * ys * zs + r[None, :, None] * zs + r[None, None, :]).reshape(-1)
    block = flat.gather(1, (base[:, :, None] + offsets).reshape(bsz, -1)).reshape(bsz, -1, offsets.numel())
    return block.mode(dim=-1).values


def sample_coarse_voxels(
    valid_shape: Sequence[int], coarse_shape: Sequence[int], n: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Draw ``n`` flat coarse-grid indices inside ``valid_shape`` (the unpadded part of the grid).

    Without replacement when the valid grid is small (at most ``4 n`` voxels; then ``min(n, V)``
    indices come back), with replacement otherwise (duplicates are then rare).
    """
    vx, vy, vz = (int(s) for s in valid_shape)
    cy, cz = int(coarse_shape[1]), int(coarse_shape[2])
    total = vx * vy * vz
    if total <= 4 * n:
        idx = torch.randperm(total, generator=generator, device=device)[:n]
    else:
        idx = torch.randint(total, (n,), generator=generator, device=device)
    i, j, k = idx // (vy * vz), (idx // vz) % vy, idx % vz
    return (i * cy + j) * cz + k


def sample_balanced_voxels(
    labels: torch.Tensor, scale: int, valid_shape: Sequence[int], coarse_shape: Sequence[int], n: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Draw ``n`` flat coarse-grid indices so that every label present gets the same expected share.

    Each valid coarse voxel is labelled by :func:`block_mode_labels` and drawn with probability
    proportional to ``1 / (voxels of its label)`` (the background is one label like any other); the
    draw is with replacement, so a label smaller than its share repeats voxels.

    Args:
        labels: ``(X, Y, Z)`` integer labels of one pair on the padded input grid (``-1`` for padding).
        scale: the layer's downsampling factor.
        valid_shape: the unpadded part of the coarse grid.
        coarse_shape: the layer's grid.
        n: number of indices.
        generator: the pair's generator.
    """
    vx, vy, vz = (int(s) for s in valid_shape)
    cy, cz = int(coarse_shape[1]), int(coarse_shape[2])
    dev = labels.device
    i = torch.arange(vx, device=dev)[:, None, None]
    j = torch.arange(vy, device=dev)[None, :, None]
    k = torch.arange(vz, device=dev)[None, None, :]
    idx = ((i * cy + j) * cz + k).reshape(1, -1)
    lab = block_mode_labels(labels[None], scale, idx, coarse_shape)[0]
    ok = lab >= 0
    idx, lab = idx[0][ok], lab[ok]
    _, inverse, counts = torch.unique(lab, return_inverse=True, return_counts=True)
    weight = 1.0 / counts.double()[inverse]
    pick = torch.multinomial(weight.float(), n, replacement=True, generator=generator)
    return idx[pick]


#: Projection head designs: ``mlp`` (Linear-ReLU-Linear) and ``mlp3bn`` (three Linear layers with
#: BatchNorm and ReLU between them, as in the method's reference code).
HEADS = ("mlp", "mlp3bn")


class ProjectionHead(nn.Module):
    """A small MLP (see :data:`HEADS`), then L2 normalisation (one per layer, training only)."""

    def __init__(self, in_channels: int, hidden: int = 256, out: int = 128, kind: str = "mlp") -> None:
        super().__init__()
        if kind == "mlp":
            self.net = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))
        elif kind == "mlp3bn":
            self.net = nn.Sequential(
                nn.Linear(in_channels, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                nn.Linear(hidden, out),
            )
        else:
            raise ValueError(f"unknown projection head {kind!r}: use one of {', '.join(HEADS)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return F.normalize(self.net(x.reshape(-1, shape[-1])), dim=-1).reshape(*shape[:-1], -1)


class MultiLayerContrastiveLoss(nn.Module):
    """The pretraining loss: :func:`supcon_loss` on voxels sampled at several layers of both views.

    Args:
        layer_channels: layer name -> channels of that layer.
        layer_scales: layer name -> downsampling factor relative to the padded input (the padded shape
            is read off the features: layer shape times its scale).
        temperature: softmax temperature (0.33 in the method).
        n_voxels: locations sampled per layer and per pair (each seen in both views).
        head_hidden: hidden width of the projection heads.
        head_dim: output width of the projection heads.
        balance: class-balanced denominator (see :func:`supcon_loss`).
        weights: optional per-layer weights (normalised to sum to one; equal by default).
        sampling: ``uniform`` (locations uniform over the volume) or ``balanced`` (every label present,
            the background included, an equal expected share; see :func:`sample_balanced_voxels`).
        head: projection head design (:data:`HEADS`).
    """

    def __init__(
        self,
        layer_channels: Mapping[str, int],
        layer_scales: Mapping[str, int],
        temperature: float = 0.33,
        n_voxels: int = 512,
        head_hidden: int = 256,
        head_dim: int = 128,
        balance: bool = False,
        weights: Mapping[str, float] | None = None,
        sampling: str = "uniform",
        head: str = "mlp",
    ) -> None:
        super().__init__()
        if sampling not in SAMPLING:
            raise ValueError(f"unknown voxel sampling {sampling!r}: use one of {', '.join(SAMPLING)}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if n_voxels < 2:
            raise ValueError(f"n_voxels must be at least 2, got {n_voxels}")
        self.layers = list(layer_channels)
        self.scales = {k: int(layer_scales[k]) for k in self.layers}
        self.temperature = float(temperature)
        self.n_voxels = int(n_voxels)
        self.balance = bool(balance)
        self.sampling = sampling
        w = {k: float((weights or {}).get(k, 1.0)) for k in self.layers}
        total = sum(w.values())
        self.weights = {k: v / total for k, v in w.items()}
        self.heads = nn.ModuleDict({k: ProjectionHead(c, head_hidden, head_dim, head) for k, c in layer_channels.items()})

    def forward(
        self,
        feats: Mapping[str, torch.Tensor],
        labels: torch.Tensor,
        generators: Sequence[torch.Generator],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of a batch of pairs.

        Args:
            feats: layer name -> ``(2B, C, x, y, z)`` features on the padded grid, view 1 of all
                pairs first, then view 2 in the same order.
            labels: ``(B, 1, X, Y, Z)`` or ``(B, X, Y, Z)`` label map of each pair (unpadded).
            generators: one generator per pair (on the features' device), for the voxel sampling:
                a pair's loss then depends only on the pair and its generator, not on the batch.

        Returns:
            The weighted mean of the per-layer losses, and the per-layer losses (detached).
        """
        if labels.ndim == 5:
            labels = labels[:, 0]
        bsz = labels.shape[0]
        if len(generators) != bsz:
            raise ValueError(f"need one generator per pair: {len(generators)} for {bsz} pairs")
        shape = tuple(int(s) for s in labels.shape[1:])
        first = self.layers[0]
        padded = tuple(int(s) * self.scales[first] for s in feats[first].shape[2:])
        if any(p < s for p, s in zip(padded, shape)):
            raise ValueError(f"features of layer {first} ({tuple(feats[first].shape)}) do not cover labels of shape {shape}")
        if padded != shape:
            pads: list[int] = []
            for s, t in zip(reversed(shape), reversed(padded)):
                pads += [0, t - s]
            labels = F.pad(labels, pads, value=-1)
        labels = labels.long()
        total = labels.new_zeros((), dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        for name in self.layers:
            f = feats[name]
            scale = self.scales[name]
            coarse = tuple(p // scale for p in padded)
            if f.shape[0] != 2 * bsz or tuple(f.shape[2:]) != coarse:
                raise ValueError(f"layer {name}: expected ({2 * bsz}, C, {coarse}) features, got {tuple(f.shape)}")
            valid = tuple(-(-s // scale) for s in shape)
            if self.sampling == "balanced":
                idx = torch.stack([
                    sample_balanced_voxels(labels[b], scale, valid, coarse, self.n_voxels, g)
                    for b, g in enumerate(generators)
                ])
            else:
                idx = torch.stack(
                    [sample_coarse_voxels(valid, coarse, self.n_voxels, g, f.device) for g in generators]
                )  # (B, n)
            lab = block_mode_labels(labels, scale, idx, coarse)  # (B, n)
            c = f.shape[1]
            flat = f.reshape(2 * bsz, c, -1)
            g = torch.cat([idx, idx])[:, None, :].expand(-1, c, -1)
            picked = flat.gather(2, g).transpose(1, 2)  # (2B, n, C)
            emb = self.heads[name](picked)
            emb = torch.cat([emb[:bsz], emb[bsz:]], dim=1)  # (B, 2n, D)
            loss = supcon_loss(emb, torch.cat([lab, lab], dim=1), self.temperature, self.balance)
            parts[name] = loss.detach()
            total = total + self.weights[name] * loss
        return total, parts
