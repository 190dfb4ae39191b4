import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import make_affine

from synthvox import io
from synthvox.errors import InputError
from synthvox.volume import Volume


def test_roundtrip_keeps_affine_and_values(tmp_path, blob_labels, smooth_image):
    aff = make_affine(spacing=(0.8, 1.3, 2.5), angles=(0.4, 0.1, -0.7), flips=(-1, 1, 1))
    io.save(Volume(smooth_image, aff), tmp_path / "img.nii.gz")
    io.save(Volume(blob_labels, aff), tmp_path / "lab.nii.gz", labels=True)
    img = io.load(tmp_path / "img.nii.gz")
    lab = io.load_labels(tmp_path / "lab.nii.gz")
    np.testing.assert_allclose(img.affine, aff, atol=1e-5)
    np.testing.assert_allclose(lab.affine, aff, atol=1e-5)
    np.testing.assert_allclose(img.spacing, [0.8, 1.3, 2.5], atol=1e-5)
    assert torch.allclose(img.data, smooth_image)
    assert torch.equal(lab.data, blob_labels)
    assert lab.data.dtype == torch.int64


def test_refuses_overwrite(tmp_path, smooth_image, oblique_affine):
    p = tmp_path / "a.nii.gz"
    io.save(Volume(smooth_image, oblique_affine), p)
    with pytest.raises(InputError, match="--force"):
        io.save(Volume(smooth_image * 2, oblique_affine), p)
    assert torch.allclose(io.load(p).data, smooth_image)
    io.save(Volume(smooth_image * 2, oblique_affine), p, force=True)
    assert torch.allclose(io.load(p).data, smooth_image * 2)
    assert [f.name for f in tmp_path.iterdir()] == ["a.nii.gz"]  # no temp files left


@pytest.mark.parametrize(
    "shape,match", [((10, 12), "3D"), ((10, 12, 1), "3D"), ((6, 7, 8, 3), "3D"), ((4, 5, 6, 2, 2), "3D")]
)
def test_rejects_wrong_dimensionality(tmp_path, shape, match):
    p = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), str(p))
    with pytest.raises(InputError, match=match):
        io.load(p)


def test_rejects_bad_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        io.load(tmp_path / "missing.nii.gz")
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(InputError, match="not a NIfTI"):
        io.load(txt)
    fake = tmp_path / "fake.nii.gz"
    fake.write_bytes(b"this is not gzip")
    with pytest.raises(InputError, match="cannot read"):
        io.load(fake)
    nan = np.ones((5, 6, 7), np.float32)
    nan[2, 3, 4] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(InputError, match="NaN"):
        io.load(tmp_path / "nan.nii.gz")
    frac = np.full((5, 6, 7), 0.5, np.float32)
    nib.save(nib.Nifti1Image(frac, np.eye(4)), str(tmp_path / "frac.nii.gz"))
    with pytest.raises(InputError, match="not a label map"):
        io.load_labels(tmp_path / "frac.nii.gz")


def test_vector_image_layout(tmp_path, oblique_affine):
    disp = torch.randn(3, 4, 5, 6)
    io.save(Volume(disp, oblique_affine), tmp_path / "w.nii.gz", vector=True)
    img = nib.load(str(tmp_path / "w.nii.gz"))
    assert img.shape == (4, 5, 6, 1, 3)
    assert img.header.get_intent()[0] == "vector"
    np.testing.assert_allclose(np.asarray(img.dataobj)[1, 2, 3, 0], disp[:, 1, 2, 3].numpy(), atol=1e-6)


def test_check_output_refuses_existing_and_non_nifti_names(tmp_path):
    existing = tmp_path / "a.nii.gz"
    existing.write_bytes(b"x")
    with pytest.raises(InputError, match="--force"):
        io.check_output(existing)
    assert io.check_output(existing, force=True) == existing
    with pytest.raises(InputError, match="NIfTI"):
        io.check_output(tmp_path / "seg.png", nifti=True)
    assert io.check_output(tmp_path / "seg.nii", nifti=True) == tmp_path / "seg.nii"
    with pytest.raises(InputError, match="NIfTI"):  # save refuses too, and writes nothing
        io.save(Volume(torch.zeros(1, 4, 4, 4), np.eye(4)), tmp_path / "v.npy")
    assert not (tmp_path / "v.npy").exists()
