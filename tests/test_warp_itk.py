"""warp.nii.gz follows the ITK/ANTs convention: SimpleITK reproduces moved.nii.gz from it."""

from __future__ import annotations

import numpy as np
import torch
from conftest import make_affine
from test_registration import CFG, phantom, smooth_field

from synthvox import io
from synthvox.registration import register
from synthvox.registration.warp import apply_warp, compose_displacement, itk_to_ras, ras_to_itk
from synthvox.volume import Volume, resample_to_grid


def _pair() -> tuple[Volume, Volume]:
    img = phantom(36)
    fixed = Volume(img, make_affine(spacing=(1.0, 1.1, 1.2), angles=(0.2, -0.1, 0.3), origin=(-18.0, -20.0, -21.0)))
    mov_aff = make_affine(spacing=(1.2, 1.0, 1.4), angles=(-0.3, 0.2, 0.6), origin=(-30.0, -10.0, -15.0), flips=(1, -1, 1))
    centre = fixed.affine[:3, :3] @ np.full(3, 17.5) + fixed.affine[:3, 3]
    mshape = (36, 40, 30)
    mov_aff[:3, 3] = centre - mov_aff[:3, :3] @ ((np.asarray(mshape) - 1) / 2)
    moving = resample_to_grid(fixed, mshape, mov_aff)
    # a smooth deformation on top, so the warp is not affine
    from synthvox.volume import sample_at, voxel_grid

    g = smooth_field(mshape, 1.5)
    moving = Volume(sample_at(moving.data, voxel_grid(mshape) + g.permute(1, 2, 3, 0), padding="border"), mov_aff)
    return fixed, moving


def test_lps_ras_conversion_is_an_involution():
    d = torch.randn(3, 4, 5, 6)
    assert torch.equal(itk_to_ras(ras_to_itk(d)), d)
    assert torch.equal(ras_to_itk(d)[2], d[2]) and torch.equal(ras_to_itk(d)[0], -d[0])


def test_simpleitk_reproduces_moved(tmp_path, sitk):  # the fixture: SimpleITK, required in CI
    fixed, moving = _pair()
    res = register(fixed, moving, features="mind", config=CFG, init="moments")
    io.save(fixed, tmp_path / "fixed.nii.gz")
    io.save(moving, tmp_path / "moving.nii.gz")
    io.save(res.moved, tmp_path / "moved.nii.gz")
    io.save(res.warp, tmp_path / "warp.nii.gz", vector=True)

    f = sitk.ReadImage(str(tmp_path / "fixed.nii.gz"))
    m = sitk.ReadImage(str(tmp_path / "moving.nii.gz"))
    w = sitk.ReadImage(str(tmp_path / "warp.nii.gz"))
    assert w.GetNumberOfComponentsPerPixel() == 3
    tx = sitk.DisplacementFieldTransform(sitk.Cast(w, sitk.sitkVectorFloat64))
    out = sitk.Resample(m, f, tx, sitk.sitkLinear, 0.0)
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "moved.nii.gz")))
    theirs = sitk.GetArrayFromImage(out)
    inside = ours > 0.05
    assert inside.mean() > 0.2
    corr = np.corrcoef(ours[inside], theirs[inside])[0, 1]
    mad = np.abs(ours[inside] - theirs[inside]).mean()
    assert corr > 0.99, corr
    assert mad < 0.02 * ours[inside].mean() + 1e-3, mad
    # and the sign convention matters: the field read as if it were RAS does not reproduce it
    flipped = sitk.GetImageFromArray(-sitk.GetArrayFromImage(w)[..., :] * np.array([1, 1, -1]), isVector=True)
    flipped.CopyInformation(w)
    bad = sitk.GetArrayFromImage(sitk.Resample(m, f, sitk.DisplacementFieldTransform(sitk.Cast(flipped, sitk.sitkVectorFloat64)), sitk.sitkLinear, 0.0))
    assert np.abs(ours[inside] - bad[inside]).mean() > 3 * mad


def test_apply_warp_matches_moved_and_keeps_label_ids():
    fixed, moving = _pair()
    res = register(fixed, moving, features="mind", config=CFG, init="none")
    again = apply_warp(moving, res.warp)
    assert torch.allclose(again.data, res.moved.data, atol=1e-4)
    labels = Volume(((moving.data > 0.3).long() * 5 + (moving.data > 0.65).long() * 95), moving.affine)  # 0, 5, 100
    moved = apply_warp(labels, res.warp, labels=True)
    assert set(torch.unique(moved.data).tolist()) <= {0, 5, 100}
    assert moved.data.dtype == torch.int64
    # onto a coarser reference grid: the field is interpolated onto it
    ref = resample_to_grid(fixed, (18, 18, 18), fixed.affine @ np.diag([2.0, 2.0, 2.0, 1.0]))
    coarse = apply_warp(moving, res.warp, reference=ref)
    assert coarse.shape == (18, 18, 18)
    down = resample_to_grid(res.moved, (18, 18, 18), ref.affine).data
    inside = down > 0.05
    assert float((coarse.data - down).abs()[inside].mean()) < 0.05


def test_affine_only_composition_is_exact():
    aff = make_affine()
    world = np.eye(4)
    world[:3, 3] = (3.0, -2.0, 1.0)
    d = compose_displacement((5, 6, 7), aff, world)
    assert torch.allclose(d, torch.tensor([3.0, -2.0, 1.0]).view(3, 1, 1, 1).expand(3, 5, 6, 7), atol=1e-5)
