"""Input formats other than NIfTI (issue 25, item 5): MGZ/MGH (nibabel), NRRD, MetaImage and a DICOM
series folder (SimpleITK) read as the NIfTI they were copied from, register to the same warp, and
anything else is refused in one line that names the accepted formats.

The copies are written by the field's libraries, not by synthvox: NRRD, MHA and MHD by SimpleITK from
ITK's own reading of the NIfTI, MGZ/MGH by nibabel, the DICOM series by SimpleITK's GDCM writer, one
file per slice with its position and orientation tags. The images are oblique and anisotropic.

Shown to fail on broken readers (by editing them by hand, then restoring them; they were in
``synthvox.io`` then and are in ``synthvox.readers`` now): with the LPS flip left out of
``_ras_affine``, ``test_every_format_reads_as_the_nifti``, ``test_affine_equals_simpleitks_reading``
and ``test_register_on_copies_equals_nifti`` fail for every SimpleITK format (affine off by up to
80 mm); with SimpleITK's ``Z, Y, X`` axes not reversed in ``_xyz_array``, the same tests and
``test_label_ids_kept_exactly`` fail on the shape and the data; with ITK's direction matrix read
transposed, the first two and the small registration test fail.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import make_affine, require_module, require_shared
from test_registration import phantom, warped_pair
from typer.testing import CliRunner

from synthvox import io, readers
from synthvox.cli import app
from synthvox.errors import InputError
from synthvox.registration import register
from synthvox.volume import Volume

sitk = require_module("SimpleITK")
runner = CliRunner()

#: Copies of a NIfTI file, by the name the copy gets (a DICOM series is a folder).
FORMATS = ("nrrd", "mha", "mhd", "mgz", "mgh", "dicom")
SITK_FORMATS = ("nrrd", "mha", "mhd", "dicom")
#: Oblique (rotated about three axes), anisotropic, a proper rotation (as a DICOM series stores it).
OBLIQUE = make_affine(spacing=(0.9, 1.3, 2.1), angles=(0.2, -0.35, 0.5), origin=(-20.5, 13.25, 40.125))


def _series_uid(name: str) -> str:
    return "1.2.826.0.1.3680043.8.498." + str(zlib.crc32(name.encode()) + 1)


def _ds(value: float) -> str:
    """A DICOM decimal string: the most digits its 16 characters hold."""
    for digits in range(17, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(value)


def write_dicom(image, folder: Path) -> Path:
    """A DICOM series of a 3D integer SimpleITK image, one file per slice, as SimpleITK's own example
    writes one: ImagePositionPatient and ImageOrientationPatient (LPS) per slice, the pixel spacing
    from the slice image."""
    folder.mkdir(parents=True)
    d = image.GetDirection()
    study, series = _series_uid(str(folder) + "study"), _series_uid(str(folder))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        s = image[:, :, k]
        for tag, value in (
            ("0008|0060", "MR"), ("0008|0016", "1.2.840.10008.5.1.4.1.1.4"), ("0008|0018", f"{series}.{k + 1}"),
            ("0020|000d", study), ("0020|000e", series), ("0020|0013", str(k + 1)),
            ("0020|0037", "\\".join(_ds(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7]))),
            ("0020|0032", "\\".join(_ds(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k)))),
        ):
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(s)
    return folder


def save_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """A NIfTI with its affine as a qform alone, whose rotation (a quaternion) is orthonormal to double
    precision: a DICOM series can hold it exactly (its third axis is the normal of its first two),
    where a float32 sform's oblique axes are orthogonal only to about 1e-8."""
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(None, code=0)
    nib.save(img, str(path))
    return path


