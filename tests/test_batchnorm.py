"""Batch-norm statistics re-estimated before export (synthvox.train.batchnorm)."""

from __future__ import annotations

import torch

from synthvox.models import build_model
from synthvox.models.blocks import has_batchnorm
from synthvox.train.batchnorm import recalibrate, synthetic_views
from synthvox.train.config import resolve_config, to_dict


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(2, 1, 32, 32, 32, generator=g) * (1 + i) for i in range(n)]  # 32: no internal padding


def test_running_statistics_become_the_average_over_the_batches():
    net = build_model("tiny", norm="batch").eval()
    batches = _batches(3)
    assert recalibrate(net, batches) == 3
    conv, bn = net.stem[0], net.stem[1]
    with torch.no_grad():
        outs = [conv(x) for x in batches]
    mean = torch.stack([o.mean(dim=(0, 2, 3, 4)) for o in outs]).mean(0)
    var = torch.stack([o.var(dim=(0, 2, 3, 4), unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=1e-5)
    assert not net.training and bn.momentum == 0.1 and int(bn.num_batches_tracked) == 3


def test_no_batches_change_nothing_and_other_norms_are_left_alone():
    net = build_model("tiny", norm="batch")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert recalibrate(net, []) == 0
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    inst = build_model("tiny")
    assert not has_batchnorm(inst) and recalibrate(inst, _batches(1)) == 0


def test_eval_features_no_longer_depend_on_the_training_batches_last_seen():
    """Two networks with the same weights whose running statistics came from different recent batches
    give different features; re-estimated on the same synthetic batches, identical ones."""
    a = build_model("tiny", norm="batch")
    b = build_model("tiny", norm="batch")
    with torch.no_grad():
        a.train()(_batches(1, seed=1)[0] * 3)
        b.train()(_batches(1, seed=2)[0])
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(a.eval()(x), b.eval()(x))
    cfg = to_dict(resolve_config("tiny", ["model.norm=batch", "data.size=[16,16,16]"]))
    recalibrate(a, synthetic_views(cfg, 2))
    recalibrate(b, synthetic_views(cfg, 2))
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x))
