"""``dice_per_label`` from one joint histogram gives exactly what one mask per structure gives."""

from __future__ import annotations

import math

import torch

import synthvox.metrics as metrics
from synthvox.metrics import dice_per_label


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def test_the_joint_histogram_equals_one_mask_per_structure(monkeypatch):
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 60, (1, 20, 18, 16), generator=g) * 7  # ids 0..413, sparse
    ref = torch.where(torch.rand(pred.shape, generator=g) < 0.7, pred, torch.randint(0, 60, pred.shape, generator=g) * 7)
    ref[0, :3] = 3_000_000_000  # an id above 2^31 in one map only
    cases = [None, [7, 14, 9999, 7], {"left+right": [7, 14, 14], "none": [123456], "big": [3_000_000_000, 0]}]
    fast = [dice_per_label(pred, ref, c) for c in cases]
    monkeypatch.setattr(metrics, "MAX_JOINT_IDS", 0)  # the fallback: one mask per structure
    slow = [dice_per_label(pred, ref, c) for c in cases]
    for f, s in zip(fast, slow):
        assert _same(f, s), (f, s)
    assert math.isnan(fast[2]["none"]) and 0 < fast[2]["left+right"] < 1 and fast[1]["9999"] != fast[1]["9999"]
