"""The voxel-level multi-positive supervised contrastive loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from synthvox.losses.contrastive import (
    MultiLayerContrastiveLoss,
    block_mode_labels,
    sample_coarse_voxels,
    supcon_loss,
)


def naive_supcon(emb: torch.Tensor, labels: torch.Tensor, tau: float, balance: bool = False) -> float:
    """Loop-by-loop reference (Khosla et al. 2020, multi-positive; anchors without positives skipped)."""
    per_set = []
    for e, lab in zip(emb, labels):
        z = F.normalize(e.double(), dim=-1)
        idx = [i for i in range(len(lab)) if lab[i] >= 0]
        counts = {int(c): sum(1 for j in idx if lab[j] == c) for c in set(int(lab[j]) for j in idx)}
        w = {j: (len(idx) / (len(counts) * counts[int(lab[j])]) if balance else 1.0) for j in idx}
        losses = []
        for i in idx:
            pos = [p for p in idx if p != i and lab[p] == lab[i]]
            if not pos:
                continue
            denom = sum(w[a] * math.exp(float(z[i] @ z[a]) / tau) for a in idx if a != i)
            losses.append(-sum(float(z[i] @ z[p]) / tau - math.log(denom) for p in pos) / len(pos))
        per_set.append(sum(losses) / len(losses) if losses else 0.0)
    return sum(per_set) / len(per_set)


@pytest.mark.parametrize("balance", [False, True])
def test_matches_naive_reference(balance: bool) -> None:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2, 40, 8, generator=g)
    labels = torch.randint(0, 4, (2, 40), generator=g)
    labels[0, 3] = 9  # a label with a single member: an anchor without positives
    labels[1, :5] = -1  # ignored entries
    got = float(supcon_loss(emb, labels, 0.33, balance=balance))
    assert got == pytest.approx(naive_supcon(emb, labels, 0.33, balance), rel=1e-5, abs=1e-6)


def test_lower_for_features_that_separate_labels() -> None:
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 6, (3, 256), generator=g)
    separating = F.one_hot(labels, 16).float() + 0.1 * torch.randn(3, 256, 16, generator=g)
    random = torch.randn(3, 256, 16, generator=g)
    for balance in (False, True):
        good = supcon_loss(separating, labels, balance=balance)
        bad = supcon_loss(random, labels, balance=balance)
        assert good < bad - 0.5


def test_invariant_to_permuting_label_ids() -> None:
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(2, 100, 12, generator=g)
    labels = torch.randint(0, 5, (2, 100), generator=g)
    ids = torch.tensor([42, 7, 1000, 3, 0])  # a permutation onto arbitrary ids
    relabelled = ids[labels]
    for balance in (False, True):
        a = supcon_loss(emb, labels, balance=balance)
        b = supcon_loss(emb, relabelled, balance=balance)
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


def test_gradient_finite_in_degenerate_cases() -> None:
    # identical embeddings, a set where every label is a singleton, a set with everything ignored
    emb = torch.ones(3, 16, 4)
    emb[1] = torch.randn(16, 4)
    emb.requires_grad_(True)
    labels = torch.stack([torch.arange(16) % 2, torch.arange(16), torch.full((16,), -1)])
    for balance in (False, True):
        loss = supcon_loss(emb, labels, balance=balance)
        (g,) = torch.autograd.grad(loss, emb)
        assert torch.isfinite(loss) and torch.isfinite(g).all()
    # no anchor anywhere: zero loss, zero gradient, no NaN
    loss = supcon_loss(emb, torch.stack([torch.arange(16)] * 3))
    (g,) = torch.autograd.grad(loss, emb)
    assert float(loss.detach()) == 0.0 and torch.isfinite(g).all()


def test_block_mode_labels_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (2, 8, 12, 4), generator=g)
    labels[:, 4:, :, :] = -1  # padding
    scale, coarse = 4, (2, 3, 1)
    idx = torch.tensor([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    got = block_mode_labels(labels, scale, idx, coarse)
    for b in range(2):
        for n, flat in enumerate(idx[b].tolist()):
            i, j, k = flat // 3, flat % 3, 0
            block = labels[b, i * 4 : i * 4 + 4, j * 4 : j * 4 + 4, k * 4 : k * 4 + 4].reshape(-1)
            vals, counts = block.unique(return_counts=True)
            assert int(got[b, n]) == int(vals[counts == counts.max()].min())


def test_sampling_stays_in_the_unpadded_region() -> None:
    g = torch.Generator().manual_seed(4)
    for valid, coarse, n in [((3, 5, 2), (4, 6, 2), 8), ((20, 20, 20), (24, 24, 24), 64)]:
        idx = sample_coarse_voxels(valid, coarse, n, g, torch.device("cpu"))
        i, j, k = idx // (coarse[1] * coarse[2]), (idx // coarse[2]) % coarse[1], idx % coarse[2]
        assert len(idx) == min(n, valid[0] * valid[1] * valid[2])
        assert (i < valid[0]).all() and (j < valid[1]).all() and (k < valid[2]).all()
    small = sample_coarse_voxels((2, 2, 1), (2, 2, 2), 8, g, torch.device("cpu"))
    assert len(small) == 4 and len(set(small.tolist())) == 4  # small grids: without replacement


def _loss_module(**kw) -> MultiLayerContrastiveLoss:
    torch.manual_seed(0)
    return MultiLayerContrastiveLoss({"a": 6, "b": 4}, {"a": 4, "b": 1}, n_voxels=32, **kw)


def _views(labels: torch.Tensor, shape: tuple[int, int, int], noise: float, seed: int) -> dict[str, torch.Tensor]:
    """Features that encode the label (one-hot, pooled to each layer) plus noise, for two views."""
    g = torch.Generator().manual_seed(seed)
    oh = F.one_hot(labels[:, 0], 6).permute(0, 4, 1, 2, 3).float()
    oh = F.pad(oh, (0, shape[2] - oh.shape[4], 0, shape[1] - oh.shape[3], 0, shape[0] - oh.shape[2]))
    a = F.avg_pool3d(oh, 4)
    both = lambda t: torch.cat([t, t]) + noise * torch.randn((2 * t.shape[0],) + t.shape[1:], generator=g)  # noqa: E731
    return {"a": both(a), "b": both(oh[:, :4])}


def test_multilayer_loss_prefers_label_features_and_pads_labels() -> None:
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 4, (2, 1, 2, 3, 1), generator=g).repeat_interleave(7, 2).repeat_interleave(5, 3).repeat_interleave(6, 4)
    labels = labels[:, :, :14, :15, :6]  # (2, 1, 14, 15, 6): not a multiple of the scales
    shape = (16, 16, 8)
    crit = _loss_module()
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    good, parts = crit(_views(labels, shape, 0.05, 0), labels, gens())
    noise = {k: torch.randn_like(v) for k, v in _views(labels, shape, 0.05, 0).items()}
    bad, _ = crit(noise, labels, gens())
    assert set(parts) == {"a", "b"}
    assert float(good.detach()) < float(bad.detach())


def test_loss_of_a_batch_is_the_mean_of_its_pairs() -> None:
    """Each pair's loss depends only on the pair and its generator: what makes DDP match one process."""
    g = torch.Generator().manual_seed(6)
    labels = torch.randint(0, 3, (2, 1, 16, 16, 8), generator=g)
    feats = {"a": torch.randn(4, 6, 4, 4, 2, generator=g), "b": torch.randn(4, 4, 16, 16, 8, generator=g)}
    crit = _loss_module(balance=True)
    gen = lambda i: torch.Generator().manual_seed(100 + i)  # noqa: E731
    both, _ = crit(feats, labels, [gen(0), gen(1)])
    first, _ = crit({k: v[[0, 2]] for k, v in feats.items()}, labels[:1], [gen(0)])
    second, _ = crit({k: v[[1, 3]] for k, v in feats.items()}, labels[1:], [gen(1)])
    assert torch.allclose(both, (first + second) / 2, atol=1e-6)


