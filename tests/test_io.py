import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import make_affine

from synthvox import io
from synthvox.errors import InputError
from synthvox.volume import Volume, check_affine


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
    with pytest.raises(InputError, match="not in a format synthvox reads"):
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
        io.check_output(tmp_path / "seg.png", image=True)
    assert io.check_output(tmp_path / "seg.nii", image=True) == tmp_path / "seg.nii"
    with pytest.raises(InputError, match="NIfTI"):  # save refuses too, and writes nothing
        io.save(Volume(torch.zeros(1, 4, 4, 4), np.eye(4)), tmp_path / "v.npy")
    assert not (tmp_path / "v.npy").exists()


# ---------------------------------------------------------------------------------------------------
# Integer ranges of label maps, value ranges after casts, affines, writability, staging


@pytest.mark.parametrize(
    "hi,dtype",
    [(255, np.uint8), (256, np.int16), (32767, np.int16), (32768, np.int32), (2**31 - 1, np.int32),
     (2**31, np.uint32), (3_000_000_000, np.uint32), (2**32 - 1, np.uint32), (2**32, np.int64),
     (2**53 + 1, np.int64), (2**63 - 1, np.int64)],
)
def test_label_ids_are_kept_exactly_in_the_smallest_type_that_holds_them(tmp_path, oblique_affine, hi, dtype):
    lab = torch.zeros(1, 4, 5, 6, dtype=torch.int64)
    lab[0, 1] = hi
    lab[0, 2] = hi - 1
    lab[0, 3, 0, 0] = 7
    p = io.save(Volume(lab, oblique_affine), tmp_path / "lab.nii.gz", labels=True)
    assert nib.load(str(p)).get_data_dtype() == dtype
    assert torch.equal(io.load_labels(p).data, lab)


def test_float_label_arrays_are_written_as_integers_or_refused(tmp_path):
    lab = np.zeros((1, 4, 4, 4), np.float64)
    lab[0, 1] = 3_000_000_000.0
    p = io.save(lab, tmp_path / "a.nii.gz", np.eye(4), labels=True)
    assert nib.load(str(p)).get_data_dtype() == np.uint32
    assert int(io.load_labels(p).data.max()) == 3_000_000_000
    lab[0, 2, 0, 0] = 0.5
    with pytest.raises(InputError, match="non-integer"):
        io.save(lab, tmp_path / "b.nii.gz", np.eye(4), labels=True)
    assert not (tmp_path / "b.nii.gz").exists()


@pytest.mark.parametrize(
    "arr,match",
    [(np.full((4, 4, 4), 2**63 + 10, np.uint64), "above the largest supported id"),
     (np.full((4, 4, 4), 1e20, np.float64), "above the largest supported id"),
     (np.full((4, 4, 4), -3, np.int32), "negative")],
)
def test_label_ids_int64_cannot_hold_are_refused(tmp_path, arr, match):
    p = tmp_path / "lab.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.eye(4), dtype=arr.dtype), str(p))
    with pytest.raises(InputError, match=match):
        io.load_labels(p)


@pytest.mark.parametrize("value", [1e39, -1e39, 1e300, 5e30])
def test_image_values_beyond_float32_arithmetic_are_refused(tmp_path, value):
    arr = np.ones((4, 5, 6), np.float64)
    arr[1, 2, 3] = value
    p = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(p))
    with pytest.raises(InputError, match="float32"):
        io.load(p)


def test_large_float32_values_load_and_save_finite(tmp_path):
    arr = np.ones((4, 5, 6), np.float32)
    arr[1, 2, 3] = 1e29
    p = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(p))
    assert float(io.load(p).data.max()) == pytest.approx(1e29, rel=1e-6)
    with pytest.raises(InputError, match="float32"):
        io.save(np.full((1, 2, 2, 2), 1e300), tmp_path / "x.nii.gz", np.eye(4))
    assert not (tmp_path / "x.nii.gz").exists()


def _collinear():
    a = np.eye(4)
    a[:3, 2] = [1.0, 1e-9, 0.0]
    return a