def write_copy(nifti: Path, fmt: str, folder: Path) -> Path:
    """A copy of ``nifti`` in format ``fmt`` in ``folder``: through ITK's reading of the NIfTI (float32
    header fields, about 1e-7 mm from nibabel's) for the SimpleITK formats, through nibabel for MGZ/MGH."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / (f"{nifti.name.split('.')[0]}_{fmt}" if fmt == "dicom" else f"{nifti.name.split('.')[0]}.{fmt}")
    if fmt in ("mgz", "mgh"):
        img = nib.load(str(nifti))
        data = np.asarray(img.dataobj)
        nib.save(nib.MGHImage(data.astype(np.int32) if data.dtype.kind in "iu" else data, img.affine), str(out))
        return out
    image = sitk.ReadImage(str(nifti))
    for key in image.GetMetaDataKeys():  # NIfTI header fields other formats do not hold
        image.EraseMetaData(key)
    if fmt == "dicom":
        return write_dicom(image, out)
    sitk.WriteImage(image, str(out))
    return out


def sitk_ras_affine(path: Path) -> np.ndarray:
    """SimpleITK's reading of ``path`` as a RAS affine, from its physical points of the index basis
    (independent of synthvox's conversion of direction, spacing and origin)."""
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        image = reader.Execute()
    else:
        image = sitk.ReadImage(str(path))
    o = np.array(image.TransformIndexToPhysicalPoint((0, 0, 0)))
    a = np.eye(4)
    for i in range(3):
        a[:3, i] = np.array(image.TransformIndexToPhysicalPoint(tuple(int(j == i) for j in range(3)))) - o
    a[:3, 3] = o
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ a


def int_image(shape=(18, 22, 12), seed: int = 0) -> np.ndarray:
    """Smooth-ish int16 intensities (a DICOM series stores integers)."""
    rng = np.random.default_rng(seed)
    return (rng.random(shape) * 1000 + np.arange(shape[0])[:, None, None] * 50).astype(np.int16)


def one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# Reading: affine and voxels as the NIfTI's, the affine as ITK reads it


@pytest.mark.parametrize(("fmt", "geometry"), [(f, "oblique") for f in FORMATS] + [(f, "flipped") for f in FORMATS[:-1]])
def test_every_format_reads_as_the_nifti(fmt, geometry, tmp_path):
    """Affine within 1e-4 mm and the very same voxels (axes in X, Y, Z order) as the NIfTI's; a
    radiological (left-handed) header too, except as DICOM, whose slice axis is the normal's."""
    aff = OBLIQUE if geometry == "oblique" else make_affine(spacing=(1.1, 0.7, 1.9), flips=(-1, 1, 1))
    nifti = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(int_image(), aff), str(nifti))
    ref = io.load(nifti)
    copy = io.load(write_copy(nifti, fmt, tmp_path))
    assert copy.data.shape == ref.data.shape == (1, 18, 22, 12)
    np.testing.assert_allclose(copy.affine, ref.affine, atol=1e-4, rtol=0)
    assert torch.equal(copy.data, ref.data)
    shape, affine = readers.grid(write_copy(nifti, fmt, tmp_path / "again"))  # the header alone: the same grid
    assert shape == (18, 22, 12) and np.allclose(affine, ref.affine, atol=1e-4)


@pytest.mark.parametrize("fmt", SITK_FORMATS)
def test_affine_equals_simpleitks_reading(fmt, tmp_path):
    """synthvox's affine is ITK's reading of the same file (LPS index-to-point map) with x and y negated."""
    nifti = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(int_image(), OBLIQUE), str(nifti))
    copy = write_copy(nifti, fmt, tmp_path)
    np.testing.assert_allclose(io.load(copy).affine, sitk_ras_affine(copy), atol=1e-4, rtol=0)
    np.testing.assert_allclose(sitk_ras_affine(nifti), OBLIQUE, atol=1e-4, rtol=0)  # ITK reads the NIfTI so too


