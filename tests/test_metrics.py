"""Dice, HD95 and Jacobian folding on constructed inputs."""

from __future__ import annotations

import math

import numpy as np
import torch

from synthvox.metrics import dice_per_label, folding_percent, hd95_per_label, jacobian_determinant


def test_dice_values_groups_and_missing():
    a = torch.zeros(10, 10, 10, dtype=torch.long)
    b = torch.zeros_like(a)
    a[:5] = 1
    b[:4] = 1
    a[6:8] = 2
    b[6:8] = 3
    d = dice_per_label(a, b)
    assert abs(d["1"] - 2 * 40 / 90) < 1e-9
    assert d["2"] == 0.0 and d["3"] == 0.0
    g = dice_per_label(a, b, {"both": [2, 3], "none": [9]})
    assert g["both"] == 1.0
    assert math.isnan(g["none"])


def test_hd95_uses_spacing():
    a = torch.zeros(20, 20, 20, dtype=torch.long)
    b = torch.zeros_like(a)
    a[5:10, 5:10, 5:10] = 1
    b[7:12, 5:10, 5:10] = 1  # shifted by 2 voxels along x
    h1 = hd95_per_label(a, b, spacing=(1.0, 1.0, 1.0))["1"]
    h3 = hd95_per_label(a, b, spacing=(3.0, 1.0, 1.0))["1"]
    assert abs(h1 - 2.0) < 1e-6
    assert abs(h3 - 6.0) < 1e-6


def test_jacobian_of_linear_maps():
    x, y, z = torch.meshgrid(*(torch.arange(12.0),) * 3, indexing="ij")
    # d = 0.5 * x along x: det = 1.5 at 1 mm; with 2 mm spacing along x, d/dx_world = 0.25 -> det 1.25
    disp = torch.stack([0.5 * x, torch.zeros_like(x), torch.zeros_like(x)])
    assert torch.allclose(jacobian_determinant(disp), torch.full((12, 12, 12), 1.5, dtype=torch.float64))
    aff = np.diag([2.0, 1.0, 1.0, 1.0])
    assert torch.allclose(jacobian_determinant(disp, affine=aff), torch.full((12, 12, 12), 1.25, dtype=torch.float64))
    assert folding_percent(disp) == 0.0
    # a folding map: d = -2 x  -> det = -1 everywhere
    fold = torch.stack([-2 * x, torch.zeros_like(x), torch.zeros_like(x)])
    assert folding_percent(fold) == 100.0
    # a flipped (oblique) grid: the world-axis displacement of an identity map stays identity
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    world_shift = torch.stack([-0.5 * x, torch.zeros_like(x), torch.zeros_like(x)])  # d_x(world) = 0.5 * x_world
    assert torch.allclose(jacobian_determinant(world_shift, affine=flip), torch.full((12, 12, 12), 1.5, dtype=torch.float64))
