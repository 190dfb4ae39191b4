"""The displacement-field arithmetic of registration.warp against float64 world-point references:
oblique and flipped grids, a rotated working grid, a rotation with a shift."""

from __future__ import annotations

import numpy as np
import torch
from conftest import make_affine

from synthvox.metrics import jacobian_determinant
from synthvox.registration.warp import (
    apply_displacement,
    compose_displacement,
    inverse_displacement,
    then_affine,
)
from synthvox.volume import Volume, affine_points, sample_at, voxel_grid


def _world(shape, affine) -> torch.Tensor:
    a = torch.as_tensor(np.asarray(affine, np.float64))
    return voxel_grid(shape).double() @ a[:3, :3].T + a[:3, 3]


def _apply(points: torch.Tensor, m: np.ndarray) -> torch.Tensor:
    a = torch.as_tensor(np.asarray(m, np.float64))
    return points @ a[:3, :3].T + a[:3, 3]


FIXED = make_affine(spacing=(1.5, 2.0, 1.2), angles=(0.3, -0.1, 0.2), origin=(-6.0, -8.0, -4.0), flips=(1, -1, 1))
WORKING = make_affine(spacing=(3.0, 3.0, 3.0), angles=(-0.2, 0.1, 0.0), origin=(-9.0, -14.0, -8.0))
WORLD = make_affine(spacing=(1.0, 1.0, 1.0), angles=(0.1, 0.05, -0.08), origin=(2.0, -3.0, 4.0))
SHAPE = (9, 8, 7)


def _field() -> torch.Tensor:
    """A smooth displacement (working voxels) on a 6 x 5 x 5 working grid."""
    torch.manual_seed(0)
    coarse = torch.randn(1, 3, 2, 2, 2) * 0.4
    return torch.nn.functional.interpolate(coarse, size=(6, 5, 5), mode="trilinear", align_corners=True)[0]


def test_affine_points_are_the_matrix_on_the_voxel_indices():
    ref = _world((7, 5, 6), FIXED)
    assert torch.allclose(affine_points((7, 5, 6), FIXED, dtype=torch.float64), ref, atol=1e-12)
    assert affine_points((7, 5, 6), FIXED).dtype == torch.float32
    assert torch.allclose(affine_points((7, 5, 6), FIXED).double(), ref, atol=1e-4)


def test_composition_matches_world_points():
    """float32 from the voxel indices == T(x + W u(W^-1 x)) - x on float64 world points."""
    u = _field()
    x = _world(SHAPE, FIXED)
    uu = sample_at(u, _apply(x, np.linalg.inv(WORKING)).float(), mode="linear", padding="border")
    y = _apply(x + uu.permute(1, 2, 3, 0).double() @ torch.as_tensor(WORKING[:3, :3]).T, WORLD)
    d = compose_displacement(SHAPE, FIXED, WORLD, u, WORKING)
    assert d.dtype == torch.float32 and d.shape == (3, *SHAPE)
    assert torch.allclose(d.double(), (y - x).permute(3, 0, 1, 2), atol=1e-4)
    # without a field: the affine alone
    assert torch.allclose(compose_displacement(SHAPE, FIXED, WORLD).double(),
                          (_apply(x, WORLD) - x).permute(3, 0, 1, 2), atol=1e-4)
    # the deformable part alone, then the affine: the same map
    deform = compose_displacement(SHAPE, FIXED, np.eye(4), u, WORKING)
    assert torch.allclose(then_affine(deform, SHAPE, FIXED, WORLD), d, atol=1e-4)
    # the moved image samples MOVING where the map lands
    moving = Volume(torch.randn(1, 10, 11, 12), make_affine(spacing=(2.0, 1.5, 2.0), origin=(-12.0, -9.0, -10.0)))
    expect = sample_at(moving.data, _apply(y, np.linalg.inv(moving.affine)).float(), mode="linear", padding="zeros")
    assert torch.allclose(apply_displacement(moving, d, FIXED).data, expect, atol=1e-4)


def test_inverse_undoes_the_composition():
    """Moving points mapped back through the inverse land where the forward map sends them."""
    u = _field()
    shift = np.eye(4)
    shift[:3, 3] = (0.3, -0.2, 0.4)
    mshape, maff = SHAPE, WORLD @ FIXED @ shift  # MOVING's grid: about FIXED's, carried through the affine
    e = inverse_displacement(mshape, maff, WORLD, u, WORKING)
    y = _world(mshape, maff)
    x = y + e.permute(1, 2, 3, 0).double()  # fixed world points
    fwd = compose_displacement(SHAPE, FIXED, WORLD, u, WORKING)
    # the forward displacement at those points (interpolated from FIXED's grid), inside FIXED only
    vox = _apply(x, np.linalg.inv(FIXED))
    inside = ((vox > 0.5) & (vox < torch.tensor(SHAPE) - 1.5)).all(-1)
    assert int(inside.sum()) > 20
    d = sample_at(fwd, vox.float(), mode="linear", padding="border").permute(1, 2, 3, 0).double()
    assert float((x + d - y)[inside].norm(dim=-1).max()) < 0.15


def test_jacobian_of_an_oblique_field_matches_the_matrix_determinant():
    torch.manual_seed(1)
    d = torch.randn(3, 6, 7, 8) * 0.4
    grads = torch.stack([torch.stack(torch.gradient(d[i].double(), dim=(0, 1, 2)), dim=-1) for i in range(3)], dim=-2)
    lin = torch.as_tensor(FIXED[:3, :3])
    ref = torch.linalg.det(torch.eye(3, dtype=torch.float64) + grads @ torch.linalg.inv(lin))
    assert torch.allclose(jacobian_determinant(d, affine=FIXED), ref, atol=1e-12)
    assert torch.allclose(jacobian_determinant(d), torch.linalg.det(torch.eye(3, dtype=torch.float64) + grads), atol=1e-12)
