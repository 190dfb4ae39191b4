"""What one pretraining step computes: the data engine's pairs, the UNet with the loss's projection
heads, and their loss (DESIGN.md step 4); :mod:`synthvox.train.pretrain` runs the loop around it.

Randomness is a pure function of ``(seed, sample index)``: :func:`sample_indices` gives every
``(step, rank, position in the batch)`` its own sample index, the engine renders sample ``i`` of seed
``s`` the same everywhere, and the loss's voxel sampling uses a generator seeded from the same index
(:func:`pair_generators`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from synthvox.losses.contrastive import MultiLayerContrastiveLoss
from synthvox.models.registry import build_model
from synthvox.models.unet import UNet
from synthvox.train.config import PretrainConfig, apply_overrides

_SALT = 0x5EED_C0DE


class PairBatch(Protocol):
    labels: torch.Tensor
    view1: torch.Tensor
    view2: torch.Tensor


class PairSource(Protocol):
    """Anything that renders training pairs by index (the data engine, or a test's stand-in)."""

    def batch(self, indices: Sequence[int]) -> PairBatch: ...


def sample_indices(step: int, rank: int, world_size: int, batch_pairs: int) -> list[int]:
    """Global sample indices of one rank's batch at ``step``: every (step, rank, position) its own."""
    first = (int(step) * world_size + rank) * batch_pairs
    return list(range(first, first + batch_pairs))


def pair_generators(indices: Sequence[int], seed: int, device: torch.device) -> list[torch.Generator]:
    """One generator per sample for the loss's voxel sampling, from ``(seed, index)`` (:mod:`synthvox.seeding`)."""
    from synthvox.seeding import generator

    return [generator(seed, _SALT, int(i), device=device) for i in indices]


def build_engine(cfg: PretrainConfig, device: torch.device) -> PairSource:
    """The synthetic data engine for ``cfg.data`` on ``device``.

    Raises:
        InputError: a ``data.synth`` key that the engine's config does not have, or no shape bank.
    """
    from synthvox.synth.engine import SynthEngine

    sc = apply_overrides(cfg.data.synth, {"labels.size": list(cfg.data.size), "use_bank": cfg.data.use_bank, "seed": cfg.seed},
                         "data.synth")
    return SynthEngine(sc, device)  # loads the shipped shape bank when sc.use_bank


class PretrainModule(nn.Module):
    """The UNet plus the loss and its projection heads: ``forward`` returns the loss of a batch of pairs.

    This is what DDP wraps, so that the heads' gradients are averaged too.
    """

    def __init__(self, net: UNet, loss: MultiLayerContrastiveLoss, amp: bool = False, channels_last: bool = False,
                 compile: bool = False, prenorm: bool = False) -> None:
        super().__init__()
        self.net = net
        self.loss = loss
        self.amp = amp
        self.channels_last = channels_last
        layers = functools.partial(net.forward_layers, prenorm=prenorm)
        self._layers_fn = torch.compile(layers) if compile else layers

    def forward(
        self, view1: torch.Tensor, view2: torch.Tensor, labels: torch.Tensor, generators: Sequence[torch.Generator]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = torch.cat([view1, view2]).float()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.amp):
            feats = self._layers_fn(x, self.loss.layers)
            return self.loss(feats, labels, generators)


def build_module(cfg: PretrainConfig, device: torch.device) -> PretrainModule:
    """UNet (weights from ``cfg.seed``) and loss heads, on ``device``, with CUDA-only speed options."""
    net = build_model(cfg.model.variant, seed=cfg.seed, norm=cfg.model.norm, activation=cfg.model.activation,
                      padding_mode=cfg.model.padding)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        loss = MultiLayerContrastiveLoss(
            {k: net.layer_channels()[k] for k in cfg.loss.layers},
            {k: net.layer_scale(k) for k in cfg.loss.layers},
            temperature=cfg.loss.temperature,
            n_voxels=cfg.loss.n_voxels,
            head_hidden=cfg.loss.head_hidden,
            head_dim=cfg.loss.head_dim,
            balance=cfg.loss.balance,
            weights=cfg.loss.layer_weights,
            sampling=cfg.loss.sampling,
            head=cfg.loss.head,
        )
    cuda = device.type == "cuda"
    module = PretrainModule(net, loss, amp=cfg.amp and cuda, channels_last=cfg.channels_last and cuda, compile=cfg.compile,
                            prenorm=cfg.loss.taps == "prenorm")
    module = module.to(device)
    if module.channels_last:
        module.net.to(memory_format=torch.channels_last_3d)
    return module


def make_optimizer(module: PretrainModule, cfg: PretrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases and normalisation parameters."""
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
    )


def batch_loss(
    module: nn.Module, source: PairSource, indices: Sequence[int], seed: int, device: torch.device
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Render the pairs ``indices`` and return their loss (for tests and the training step)."""
    b = source.batch(list(indices))
    return module(
        b.view1.to(device, non_blocking=True),
        b.view2.to(device, non_blocking=True),
        b.labels.to(device, non_blocking=True),
        pair_generators(indices, seed, device),
    )
