"""Outputs in the format their name asks for (issue 25, item 5): ``apply -o moved.mgz``, ``segment --out
seg.nrrd``, ``features --out feats.mha``; MGZ/MGH through nibabel, NRRD and MetaImage through SimpleITK;
anything else refused in one line that names the formats, before any work.

Shown to fail on broken writers (by editing ``synthvox.writers`` by hand, then restoring it): with the
LPS flip left out of ``itk_geometry``, every NRRD/MHA case of the round trip and the apply test fail
(the check-back refuses the file: its header reads back 40 mm off; with the check-back removed too, the
affine against ITK's own reading is 40 mm off); with the direction matrix written transposed, the oblique
cases fail the same way; with ``SimpleITK``'s ``Z, Y, X`` axes not reversed, the data and the shape; with
the data file of a ``.nhdr``/``.mhd`` moved after its header, or left out of ``check_output``,
``test_detached_headers_keep_their_data_file`` fails; with ``check_savable`` left out of segment's
single-image path, the MGZ refusal leaves ``seg_probabilities.mgz`` behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import make_affine
from test_cli_mistakes import (
    inputs,  # noqa: F401 - the fixture: images, a tiny UNet, a segmentation model
    one_line_error,
    tree,
)
from test_formats import OBLIQUE, sitk_ras_affine
from typer.testing import CliRunner

from synthvox import io
from synthvox.cli import app
from synthvox.errors import InputError
from synthvox.volume import Volume
from synthvox.writers import WRITE_SUFFIXES

runner = CliRunner()
#: A radiological (left-handed) header, anisotropic, besides the oblique one.
FLIPPED = make_affine(spacing=(1.1, 0.7, 1.9), flips=(-1, 1, 1), origin=(30.0, -12.5, 7.25))
DETACHED = {".nhdr": ".raw.gz", ".mhd": ".zraw"}


def _volumes(affine: np.ndarray, big_ids: bool) -> dict[str, tuple[Volume, dict]]:
    """An image, a label map (ids up to 30000, and 3,000,000,000 when the format holds it) and a
    3-channel volume, each with the keyword arguments of :func:`io.save` and :func:`io.load`."""
    g = torch.Generator().manual_seed(0)
    lab = torch.randint(0, 4, (1, 9, 7, 6), generator=g) * 10000
    if big_ids:
        lab[0, 0, 0, 0] = 3_000_000_000
    return {"image": (Volume(torch.randn(1, 9, 7, 6, generator=g), affine), {}),
            "labels": (Volume(lab, affine), {"labels": True}),
            "channels": (Volume(torch.randn(3, 9, 7, 6, generator=g), affine), {"allow_4d": True})}


@pytest.mark.parametrize("suffix", [s for s in WRITE_SUFFIXES if s not in (".nii.gz",)])
def test_each_format_round_trips_as_the_nifti(suffix, tmp_path, sitk):
    """Data equal and affine within 1e-6 mm (MGH: float32 fields, 1e-5) of the NIfTI written the same
    way, for an oblique and a left-handed header; ITK's and nibabel's own readings give the affine too
    (LPS flip, direction cosines); nothing but the output (and a detached header's data file) is left."""
    tol = 1e-5 if suffix in (".mgz", ".mgh") else 1e-6
    for geometry, affine in (("oblique", OBLIQUE), ("flipped", FLIPPED)):
        for kind, (vol, kw) in _volumes(affine, big_ids=suffix not in (".mgz", ".mgh")).items():
            folder = tmp_path / f"{geometry}_{kind}"
            out = folder / f"out{suffix}"
            io.save(vol, out, labels=kw.get("labels", False))
            io.save(vol, folder / "ref.nii.gz", labels=kw.get("labels", False))
            back = io.load(out, **kw) if kind != "labels" else io.load_labels(out)
            ref = io.load(folder / "ref.nii.gz", **kw) if kind != "labels" else io.load_labels(folder / "ref.nii.gz")
            assert torch.equal(back.data, ref.data) and torch.equal(back.data, vol.data.to(back.data.dtype)), (geometry, kind)
            np.testing.assert_allclose(back.affine, ref.affine, atol=tol, rtol=0)
            np.testing.assert_allclose(back.affine, affine, atol=tol, rtol=0)
            if suffix in (".mgz", ".mgh"):
                np.testing.assert_allclose(nib.load(str(out)).affine, affine, atol=tol, rtol=0)
            elif suffix not in (".nii",):
                np.testing.assert_allclose(sitk_ras_affine(out), affine, atol=tol, rtol=0)
            expected = {"ref.nii.gz", out.name} | ({"out" + DETACHED[suffix]} if suffix in DETACHED else set())
            assert {f.name for f in folder.iterdir()} == expected, (geometry, kind)


def test_detached_headers_keep_their_data_file(tmp_path, monkeypatch):
    """``.nhdr`` and ``.mhd`` write their data beside them: the data file is moved into place before the
    header (a header is never there without its data), an existing data file is not overwritten
    without --force (checked before any work), and with --force both are replaced."""
    import os

    from synthvox import writers

    moved: list[str] = []
    real = os.replace
    monkeypatch.setattr(writers.os, "replace", lambda a, b: (moved.append(Path(b).name), real(a, b))[1])
    vol = Volume(torch.randn(1, 5, 6, 7), OBLIQUE)
    for suffix, data in DETACHED.items():
        io.save(vol, tmp_path / "first" / f"x{suffix}")
        assert moved[-2:] == [f"x{data}", f"x{suffix}"], moved
        out = tmp_path / f"x{suffix}"
        (tmp_path / f"x{data}").write_bytes(b"someone else's")
        with pytest.raises(InputError, match=f"output exists.*x{data.replace('.', '[.]')}"):
            io.save(vol, out)
        assert not out.exists() and (tmp_path / f"x{data}").read_bytes() == b"someone else's"
        io.save(vol, out, force=True)
        assert torch.equal(io.load(out).data, vol.data)


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch, sitk):
    """A writer that fails (here a header that reads back elsewhere, as a broken conversion would) leaves
    neither the output nor a temporary file."""
    from synthvox import writers

    real = writers.itk_geometry
    monkeypatch.setattr(writers, "itk_geometry", lambda a: (real(a)[0], real(a)[1], [0.0, 0.0, 0.0]))
    for suffix in (".nrrd", ".nhdr", ".mha"):
        with pytest.raises(InputError, match="reads back"):
            io.save(Volume(torch.randn(1, 5, 6, 7), OBLIQUE), tmp_path / f"x{suffix}")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# Each command that writes an image, in another format than NIfTI