@pytest.mark.parametrize("fmt", FORMATS)
def test_label_ids_kept_exactly(fmt, tmp_path, blob_labels):
    """``load_labels`` keeps every id of a copy (ids up to 30000: the widest a DICOM int16 series holds;
    4,000,000,007 as NRRD/MHA uint32)."""
    lab = blob_labels[0].numpy().astype(np.int16)
    lab[lab == 42] = 30000
    nifti = tmp_path / "lab.nii.gz"
    nib.save(nib.Nifti1Image(lab, OBLIQUE), str(nifti))
    got = io.load_labels(write_copy(nifti, fmt, tmp_path))
    assert torch.equal(got.data, io.load_labels(nifti).data)
    assert set(got.data.unique().tolist()) == {0, 3, 7, 30000}
    if fmt in ("nrrd", "mha"):
        big = sitk.GetImageFromArray(np.full((4, 5, 6), 4_000_000_007, np.uint32))
        sitk.WriteImage(big, str(tmp_path / f"big.{fmt}"))
        assert int(io.load_labels(tmp_path / f"big.{fmt}").data.max()) == 4_000_000_007


def test_what_nifti_inputs_are_checked_for_holds_for_every_format(tmp_path):
    """2D and 4D images, NaN, a degenerate affine, fractions in a label map and an uneven DICOM series
    are refused in one line, as for NIfTI."""
    def sitk_file(arr, name, vector=False, spacing=None):
        image = sitk.GetImageFromArray(arr, isVector=vector)
        if spacing:
            image.SetSpacing(spacing)
        sitk.WriteImage(image, str(tmp_path / name))
        return tmp_path / name

    nan = np.ones((5, 6, 7), np.float32)
    nan[1, 2, 3] = np.nan
    cases = {
        sitk_file(np.ones((5, 6), np.float32), "flat.mha"): "must be a 3D volume",
        sitk_file(np.ones((5, 6, 7, 3), np.float32), "vector.nrrd", vector=True): "must be a 3D volume",
        sitk_file(nan, "nan.nrrd"): "NaN",
        sitk_file(np.ones((5, 6, 7), np.float32), "tiny.mhd", spacing=(1e-9, 1.0, 1.0)): "voxel sizes",
    }
    mgz = tmp_path / "four.mgz"
    nib.save(nib.MGHImage(np.ones((5, 6, 7, 2), np.float32), np.eye(4)), str(mgz))
    cases[mgz] = "must be a 3D volume"
    for path, words in cases.items():
        with pytest.raises(InputError, match=words):
            io.load(path)
    assert io.load(tmp_path / "vector.nrrd", allow_4d=True).data.shape == (3, 7, 6, 5)  # components become channels
    with pytest.raises(InputError, match="not a label map"):
        io.load_labels(sitk_file(np.full((5, 6, 7), 0.5, np.float32), "frac.mha"))
    # a DICOM series with a slice missing: one spacing would misplace half of them
    nifti = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(int_image(), OBLIQUE), str(nifti))
    series = write_copy(nifti, "dicom", tmp_path)
    (series / "slice005.dcm").unlink()
    with pytest.raises(InputError, match="unevenly spaced slices"):
        io.load(series)


# ---------------------------------------------------------------------------------------------------
# Refusals: one line naming the accepted formats, exit status 2


def test_unreadable_or_unsupported_input_is_one_line_naming_the_formats(tmp_path):
    """Every command that reads images refuses another format, a corrupt file and a folder without a
    DICOM series in one line that lists the formats, before any work."""
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(int_image(), OBLIQUE), str(good))
    text = tmp_path / "scan.dcm"  # one slice file: a series is given as its folder
    text.write_text("not an image")
    corrupt = tmp_path / "corrupt.nrrd"
    corrupt.write_text("NRRD0004\ngarbage\n")
    empty = tmp_path / "no_series"
    empty.mkdir()
    (empty / "notes.txt").write_text("")
    for bad in (text, corrupt, empty):
        for args in (["register", str(good), str(bad), "--out", str(tmp_path / "r")],
                     ["register", str(bad), str(good), "--out", str(tmp_path / "r")],
                     ["features", str(bad), "--out", str(tmp_path / "f.nii.gz")],
                     ["shapes", str(bad), "--out", str(tmp_path / "bank.npz")]):
            line = one_line_error(runner.invoke(app, [*args, "--device", "cpu"]))
            assert str(bad) in line and all(f in line for f in ("NIfTI", "MGZ", "NRRD", ".mha", "DICOM")), (args, line)
    assert not (tmp_path / "r").exists() and not (tmp_path / "f.nii.gz").exists()


