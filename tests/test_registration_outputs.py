"""What ``RegistrationResult.save`` writes (the files of ``synthvox register`` and ``synthvox demo``) reads
back in SimpleITK: affine.txt composed with deformable_warp.nii.gz, warp.nii.gz and inverse_warp.nii.gz."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_warp_itk import _pair

from synthvox import io
from synthvox.registration import RegistrationConfig, register
from synthvox.registration.outputs import itk_affine_text, output_names
from synthvox.volume import Volume

CFG = RegistrationConfig(spacing=1.5, adam_iters=40)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory):
    fixed, moving = _pair()
    d = tmp_path_factory.mktemp("reg")
    io.save(fixed, d / "fixed.nii.gz")
    io.save(moving, d / "moving.nii.gz")
    labels = io.save(Volume((moving.data > 0.5).long() * 9, moving.affine), d / "mlab.nii.gz", labels=True)
    res = register(fixed, moving, features="mind", config=CFG, moving_labels=io.load_labels(labels),
                   label_names={9: "bright"})
    out = d / "out"
    written = res.save(out)
    return d, out, res, written


def _read(sitk, path):  # noqa: ANN001, ANN202
    return sitk.ReadImage(str(path))


def _interior(ours: np.ndarray) -> np.ndarray:
    return ours > 0.05


def test_save_writes_every_output(saved):
    _, out, res, written = saved
    assert [p.name for p in written] == output_names(True)
    for p in written:
        assert p.is_file(), p.name
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging leftovers
    rep = json.loads((out / "report.json").read_text())
    import synthvox

    assert rep["synthvox_version"] == synthvox.__version__
    assert rep["weights"] is None  # MIND: no network
    assert rep["label_names"] == {"9": "bright"}
    with pytest.raises(Exception, match="--force"):
        res.save(out)
    res.save(out, force=True)


def test_affine_txt_composed_with_the_deformable_warp_reproduces_moved(saved, sitk):
    d, out, res, _ = saved
    f, m = _read(sitk, d / "fixed.nii.gz"), _read(sitk, d / "moving.nii.gz")
    affine = sitk.ReadTransform(str(out / "affine.txt"))
    deform = sitk.DisplacementFieldTransform(sitk.Cast(_read(sitk, out / "deformable_warp.nii.gz"), sitk.sitkVectorFloat64))
    both = sitk.CompositeTransform(3)
    both.AddTransform(affine)
    both.AddTransform(deform)  # the last added is applied first: the deformable stage, then the affine
    theirs = sitk.GetArrayFromImage(sitk.Resample(m, f, both, sitk.sitkLinear, 0.0))
    ours = sitk.GetArrayFromImage(_read(sitk, out / "moved.nii.gz"))
    inside = _interior(ours)
    assert inside.mean() > 0.2
    mad = np.abs(ours[inside] - theirs[inside]).mean()
    assert mad < 0.01 * ours[inside].mean() + 1e-3, mad
    # the deformable part matters (so the test can fail): the affine alone does not reproduce moved
    alone = sitk.GetArrayFromImage(sitk.Resample(m, f, affine, sitk.sitkLinear, 0.0))
    assert np.abs(ours[inside] - alone[inside]).mean() > 3 * mad
    # and the whole warp does, on its own
    whole = sitk.DisplacementFieldTransform(sitk.Cast(_read(sitk, out / "warp.nii.gz"), sitk.sitkVectorFloat64))
    w = sitk.GetArrayFromImage(sitk.Resample(m, f, whole, sitk.sitkLinear, 0.0))
    assert np.abs(ours[inside] - w[inside]).mean() < 0.01 * ours[inside].mean() + 1e-3


def test_itk_affine_text_is_the_lps_form_of_the_world_affine(sitk):
    w = np.eye(4)
    w[:3, :3] = [[0.98, -0.17, 0.02], [0.17, 0.98, 0.05], [-0.03, -0.04, 1.02]]
    w[:3, 3] = (4.0, -7.0, 2.5)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as td:
        p = Path(td) / "a.txt"
        p.write_text(itk_affine_text(w))
        t = sitk.ReadTransform(str(p))
    ras = np.array([10.0, -20.0, 30.0])
    lps = ras * [-1, -1, 1]
    moved_lps = np.array(t.TransformPoint(tuple(lps)))
    assert np.allclose(moved_lps * [-1, -1, 1], w[:3, :3] @ ras + w[:3, 3], atol=1e-9)


def test_inverse_warp_undoes_the_warp(saved, sitk):
    d, out, res, _ = saved
    fwd = sitk.DisplacementFieldTransform(sitk.Cast(_read(sitk, out / "warp.nii.gz"), sitk.sitkVectorFloat64))
    inv_img = _read(sitk, out / "inverse_warp.nii.gz")
    inv = sitk.DisplacementFieldTransform(sitk.Cast(inv_img, sitk.sitkVectorFloat64))
    m = _read(sitk, d / "moving.nii.gz")
    assert inv_img.GetSize() == m.GetSize() and np.allclose(inv_img.GetOrigin(), m.GetOrigin(), atol=1e-4)
    # moving points inside the part of MOVING that FIXED covers: inverse then forward is the identity
    arr = sitk.GetArrayFromImage(m)
    idx = np.argwhere(arr > 0.3)[::37]
    errs, moved_by = [], []
    for k, j, i in idx:
        y = np.array(m.TransformIndexToPhysicalPoint((int(i), int(j), int(k))))
        x = np.array(inv.TransformPoint(tuple(y)))
        errs.append(np.linalg.norm(np.array(fwd.TransformPoint(tuple(x))) - y))
        moved_by.append(np.linalg.norm(x - y))
    assert np.median(moved_by) > 1.0  # the map is far from the identity
    assert np.median(errs) < 0.1 and np.percentile(errs, 90) < 0.3, (np.median(errs), np.percentile(errs, 90))
    # fixed resampled onto MOVING's grid through the inverse looks like MOVING
    f = _read(sitk, d / "fixed.nii.gz")
    back = sitk.GetArrayFromImage(sitk.Resample(f, m, inv, sitk.sitkLinear, 0.0))
    inside = (arr > 0.05) & (back > 0.05)
    assert np.corrcoef(arr[inside], back[inside])[0, 1] > 0.9
    assert torch.isfinite(res.inverse_warp.data).all()