def test_apply_writes_the_format_of_its_output_name(inputs, tmp_path):  # noqa: F811 - the fixture
    """``apply`` (an image and a label map) writes MGZ and NRRD with the NIfTI output's voxels and affine."""
    aff = make_affine(spacing=(1.0, 1.5, 2.0))
    lab = torch.zeros(1, 10, 12, 8, dtype=torch.int64)
    lab[:, 3:7, 2:9, 1:6] = 30000
    io.save(Volume(lab, aff), tmp_path / "lab.nii.gz", labels=True)
    io.save(Volume(lab.float() * 0.01 + 1, aff), tmp_path / "img.nii.gz")
    io.save(Volume(torch.full((3, 10, 12, 8), 0.4), aff), tmp_path / "warp.nii.gz", vector=True)
    for name, extra in (("img", []), ("lab", ["--labels"])):
        for suffix in (".nii.gz", ".mgz", ".nrrd"):
            out = tmp_path / f"moved_{name}{suffix}"
            r = runner.invoke(app, ["apply", str(tmp_path / f"{name}.nii.gz"), "--warp", str(tmp_path / "warp.nii.gz"),
                                    "--out", str(out), "--device", "cpu", *extra])
            assert r.exit_code == 0, r.output
        ref = io.load(tmp_path / f"moved_{name}.nii.gz", labels=bool(extra))
        for suffix in (".mgz", ".nrrd"):
            got = io.load(tmp_path / f"moved_{name}{suffix}", labels=bool(extra))
            assert torch.equal(got.data, ref.data) and np.allclose(got.affine, ref.affine, atol=1e-5, rtol=0), suffix