# ---------------------------------------------------------------------------------------------------
# Folders of images


def test_a_folder_lists_images_of_every_format_and_names_outputs_nifti(tmp_path):
    """``segment -i DIR`` lists image files of every format, writes NAME.nii.gz for the others;
    two images that would write one label map are refused; a DICOM series folder given with -i says
    to give it as IMAGE."""
    from synthvox.segmentation.folder import folder_outputs

    src = tmp_path / "images"
    src.mkdir()
    nifti = src / "a.nii.gz"
    nib.save(nib.Nifti1Image(int_image(), OBLIQUE), str(nifti))
    for fmt in ("nrrd", "mgz", "mha"):
        copy = write_copy(nifti, fmt, tmp_path)
        copy.rename(src / f"case_{fmt}.{fmt}")
    (src / "notes.txt").write_text("")
    jobs = folder_outputs(src, tmp_path / "out")
    assert [(i.name, o.name) for i, o in jobs] == [
        ("a.nii.gz", "a.nii.gz"), ("case_mgz.mgz", "case_mgz.nii.gz"), ("case_mha.mha", "case_mha.nii.gz"),
        ("case_nrrd.nrrd", "case_nrrd.nii.gz")]
    write_copy(nifti, "nrrd", src)  # a.nrrd beside a.nii.gz
    with pytest.raises(InputError, match=r"a.nii.gz and a.nrrd .* would both write a.nii.gz"):
        folder_outputs(src, tmp_path / "out")
    series = write_copy(nifti, "dicom", tmp_path)
    assert readers.is_dicom_series(series) and not readers.is_dicom_series(src)
    with pytest.raises(InputError, match="it holds a DICOM series: give it as IMAGE"):
        folder_outputs(series, tmp_path / "out")
    # the command: a series given as IMAGE is one image (it gets as far as asking for a model), with -i a folder
    single = one_line_error(runner.invoke(app, ["segment", str(series), "--out", str(tmp_path / "seg.nii.gz")]))
    assert "nothing to segment with" in single
    listed = one_line_error(runner.invoke(app, ["segment", "-i", str(series), "-o", str(tmp_path / "o"), "--model", str(src)]))
    assert "give it as IMAGE" in listed


# ---------------------------------------------------------------------------------------------------
# Registration on copies: the same warp as on the NIfTI
#
# The copies are made as the field's tools make them: NRRD, MHA, MHD and DICOM from ITK's own (float32)
# reading of the NIfTI, MGZ/MGH and a NIfTI with a float32 sform by nibabel. Each format's header then
# places the image up to about 1e-7 mm away from the NIfTI's qform; the solver sees every image's
# affine snapped to a grid far coarser than that (:func:`synthvox.volume.solver_affine`), so the copies
# register bit for bit as the NIfTI and only the last step, on the images' own headers, differs.
#
# Shown to fail without the snap (``register`` given the headers as read): the phantom's copies end up
# to 0.8 mm apart and the dev image's to 2.2 mm (MGZ), where 0.01 mm is asked.

#: The copies each registration test makes: every format, and a NIfTI with a float32 sform beside the
#: reference's qform.
COPIES = (*FORMATS, "sform.nii.gz")


def _copy(nifti: Path, fmt: str, folder: Path) -> Path:
    """A copy of ``nifti`` (saved by :func:`save_nifti`) as the field's tools write one (see above)."""
    if fmt == "sform.nii.gz":
        folder.mkdir(parents=True, exist_ok=True)
        img = nib.load(str(nifti))
        out = folder / f"{nifti.name.split('.')[0]}.{fmt}"
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine), str(out))  # sform and qform, float32
        return out
    return write_copy(nifti, fmt, folder)