@pytest.mark.parametrize(
    "affine,match",
    [(np.diag([1.0, 1.0, 0.0, 1.0]), "voxel sizes"), (_collinear(), "degenerate"),
     (np.diag([1.0, np.nan, 1.0, 1.0]), "non-finite"), (np.diag([1e-9, 1.0, 1.0, 1.0]), "voxel sizes"),
     (np.diag([1.0, 1.0, 1e9, 1.0]), "voxel sizes")],
)
def test_degenerate_affines_are_refused_on_read_and_write(tmp_path, affine, match):
    p = tmp_path / "img.nii"
    img = nib.Nifti1Image(np.ones((4, 5, 6), np.float32), None)
    img.header.set_sform(affine, code=1)
    img.header.set_qform(None, code=0)
    nib.save(img, str(p))
    with pytest.raises(InputError, match=match):
        io.load(p)
    with pytest.raises(InputError, match=match):
        check_affine(affine, "warp")
    with pytest.raises(InputError, match=match):
        io.save(torch.ones(1, 4, 5, 6), tmp_path / "out.nii.gz", affine)
    assert not (tmp_path / "out.nii.gz").exists()


def test_check_writable_creates_nothing_and_names_the_obstacle(tmp_path):
    target = tmp_path / "a" / "b" / "c"
    assert io.check_writable(target) == target
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        io.check_writable(tmp_path / "f" / "sub")
    with pytest.raises(InputError, match="is a file"):
        io.check_output(tmp_path / "f" / "out.nii.gz", image=True)
    (tmp_path / "d.nii.gz").mkdir()
    with pytest.raises(InputError, match="directory"):
        io.check_output(tmp_path / "d.nii.gz", force=True)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(InputError, match="broken symbolic link"):
        io.check_writable(tmp_path / "dangling" / "out")


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_staging_dir_is_all_or_nothing(tmp_path, exc):
    out = tmp_path / "new" / "out"
    with io.staging_dir(out) as stage:
        (stage / "a.txt").write_text("a")
        (stage / "b.txt").write_text("b")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt"]
    with pytest.raises(type(exc)), io.staging_dir(out) as stage:
        (stage / "a.txt").write_text("changed")
        raise exc
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt"] and (out / "a.txt").read_text() == "a"
    with pytest.raises(type(exc)), io.staging_dir(tmp_path / "other" / "deep") as stage:
        (stage / "a.txt").write_text("a")
        raise exc
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]


@pytest.mark.parametrize("level", [0, 1, 9])
def test_compress_level_writes_readable_identical_volumes(tmp_path, oblique_affine, smooth_image, level):
    p = io.save(Volume(smooth_image, oblique_affine), tmp_path / "a.nii.gz", compress_level=level)
    back = io.load(p)
    assert torch.equal(back.data, smooth_image)
    np.testing.assert_allclose(back.affine, oblique_affine, atol=1e-5)
    assert p.read_bytes()[:2] == b"\x1f\x8b"  # still gzip, as the name says
    with pytest.raises(ValueError):
        io.save(Volume(smooth_image, oblique_affine), tmp_path / "b.nii.gz", compress_level=10)


@pytest.mark.parametrize("keep", [False, True])
def test_cleanup_on_failure_removes_only_what_the_block_added(tmp_path, keep):
    out = tmp_path / "run"
    out.mkdir()
    (out / "mine.txt").write_text("the user's")
    with pytest.raises(KeyboardInterrupt), io.cleanup_on_failure(out, keep=lambda: keep):
        (out / "config.yaml").write_text("x")
        (out / "checkpoints").mkdir()
        raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == (["checkpoints", "config.yaml", "mine.txt"] if keep else ["mine.txt"])
    fresh = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError), io.cleanup_on_failure(fresh):
        fresh.mkdir(parents=True)
        (fresh / "log.csv").write_text("x")
        raise RuntimeError("out of memory")
    assert not (tmp_path / "a").exists()
    with io.cleanup_on_failure(fresh):  # success keeps everything
        fresh.mkdir(parents=True)
        (fresh / "log.csv").write_text("x")
    assert (fresh / "log.csv").exists()


def test_staging_dir_cleans_up_on_sigterm_and_restores_the_handler(tmp_path):
    import os
    import signal

    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "new" / "out"
    with pytest.raises(SystemExit) as exc, io.staging_dir(out) as stage:
        (stage / "0000_labels.nii.gz").write_bytes(b"x")
        os.kill(os.getpid(), signal.SIGTERM)
    assert exc.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before


def test_cleanup_on_failure_turns_sigterm_into_a_clean_exit(tmp_path):
    import os
    import signal

    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc, io.cleanup_on_failure(out):
        out.mkdir()
        (out / "log.csv").write_text("x")
        os.kill(os.getpid(), signal.SIGTERM)
    assert exc.value.code == 128 + signal.SIGTERM and not out.exists()
    assert signal.getsignal(signal.SIGTERM) == before