def test_segment_writes_the_format_of_its_output_name(inputs, tmp_path):  # noqa: F811 - the fixture
    """``segment --out seg.nrrd --probabilities``: the label map (id 3,000,000,000 exactly) and the maps
    beside it as NRRD; ``--out seg.mgz`` refuses those ids in one line, writing nothing."""
    args = ["segment", str(inputs / "img.nii.gz"), "--model", str(inputs / "segmodel"), "--device", "cpu", "--probabilities"]
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "seg.nrrd")])
    assert r.exit_code == 0, r.output
    assert sorted(f.name for f in tmp_path.iterdir()) == ["seg.nrrd", "seg_probabilities.json", "seg_probabilities.nrrd"]
    seg = io.load_labels(tmp_path / "seg.nrrd")
    assert (seg.data == 3_000_000_000).all() and np.allclose(seg.affine, io.load(inputs / "img.nii.gz").affine, atol=1e-6)
    prob = io.load(tmp_path / "seg_probabilities.nrrd", allow_4d=True)
    assert prob.data.shape[0] == len(json.loads((tmp_path / "seg_probabilities.json").read_text())["label_ids"]) == 3
    line = one_line_error(runner.invoke(app, [*args, "--out", str(tmp_path / "mgz" / "seg.mgz")]))
    assert "do not fit MGH's 32-bit integers" in line
    assert tree(tmp_path / "mgz") == []


def test_features_writes_the_format_of_its_output_name(inputs, tmp_path):  # noqa: F811 - the fixture
    """``features --out feats.mha`` / ``.mgz``: the NIfTI's channels, as a vector image and as frames."""
    args = ["features", str(inputs / "img.nii.gz"), "--weights", str(inputs / "unet"), "--device", "cpu"]
    for suffix in (".nii.gz", ".mha", ".mgz"):
        r = runner.invoke(app, [*args, "--out", str(tmp_path / f"f{suffix}")])
        assert r.exit_code == 0, r.output
    ref = io.load(tmp_path / "f.nii.gz", allow_4d=True)
    for suffix in (".mha", ".mgz"):
        got = io.load(tmp_path / f"f{suffix}", allow_4d=True)
        assert torch.equal(got.data, ref.data) and np.allclose(got.affine, ref.affine, atol=1e-5, rtol=0), suffix


# ---------------------------------------------------------------------------------------------------
# Refusals


def test_an_output_name_in_no_format_is_one_line_naming_the_formats(inputs, tmp_path):  # noqa: F811
    """Every command that writes an image refuses a name in another format (or none) before any work,
    with exit status 2 and one line naming the formats it writes."""
    warp = tmp_path / "warp.nii.gz"
    io.save(Volume(torch.zeros(3, 4, 4, 4), np.diag([1.5, 1.5, 1.5, 1.0])), warp, vector=True)
    commands = {
        "apply": ["apply", str(inputs / "img.nii.gz"), "--warp", str(warp)],
        "segment": ["segment", str(inputs / "img.nii.gz"), "--model", str(inputs / "segmodel")],
        "features": ["features", str(inputs / "img.nii.gz"), "--weights", str(inputs / "unet")],
    }
    for name in ("out.png", "out.dcm", "out.nii.zip", "out"):
        for command, args in commands.items():
            line = one_line_error(runner.invoke(app, [*args, "--out", str(tmp_path / "o" / name), "--device", "cpu"]))
            assert all(f in line for f in ("NIfTI", ".mgz", ".nrrd", ".nhdr", ".mha", ".mhd")), (command, line)
    assert not (tmp_path / "o").exists()