def _copies_register_as_the_nifti(fixed_nii: Path, moving_nii: Path, tmp_path: Path, **settings) -> dict[str, float]:
    """The largest difference (mm) of each copy's warp from the NIfTI's, after checking that every copy
    reads as the NIfTI (the same voxels, the affine within 1e-4 mm).

    Copies that read exactly alike (NRRD, MHA and MHD, written from one ITK image; MGZ and MGH) are
    registered once: the solver is deterministic, so what a format can change is what it reads as."""
    def read(fixed: Path, moving: Path) -> tuple[Volume, Volume]:
        return io.load(fixed), io.load(moving)

    def warp(fixed: Volume, moving: Volume) -> torch.Tensor:
        return register(fixed, moving, features="mind", **settings).warp.data.double()

    ref_f, ref_m = read(fixed_nii, moving_nii)
    ref = warp(ref_f, ref_m)
    assert float(ref.abs().max()) > 1.0  # a warp worth comparing
    done: dict[bytes, float] = {}
    worst = {}
    for fmt in COPIES:
        folder = tmp_path / fmt.replace(".", "_")
        f, m = read(_copy(fixed_nii, fmt, folder), _copy(moving_nii, fmt, folder))
        for vol, r in ((f, ref_f), (m, ref_m)):
            assert np.allclose(vol.affine, r.affine, atol=1e-4, rtol=0) and torch.equal(vol.data, r.data), fmt
        key = f.affine.tobytes() + m.affine.tobytes()
        if key not in done:
            done[key] = float((warp(f, m) - ref).abs().max())
        worst[fmt] = done[key]
    assert len(set(done)) > 2, "the copies read as at most two different headers: nothing is compared"
    return worst


def test_register_on_copies_equals_nifti(tmp_path):
    """FIXED and MOVING as NRRD, MHA, MHD, MGZ, MGH, DICOM-series and float32-sform NIfTI copies
    (oblique, anisotropic, MOVING on its own grid) give the NIfTI's warp within 0.01 mm, on the same grid."""
    img = phantom(24)
    moving, _ = warped_pair(img, amp=1.5)
    maff = make_affine(spacing=(1.6, 1.4, 1.8), angles=(0.15, 0.1, -0.25), origin=(-14.0, -19.0, -16.0))
    faff = make_affine(spacing=(1.5, 1.5, 1.7), angles=(0.1, -0.2, 0.3), origin=(-17.0, -18.0, -21.0))
    fixed_nii, moving_nii = tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz"
    save_nifti((img[0].numpy() * 1000).round().astype(np.int16), faff, fixed_nii)
    save_nifti((moving[0].numpy() * 1000).round().astype(np.int16), maff, moving_nii)
    worst = _copies_register_as_the_nifti(fixed_nii, moving_nii, tmp_path)
    assert max(worst.values()) < 0.01, worst


def test_dev_image_copies_register_as_the_nifti(tmp_path):
    """A real T1 (nichart Subj1) onto a FLAIR of another subject, each cut to 8 x 6 x 8 mm voxels
    (anisotropic) and given an oblique header: every format's copies give the NIfTI's warp within 0.01 mm
    (the default solver with a shorter convex search, for time)."""
    dev = require_shared("data", "eval", "nichart_dev")
    rot = make_affine(spacing=(1.0, 1.0, 1.0), angles=(0.12, -0.08, 0.2), origin=(0.0, 0.0, 0.0))

    def dev_copy(path: Path, name: str) -> Path:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)[::4, ::3, ::4].astype(np.int16)
        aff = img.affine @ np.diag([4.0, 3.0, 4.0, 1.0])
        if np.linalg.det(aff[:3, :3]) < 0:  # as a DICOM series stores it: a right-handed voxel frame
            data = data[::-1]
            aff = aff @ np.array([[-1, 0, 0, data.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
        return save_nifti(np.ascontiguousarray(data), rot @ aff, tmp_path / name)

    fixed_nii = dev_copy(dev / "flair" / "Subj2_FL.nii.gz", "fixed.nii.gz")
    moving_nii = dev_copy(dev / "t1" / "Subj1_T1.nii.gz", "moving.nii.gz")
    worst = _copies_register_as_the_nifti(fixed_nii, moving_nii, tmp_path, convex_range_mm=12.0)
    assert max(worst.values()) < 0.01, worst
