"""The shipped default weights, as a user gets them: their quality on real data (a bound they meet and
a broken network does not), finetuning from them (``--init default``, the README's command) and
``synthvox features`` with them. Whatever ships is loaded through the package's own loader, so these
tests hold for any architecture the model card describes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import two_ellipsoids
from typer.testing import CliRunner

from synthvox import io
from synthvox.cli import app
from synthvox.models import default_weights_path, load_default_model
from synthvox.models.extract import image_features
from synthvox.segmentation import read_meta
from synthvox.volume import Volume, resample_like, resample_to_spacing

runner = CliRunner()

#: Working spacing (mm): the whole head in about 4 s on one thread.
MM = 4.0
#: Voxels drawn, and other voxels each one competes with (at least 12 mm away).
N_VOXELS, N_OTHERS, MIN_MM = 600, 50, 12.0
#: Measured at 4 mm: the shipped weights (step 2796, instance norm) 0.89; random networks of the same
#: architecture 0.07 (instance norm, 2 seeds) and 0.12-0.20 (layer norm, 4 seeds); chance 1/51. With
#: 20 others instead of 50 a random layer-norm network reached 0.58: more competitors separate better.
BOUND = 0.5


@pytest.fixture(scope="module")
def shipped():
    path = default_weights_path()
    assert path is not None, "no default weights ship: the package's main job (demo, features) needs them"
    return load_default_model("cpu")


def t1_and_flair(nichart: Path) -> tuple[Volume, Volume, torch.Tensor]:
    """Subj1's T1 at ``MM``, its FLAIR resampled onto that grid through the headers (this subject's T1
    and FLAIR headers agree; shared/data/README.md), and the brain mask (DLMUSE labels > 0) where the
    FLAIR's field of view reaches."""
    t1 = resample_to_spacing(io.load(nichart / "t1" / "Subj1_T1.nii.gz"), MM)
    lab = resample_to_spacing(io.load_labels(nichart / "dlmuse" / "Subj1_T1_DLMUSE.nii.gz"), MM, mode="nearest")
    flair = io.load(nichart / "flair" / "Subj1_FL.nii.gz")
    seen = resample_like(Volume(torch.ones_like(flair.data), flair.affine), t1).data[0] > 0.99
    return t1, resample_like(flair, t1), (lab.data[0] > 0) & seen


def cross_contrast_top1(model: torch.nn.Module, t1: Volume, flair: Volume, mask: torch.Tensor, seed: int = 0) -> float:
    """How often a brain voxel's T1 feature is closer (cosine) to the FLAIR feature at the same place
    than to the FLAIR features of ``N_OTHERS`` random brain voxels at least ``MIN_MM`` away."""
    f1 = F.normalize(image_features(t1, model, "cpu").data, dim=0)
    f2 = F.normalize(image_features(flair, model, "cpu").data, dim=0)
    g = torch.Generator().manual_seed(seed)
    where = torch.nonzero(mask)
    at = where[torch.randperm(len(where), generator=g)[:N_VOXELS]]
    others = where[torch.randint(len(where), (len(at), N_OTHERS), generator=g)]
    a = f1[:, at[:, 0], at[:, 1], at[:, 2]].T  # (n, C)
    same = (a * f2[:, at[:, 0], at[:, 1], at[:, 2]].T).sum(-1)
    other = (a[:, None] * f2[:, others[..., 0], others[..., 1], others[..., 2]].permute(1, 2, 0)).sum(-1)
    far = (others - at[:, None]).float().norm(dim=-1) * MM >= MIN_MM
    other = torch.where(far, other, torch.full_like(other, -2.0))
    return float((same > other.max(1).values).float().mean())


def test_shipped_features_match_the_same_anatomy_across_contrasts(shipped, nichart_dev):
    """The T1 and the FLAIR of one subject, each through the network: at a brain voxel the T1 feature
    is closer to the FLAIR feature at the same place than to those of 50 other places (12 mm or more
    away) in 0.89 of the voxels with the shipped weights (Subj1 at 4 mm), in 0.07 with a random
    network of the same architecture and 0.12-0.20 with random layer-norm ones (chance: 1/51). Bound
    0.5: the random networks fail it (checked by loading them in place of the shipped weights)."""
    t1, flair, mask = t1_and_flair(nichart_dev)
    top1 = cross_contrast_top1(shipped, t1, flair, mask)
    assert top1 > BOUND, f"the shipped weights match the same place across contrasts in {top1:.2f} of voxels"


def small_pair() -> tuple[Volume, Volume]:
    """A 32^3 image at 3 mm (the CPU's finetuning spacing) with two labelled ellipsoids."""
    lab = two_ellipsoids()
    g = torch.Generator().manual_seed(0)
    img = torch.zeros(lab.shape)
    img[lab == 7], img[lab == 42] = 80.0, 150.0
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    return Volume(img + 5 * torch.randn(lab.shape, generator=g), affine), Volume(lab, affine)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shipped")
    img, lab = small_pair()
    io.save(img, d / "img.nii.gz")
    io.save(lab, d / "lab.nii.gz", labels=True)
    return d


def test_finetune_from_the_shipped_weights(shipped, files, tmp_path):
    """The README's ``synthvox finetune`` (``--init default``, the default) from the shipped weights, two
    steps of 32^3 patches, then ``segment`` with the result; with ``--train head`` the backbone stays
    exactly the shipped network (so it was loaded, not built at random)."""
    base = ["finetune", "--image", str(files / "img.nii.gz"), "--label", str(files / "lab.nii.gz"), "--steps", "2",
            "--patch", "32", "--batch", "1", "--device", "cpu"]
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    meta = read_meta(tmp_path / "m")
    assert meta.train["init"] == "default" and meta.train["init_source"] == f"default ({default_weights_path()})"
    assert meta.history["steps"] == 2 and meta.label_ids == [0, 7, 42]
    r = runner.invoke(app, ["segment", "--model", str(tmp_path / "m"), str(files / "img.nii.gz"), "--out",
                            str(tmp_path / "seg.nii.gz"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    seg = io.load_labels(tmp_path / "seg.nii.gz")
    assert seg.shape == (32, 32, 32) and set(seg.data.unique().tolist()) <= {0, 7, 42}

    r = runner.invoke(app, [*base, "--init", "default", "--train", "head", "--out", str(tmp_path / "h")])
    assert r.exit_code == 0, r.output
    from synthvox.segmentation.modeldir import load_model_dir

    net, _ = load_model_dir(tmp_path / "h")
    mine, theirs = net.backbone.state_dict(), shipped.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_features_command_with_the_shipped_weights(shipped, files, tmp_path):
    """``synthvox features IMAGE --out F`` without ``--weights``: the shipped network's features, on the
    image's grid (the same numbers as the Python API with the loaded network)."""
    r = runner.invoke(app, ["features", str(files / "img.nii.gz"), "--out", str(tmp_path / "f.nii.gz"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    got = io.load(tmp_path / "f.nii.gz", allow_4d=True)
    img = io.load(files / "img.nii.gz")
    want = image_features(img, shipped, "cpu")
    assert got.data.shape == (shipped.out_channels, 32, 32, 32)
    assert np.allclose(got.affine, img.affine)
    torch.testing.assert_close(got.data, want.data, atol=1e-4, rtol=1e-4)
    assert float(want.data.std(dim=(1, 2, 3)).min()) > 0  # no dead channel
    assert f"wrote {shipped.out_channels} feature channels" in r.output