def test_each_pair_contrasts_view_1_with_its_own_view_2() -> None:
    """The loss of a pair is supcon over the projected features of both views at the same sampled
    locations, view 1 of every pair in the first half of the batch and view 2 in the second: computed
    here by hand from the heads. Before this test, a forward that took view 1's embeddings for view
    2's (``emb[:bsz]`` for ``emb[bsz:]``) passed all 13 other tests of this file; it fails here (checked
    by compiling that mutant of the forward's source), as does a view 2 of noise beside a view 1 that
    encodes the labels (the second assertion)."""
    g = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 3, (2, 1, 16, 16, 8), generator=g)
    feats = {"a": torch.randn(4, 6, 4, 4, 2, generator=g), "b": torch.randn(4, 4, 16, 16, 8, generator=g)}
    crit = _loss_module()
    gens = lambda: [torch.Generator().manual_seed(200 + i) for i in range(2)]  # noqa: E731
    got, parts = crit(feats, labels, gens())
    expected = 0.0
    draws = gens()
    for name, scale in (("a", 4), ("b", 1)):
        f = feats[name]
        coarse = tuple(s // scale for s in labels.shape[2:])
        idx = torch.stack([sample_coarse_voxels(coarse, coarse, crit.n_voxels, d, f.device) for d in draws])
        lab = block_mode_labels(labels[:, 0], scale, idx, coarse)
        flat = f.reshape(4, f.shape[1], -1)
        per_pair = []
        for b in range(2):
            v1 = crit.heads[name](flat[b][:, idx[b]].T)  # view 1 of pair b: row b
            v2 = crit.heads[name](flat[2 + b][:, idx[b]].T)  # view 2 of pair b: row B + b
            per_pair.append(supcon_loss(torch.cat([v1, v2])[None], torch.cat([lab[b], lab[b]])[None]))
        loss = torch.stack(per_pair).mean()
        assert torch.allclose(parts[name], loss.detach(), atol=1e-6), name
        expected = expected + crit.weights[name] * loss
    assert torch.allclose(got, expected, atol=1e-6)
    # a view 2 that does not encode the labels costs more than one that does, whatever view 1 is
    small = torch.randint(0, 4, (2, 1, 2, 3, 1), generator=g).repeat_interleave(8, 2).repeat_interleave(5, 3)
    small = small.repeat_interleave(8, 4)[:, :, :16, :15, :8]
    good = _views(small, (16, 16, 8), 0.05, 0)
    half = {k: torch.cat([v[:2], torch.randn(v[2:].shape, generator=g)]) for k, v in good.items()}
    both, _ = crit(good, small, gens())
    one, _ = crit(half, small, gens())
    one, both = float(one.detach()), float(both.detach())
    assert one > both + 0.5, (one, both)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        MultiLayerContrastiveLoss({"a": 4}, {"a": 1}, temperature=0.0)
    crit = _loss_module()
    labels = torch.zeros(2, 1, 16, 16, 8, dtype=torch.long)
    feats = {"a": torch.randn(4, 6, 4, 4, 2), "b": torch.randn(4, 4, 16, 16, 8)}
    with pytest.raises(ValueError):
        crit(feats, labels, [torch.Generator()])  # one generator for two pairs
    with pytest.raises(ValueError):
        supcon_loss(torch.randn(2, 5, 3), torch.zeros(2, 4, dtype=torch.long))


def test_balanced_sampling_gives_every_label_its_share() -> None:
    from synthvox.losses.contrastive import sample_balanced_voxels

    lab = torch.zeros(32, 32, 32, dtype=torch.long)  # background: 97 % of the volume
    lab[2:6, 2:6, 2:6] = 1  # 64 voxels
    lab[10:20, 10:20, 10:12] = 2  # 200 voxels
    lab[:, :, 30:] = -1  # padding: never drawn
    g = torch.Generator().manual_seed(0)
    idx = sample_balanced_voxels(lab, 1, (32, 32, 30), (32, 32, 32), 3000, g)
    picked = lab.reshape(-1)[idx]
    share = torch.stack([(picked == c).float().mean() for c in (0, 1, 2)])
    assert (picked >= 0).all()
    assert torch.allclose(share, torch.full((3,), 1 / 3), atol=0.04), share
    # on a coarse layer the label of a location is its block's mode
    idx2 = sample_balanced_voxels(lab, 2, (16, 16, 15), (16, 16, 16), 600, g)
    modes = block_mode_labels(lab[None], 2, idx2[None], (16, 16, 16))[0]
    assert set(modes.tolist()) <= {0, 1, 2} and len(set(modes.tolist())) == 3


@pytest.mark.parametrize("head", ["mlp", "mlp3bn"])
def test_loss_options_run_and_weight_layers(head: str) -> None:
    layers = {"dec1": 8, "out": 4}
    scales = {"dec1": 2, "out": 1}
    loss = MultiLayerContrastiveLoss(layers, scales, n_voxels=64, head_hidden=16, head_dim=8, sampling="balanced",
                                     head=head, weights={"out": 3.0})
    assert loss.weights == pytest.approx({"dec1": 0.25, "out": 0.75})
    lab = torch.zeros(1, 16, 16, 16, dtype=torch.long)
    lab[0, 4:8, 4:8, 4:8] = 1
    feats = {"dec1": torch.randn(2, 8, 8, 8, 8, requires_grad=True), "out": torch.randn(2, 4, 16, 16, 16, requires_grad=True)}
    total, parts = loss(feats, lab, [torch.Generator().manual_seed(1)])
    assert torch.isfinite(total) and set(parts) == {"dec1", "out"}
    assert float(total.detach()) == pytest.approx(0.25 * float(parts["dec1"].detach()) + 0.75 * float(parts["out"].detach()), rel=1e-5)
    total.backward()
    assert feats["out"].grad.abs().sum() > 0
    with pytest.raises(ValueError):
        MultiLayerContrastiveLoss(layers, scales, sampling="stratified")
    with pytest.raises(ValueError):
        MultiLayerContrastiveLoss(layers, scales, head="transformer")
