"""Registration in the chain researchers run (issue 25): an initial transform file (ITK/ANTs, fixed
points to moving points), ``transform`` rigid / affine / deformable, and the Jacobian map.

Each test can fail: reading the file's map the other way (``inv``), or in LPS as if it were RAS, moves
the image elsewhere (checked against SimpleITK's resampling of the same file, which is ITK's, as
antsApplyTransforms'); an affine fit where a rigid one is asked changes landmark distances by about
10% (checked); a Jacobian written in float64 and folded with another rule than ``<= 0`` differs.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import make_affine, require_module, rotation
from test_registration import CFG, phantom

from synthvox import io
from synthvox.errors import InputError
from synthvox.metrics import folding_percent, jacobian_determinant
from synthvox.registration import RegistrationConfig, register
from synthvox.registration.outputs import itk_affine_text
from synthvox.registration.stages import stages, use_start
from synthvox.volume import Volume, ras_to_itk_matrix, resample_to_grid

N = 32


def _known_pair(scale: float = 1.0) -> tuple[Volume, Volume, np.ndarray]:
    """FIXED (oblique, anisotropic), MOVING = FIXED carried by a known fixed-to-moving world map ``T``
    (a 35 degree rotation about FIXED's centre, a translation and a scaling), on MOVING's own grid."""
    fixed = Volume(phantom(N), make_affine(spacing=(1.0, 1.1, 1.2), angles=(0.2, -0.1, 0.3), origin=(-15.0, -18.0, -20.0)))
    centre = fixed.affine[:3, :3] @ np.full(3, (N - 1) / 2) + fixed.affine[:3, 3]
    t = np.eye(4)
    t[:3, :3] = rotation(0.0, 0.2, np.radians(35.0)) * scale
    t[:3, 3] = centre - t[:3, :3] @ centre + np.array([4.0, -3.0, 2.5])
    mov_aff = make_affine(spacing=(1.1, 1.0, 1.3), angles=(-0.2, 0.1, 0.4), origin=(0.0, 0.0, 0.0), flips=(1, -1, 1))
    mshape = (34, 36, 30)
    mov_aff[:3, 3] = t[:3, :3] @ centre + t[:3, 3] - mov_aff[:3, :3] @ ((np.asarray(mshape) - 1) / 2)
    # the image carried by T: MOVING(T x) = FIXED(x)
    moving = resample_to_grid(Volume(fixed.data, t @ fixed.affine), mshape, mov_aff)
    return fixed, moving, t


def _corr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float(np.corrcoef(a[mask].numpy(), b[mask].numpy())[0, 1])


def _itk_affine(t_ras: np.ndarray, sitk, centre_lps=(7.0, -3.0, 11.0)):
    """``t_ras`` as a SimpleITK AffineTransform in LPS about a non-zero centre (as ANTs writes them)."""
    m = ras_to_itk_matrix(t_ras)
    tx = sitk.AffineTransform(3)
    tx.SetCenter(centre_lps)
    tx.SetMatrix(m[:3, :3].reshape(-1).tolist())
    c = np.asarray(centre_lps)
    tx.SetTranslation((m[:3, :3] @ c + m[:3, 3] - c).tolist())  # A (p - c) + c + t = A p + offset
    return tx


def _sitk_image(vol: Volume, sitk):
    """A SimpleITK image of ``vol`` (LPS geometry from its RAS affine)."""
    flip = np.diag([-1.0, -1.0, 1.0])
    lin = flip @ vol.affine[:3, :3]
    sp = np.linalg.norm(lin, axis=0)
    img = sitk.GetImageFromArray(vol.data[0].numpy().transpose(2, 1, 0).astype(np.float64))
    img.SetSpacing(sp.tolist())
    img.SetDirection((lin / sp).reshape(-1).tolist())
    img.SetOrigin((flip @ vol.affine[:3, 3]).tolist())
    return img


def test_load_transform_reads_itk_text_mat_and_synthvox_affine_txt(tmp_path, sitk):
    _, _, t = _known_pair()
    (tmp_path / "affine.txt").write_text(itk_affine_text(t))  # what synthvox register writes
    assert np.allclose(io.load_transform(tmp_path / "affine.txt"), t, atol=1e-9)
    tx = _itk_affine(t, sitk)
    for name in ("t.tfm", "t.mat", "t2.txt"):  # .mat: MATLAB v4, as ANTs writes affines
        sitk.WriteTransform(tx, str(tmp_path / name))
        got = io.load_transform(tmp_path / name)
        assert np.allclose(got, t, atol=1e-6), name
        # the same point map as ITK's, once LPS is turned into RAS
        p_ras = np.array([12.0, -7.0, 30.0])
        q_lps = np.asarray(tx.TransformPoint((-p_ras[0], -p_ras[1], p_ras[2])))
        assert np.allclose(got[:3, :3] @ p_ras + got[:3, 3], q_lps * [-1, -1, 1], atol=1e-6)
    # rigid ITK transforms (Euler, centre and all) read as the same kind of matrix
    e = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, -0.2, 0.3, (5.0, 0.0, -4.0))
    sitk.WriteTransform(e, str(tmp_path / "euler.tfm"))
    got = io.load_transform(tmp_path / "euler.tfm")
    assert np.allclose(got[:3, :3].T @ got[:3, :3], np.eye(3), atol=1e-9)


def test_unreadable_or_unsupported_transform_files_get_one_line(tmp_path):
    bad = tmp_path / "garbage.txt"
    bad.write_text("not a transform\n")
    for path, words in ((bad, "cannot read"), (tmp_path / "x.nii.gz", "not found"), (tmp_path / "x.xfm", "must be")):
        if words == "must be":
            path.write_text("x")
        with pytest.raises(InputError) as e:
            io.load_transform(path)
        assert words in str(e.value) and "\n" not in str(e.value)
    assert ".mat" in str(pytest.raises(InputError, io.load_transform, tmp_path / "x.xfm").value)


def test_initial_transform_is_the_start_and_moves_the_image_as_itk_does(tmp_path, sitk):
    """The file's map (fixed points to moving points) is the start, exactly; the moved image is what
    ITK's resampler (antsApplyTransforms' own) makes of MOVING with that file."""
    fixed, moving, t = _known_pair()
    sitk.WriteTransform(_itk_affine(t, sitk), str(tmp_path / "start.mat"))
    start = io.load_transform(tmp_path / "start.mat")
    res = register(fixed, moving, features="mind", config=replace(CFG, transform="affine"), affine=False,
                   initial_transform=start)
    assert np.allclose(res.world_affine, t, atol=1e-5)
    assert res.report["initial_choice"] == "given" and res.report["init"] == "given"
    assert res.report["transform"] == "affine" and "adam" not in res.report["seconds"]
    assert float(res.deformable_warp.data.abs().max()) == 0.0
    itk = sitk.Resample(_sitk_image(moving, sitk), _sitk_image(fixed, sitk), sitk.ReadTransform(str(tmp_path / "start.mat")),
                        sitk.sitkLinear, 0.0)
    theirs = torch.from_numpy(sitk.GetArrayFromImage(itk).transpose(2, 1, 0).astype(np.float32))
    inside = theirs > 0.05
    assert inside.float().mean() > 0.2
    assert float((res.moved.data[0] - theirs)[inside].abs().max()) < 1e-3
    # and it is FIXED again (the known map recovered)
    assert _corr(res.moved.data[0], fixed.data[0], inside) > 0.9
    # the other direction (the inverse, as a moving-to-fixed reading would take it) does not
    wrong = register(fixed, moving, features="mind", config=replace(CFG, transform="affine"), affine=False,
                     initial_transform=np.linalg.inv(t))
    assert _corr(wrong.moved.data[0], fixed.data[0], inside) < 0.8


def test_initial_transform_then_affine_keeps_the_known_map():
    """With the affine stage after a start that is already right, the known map stays within about a
    voxel (the fit on 32^3 MIND features of a resampled copy finds its optimum slightly off the truth:
    0.6 mm on average, 1.7 mm at worst, on 2026-12 code)."""
    fixed, moving, t = _known_pair()
    res = register(fixed, moving, features="mind", config=replace(CFG, transform="affine"), initial_transform=t)
    pts = torch.as_tensor(fixed.affine[:3, :3] @ (np.random.default_rng(0).uniform(4, N - 4, (3, 50))) + fixed.affine[:3, 3:4])
    err = np.linalg.norm((res.world_affine - t)[:3, :3] @ pts.numpy() + (res.world_affine - t)[:3, 3:4], axis=0)
    assert err.mean() < 1.0 and err.max() < 2.5, (err.mean(), err.max())


def test_stage_plan_for_each_transform_kind():
    names = lambda plan: [s.name for s in plan]  # noqa: E731
    assert names(stages(True, True)) == ["init", "features", "affine", "convex", "adam", "check", "compose"]
    assert names(stages(True, False)) == ["init", "features", "affine", "check", "compose"]
    plan = stages(True, False, start=use_start(np.eye(4)))
    assert plan[0].steps[1].func.__name__ == "given_start"
    with pytest.raises(InputError, match="rigid, affine, deformable"):
        RegistrationConfig(transform="similarity")
    with pytest.raises(InputError, match="4x4"):
        register(*_known_pair()[:2], config=CFG, initial_transform=np.eye(3))


def _mapped(res, pts_ras: np.ndarray) -> np.ndarray:
    """Points of FIXED's world carried by the result's whole map (its RAS displacement, sampled)."""
    from synthvox.volume import sample_at

    vox = np.linalg.inv(res.fixed.affine) @ np.vstack([pts_ras.T, np.ones(len(pts_ras))])
    d = sample_at(res.displacement.double(), torch.as_tensor(vox[:3].T, dtype=torch.float64).reshape(-1, 1, 1, 3))
    return pts_ras + d.reshape(3, -1).T.numpy()


def test_rigid_keeps_distances_affine_does_not():
    """MOVING is FIXED rotated and scaled by 1.1: a rigid registration keeps every distance between
    landmarks within 0.1 mm (1.4 mm off when the initial search's short fit was affine, before it
    followed ``transform``); an affine one finds part of the scaling (distances 2-4% longer)."""
    fixed, moving, _ = _known_pair(scale=1.1)
    rng = np.random.default_rng(1)
    vox = rng.uniform(6, N - 6, (12, 3))
    pts = vox @ fixed.affine[:3, :3].T + fixed.affine[:3, 3]
    d0 = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    iu = np.triu_indices(len(pts), 1)
    out = {}
    for kind in ("rigid", "affine"):
        res = register(fixed, moving, features="mind", config=replace(CFG, transform=kind), init="moments")
        q = _mapped(res, pts)
        out[kind] = (np.linalg.norm(q[:, None] - q[None], axis=-1) - d0)[iu]
        assert "convex" not in res.report["seconds"]
    assert np.abs(out["rigid"]).max() < 0.1, np.abs(out["rigid"]).max()
    assert np.abs(out["affine"]).max() > 0.5 and np.median(out["affine"] / d0[iu]) > 0.02, out["affine"]


def test_jacobian_non_positive_share_is_the_reports_folding(tmp_path):
    """A folding deformable result (no regularisation: about 24% of voxels fold): the written map's
    share of values <= 0 is the report's folding %. The determinant along the array axes instead of
    the oblique grid's world axes gives 27% (checked when written)."""
    from test_registration import warped_pair

    fixed_affine = make_affine(spacing=(1.0, 1.1, 1.2), angles=(0.2, -0.1, 0.3), origin=(-15.0, -18.0, -20.0))
    img = phantom(N)
    fixed, moving = Volume(img, fixed_affine), Volume(warped_pair(img, amp=4.0)[0], fixed_affine)
    cfg = replace(CFG, fold_weight=0.0, lam=0.0, adam_lr=2.0, adam_iters=40, adam_tol=0.0, convex_grid_mm=4.0)
    res = register(fixed, moving, features="mind", config=cfg, init="none", jacobian=True)
    assert res.report["fallback"] is None and res.report["folding_percent"] > 1.0
    written = res.save(tmp_path / "out")
    assert tmp_path / "out" / "jacobian.nii.gz" in written
    jac = io.load(tmp_path / "out" / "jacobian.nii.gz")
    assert jac.shape == fixed.shape and np.allclose(jac.affine, fixed.affine)
    share = 100.0 * float((jac.data <= 0).double().mean())
    assert share == res.report["folding_percent"], (share, res.report["folding_percent"])
    det = jacobian_determinant(res.displacement, affine=fixed.affine)
    assert torch.allclose(jac.data[0].double(), det, rtol=1e-6, atol=1e-6)
    assert folding_percent(res.displacement, affine=fixed.affine) == share
    # no Jacobian unless asked; the command writes it with --jacobian
    assert register(fixed, moving, features="mind", config=replace(CFG, transform="rigid")).jacobian is None
    import json

    from typer.testing import CliRunner

    from synthvox.cli import app

    io.save(fixed, tmp_path / "f.nii.gz")
    io.save(moving, tmp_path / "m.nii.gz")
    r = CliRunner().invoke(app, ["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "--out",
                                 str(tmp_path / "cli"), "--transform", "affine", "--jacobian", "--spacing", "1"])
    assert r.exit_code == 0, r.output
    jac = io.load(tmp_path / "cli" / "jacobian.nii.gz").data
    assert 100.0 * float((jac <= 0).double().mean()) == json.loads((tmp_path / "cli" / "report.json").read_text())["folding_percent"]


@pytest.mark.ants
def test_ants_written_affine_moves_the_image_as_ants_apply_transforms(tmp_path):
    """An affine that ANTs writes (.mat and ITK text), given with ``--transform affine``, moves MOVING as
    antsApplyTransforms does: exactly as the start alone (``--no-affine``: at most 2e-3 apart on
    intensities up to 0.8), within about a voxel after the affine stage (needs antspyx, the bench
    extra: ``python -m pytest -m ants``)."""
    ants = require_module("ants")
    from typer.testing import CliRunner

    from synthvox.cli import app

    fixed, moving, t = _known_pair()
    io.save(fixed, tmp_path / "fixed.nii.gz")
    io.save(moving, tmp_path / "moving.nii.gz")
    m = ras_to_itk_matrix(t)
    centre = np.array([3.0, -5.0, 8.0])
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3, matrix=m[:3, :3],
                                    translation=m[:3, :3] @ centre + m[:3, 3] - centre, center=centre)
    f_ants, m_ants = ants.image_read(str(tmp_path / "fixed.nii.gz")), ants.image_read(str(tmp_path / "moving.nii.gz"))
    for name in ("ants.mat", "ants.txt"):
        ants.write_transform(tx, str(tmp_path / name))
        theirs = ants.apply_transforms(f_ants, m_ants, [str(tmp_path / name)], interpolator="linear").numpy()
        theirs = torch.from_numpy(theirs.astype(np.float32))
        inside = theirs > 0.05
        for extra in (["--no-affine"], []):
            out = tmp_path / f"{name}{len(extra)}"
            r = CliRunner().invoke(app, ["register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"),
                                         "--out", str(out), "--initial-transform", str(tmp_path / name),
                                         "--transform", "affine", "--features", "mind", "--spacing", "1", *extra])
            assert r.exit_code == 0, r.output
            ours = io.load(out / "moved.nii.gz").data[0]
            diff = (ours - theirs)[inside].abs()
            if extra:  # the start alone: antsApplyTransforms' image, to float32 precision of the file
                assert float(diff.max()) < 2e-3, float(diff.max())
            else:  # the affine stage after it: the same map within about a voxel (see above)
                import json

                w = np.asarray(json.loads((out / "report.json").read_text())["world_affine"])
                pts = fixed.affine[:3, :3] @ np.random.default_rng(0).uniform(4, N - 4, (3, 50)) + fixed.affine[:3, 3:4]
                assert np.linalg.norm((w - t)[:3, :3] @ pts + (w - t)[:3, 3:4], axis=0).mean() < 1.0
                assert _corr(ours, theirs, inside) > 0.95
