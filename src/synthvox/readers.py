"""Image files opened by their format, the reading half of :mod:`synthvox.io` (as
:mod:`synthvox.writers` is the writing half): which names are images, and for each family of formats
the header and a reader of the voxels, in synthvox's ``X, Y, Z`` order with the RAS affine as stored.

- NIfTI (``.nii``, ``.nii.gz``) and FreeSurfer's MGH (``.mgh``, ``.mgz``) through nibabel;
- NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``) and a folder holding one DICOM series
  through SimpleITK, whose LPS direction x spacing and origin become the RAS affine.

:func:`synthvox.io.load` checks and converts what is opened here; :func:`grid` gives the grid from the
header alone, as :func:`synthvox.io.load` would (the writers read their output back through it).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from synthvox.errors import InputError
from synthvox.itk import itk_error, itk_quiet, simpleitk
from synthvox.volume import check_affine

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: Image files :func:`synthvox.io.load` reads with nibabel (NIfTI, FreeSurfer's MGH and its gzipped MGZ).
NIBABEL_SUFFIXES = (*NIFTI_SUFFIXES, ".mgz", ".mgh")
#: Image files :func:`synthvox.io.load` reads with SimpleITK (NRRD with attached or detached header, MetaImage).
SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = NIBABEL_SUFFIXES + SITK_SUFFIXES
#: The formats :func:`synthvox.io.load` reads, as the one-line errors name them.
ACCEPTED_FORMATS = ("NIfTI (.nii, .nii.gz), MGZ/MGH (.mgz, .mgh), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) "
                    "or a folder holding one DICOM series")


def is_nifti_path(path: str | os.PathLike) -> bool:
    name = str(path).lower()
    return name.endswith(NIFTI_SUFFIXES)


def is_image_path(path: str | os.PathLike) -> bool:
    """Whether the name of a file is one of the formats :func:`synthvox.io.load` reads (DICOM series
    are folders)."""
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def image_stem(path: str | os.PathLike) -> str:
    """A file's name without its image suffix (``scan.nii.gz`` -> ``scan``); a folder's name as it is."""
    name = Path(path).name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _not_a_format(what: str, p: Path) -> InputError:
    return InputError(f"{what} is not in a format synthvox reads ({ACCEPTED_FORMATS}): {p}")


def _unreadable(what: str, p: Path, why: str) -> InputError:
    return InputError(f"cannot read {what} {p} ({why}); synthvox reads {ACCEPTED_FORMATS}")


def check_image_path(path: str | os.PathLike, what: str = "image") -> Path:
    """Refuse, with one line naming :data:`ACCEPTED_FORMATS`, a path :func:`synthvox.io.load` cannot
    read: missing, another suffix, or a folder that holds no DICOM series (reads no voxel data; checks
    before slow work)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} not found: {p}")
    if p.is_dir():
        _dicom_files(p, what)
    elif not is_image_path(p):
        raise _not_a_format(what, p)
    return p


@dataclasses.dataclass
class Opened:
    """An image file opened without its voxels: shape as ``(X, Y, Z[, C])``, the affine as stored
    (RAS, unchecked) and the reader of the voxels in that axis order."""

    shape: tuple[int, ...]
    affine: np.ndarray
    read: Callable[[], np.ndarray]


def open_image(p: Path, what: str) -> Opened:
    """Open ``p`` by its format (see :data:`ACCEPTED_FORMATS`); reads the header only, except for a DICOM series."""
    if not p.exists():
        raise InputError(f"{what} not found: {p}")
    if p.is_dir():
        return _open_dicom(p, what)
    if not is_image_path(p):
        raise _not_a_format(what, p)
    if str(p).lower().endswith(NIBABEL_SUFFIXES):
        import nibabel as nib

        try:
            img = nib.load(str(p))
        except Exception as exc:  # nibabel raises many types for corrupt files
            raise _unreadable(what, p, first_line(exc)) from None
        return Opened(tuple(int(s) for s in img.shape), np.asarray(img.affine, np.float64),
                      lambda: np.asanyarray(img.dataobj))
    sitk = simpleitk(f"reading {p.name}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        with itk_quiet(sitk):
            reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _unreadable(what, p, itk_error(exc)) from None
    dim = reader.GetDimension()
    size = tuple(int(s) for s in reader.GetSize())
    comps = int(reader.GetNumberOfComponents())
    affine = _ras_affine(reader.GetDirection(), reader.GetSpacing(), reader.GetOrigin(), dim)

    def read() -> np.ndarray:
        try:
            with itk_quiet(sitk):
                image = reader.Execute()
        except RuntimeError as exc:
            raise InputError(f"cannot read the data of {what} {p}: {itk_error(exc)}") from None
        return _xyz_array(sitk.GetArrayFromImage(image), dim)

    return Opened(size + ((comps,) if comps > 1 else ()), affine, read)


def _ras_affine(direction: tuple[float, ...], spacing: tuple[float, ...], origin: tuple[float, ...],
                dim: int) -> np.ndarray:
    """The RAS voxel-to-world affine of an ITK image (direction x spacing and origin, in LPS); an image
    of 2 dimensions gets a third axis of 1 mm, one of 4 or more its first 3 (the 4th is time or channels)."""
    n = min(dim, 3)
    d = np.eye(3)
    d[:n, :n] = np.asarray(direction, np.float64).reshape(dim, dim)[:n, :n]
    s = np.ones(3)
    s[:n] = np.asarray(spacing, np.float64)[:n]
    o = np.zeros(3)
    o[:n] = np.asarray(origin, np.float64)[:n]
    lps = np.eye(4)
    lps[:3, :3] = d * s
    lps[:3, 3] = o
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _xyz_array(arr: np.ndarray, dim: int) -> np.ndarray:
    """SimpleITK's array (axes reversed: ``Z, Y, X`` then components) in ``X, Y, Z[, C]`` order."""
    order = list(range(dim))[::-1] + list(range(dim, arr.ndim))
    return arr.transpose(order)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text (its type's name when it has none), for a one-line error."""
    return str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__


def _dicom_files(p: Path, what: str) -> list[str]:
    """The files of the one DICOM series in folder ``p``, in slice order (GDCM's), or a one-line error."""
    sitk = simpleitk(f"reading the DICOM series {p}")
    try:
        with itk_quiet(sitk):
            ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p))
            files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(p), ids[0])) if len(ids) == 1 else []
    except RuntimeError as exc:
        raise InputError(f"cannot read {what} {p}: {itk_error(exc)}") from None
    if not ids:
        raise InputError(f"{what} is a folder without a DICOM series; expected {ACCEPTED_FORMATS}: {p}")
    if len(ids) > 1:
        raise InputError(f"{what} folder holds {len(ids)} DICOM series; give a folder that holds one: {p}")
    return files


def is_dicom_series(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder that holds a DICOM series (one :func:`synthvox.io.load` reads as an
    image)."""
    p = Path(path)
    if not p.is_dir():
        return False
    try:
        import SimpleITK as sitk
    except ImportError:  # then no DICOM series can be read: the folder is what it otherwise is
        return False
    try:
        with itk_quiet(sitk):
            return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p)))
    except RuntimeError:
        return False


def _open_dicom(p: Path, what: str) -> Opened:
    """Read the DICOM series in folder ``p`` with SimpleITK (GDCM): slices sorted along their normal,
    rescale slope and intercept applied; refuses slices that are not evenly spaced."""
    sitk = simpleitk(f"reading the DICOM series {p}")
    files = _dicom_files(p, what)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        with itk_quiet(sitk):  # uneven slices are refused below, in one line
            image = reader.Execute()
    except RuntimeError as exc:
        raise _unreadable(what, p, itk_error(exc)) from None
    if len(files) > 2:
        _check_slice_spacing(reader, len(files), what, p)
    dim = image.GetDimension()
    arr = _xyz_array(sitk.GetArrayFromImage(image), dim)
    return Opened(tuple(int(s) for s in arr.shape),
                  _ras_affine(image.GetDirection(), image.GetSpacing(), image.GetOrigin(), dim), lambda: arr)


def _check_slice_spacing(reader, n: int, what: str, p: Path) -> None:  # noqa: ANN001 - a SimpleITK reader
    """Refuse a series whose slice positions (ImagePositionPatient along the slice normal) are not
    evenly spaced within 1% (a missing slice, a gap): one spacing for all would misplace them."""
    try:
        pos = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")] for i in range(n)])
        cos = [float(v) for v in reader.GetMetaData(0, "0020|0037").split("\\")]
    except (RuntimeError, ValueError):
        return  # no positions (not a slice stack): nothing to check
    normal = np.cross(cos[:3], cos[3:6])
    steps = np.diff(pos @ normal)
    if steps.size and np.abs(steps - steps.mean()).max() > 0.01 * max(abs(steps.mean()), 1e-6):
        raise InputError(f"{what} has unevenly spaced slices ({abs(steps).min():.4g} to {abs(steps).max():.4g} mm "
                         f"apart: a missing slice?): {p}")


def grid(path: str | os.PathLike, what: str = "image") -> tuple[tuple[int, ...], np.ndarray]:
    """The spatial shape and voxel-to-world affine of an image from its header alone (no data read; a
    DICOM series is read whole), as :func:`synthvox.io.load` would give them: for checking many files'
    grids before any work (a batch of pairs), and for the writers to read back what they wrote.

    Raises:
        InputError: missing file, another format (see :data:`ACCEPTED_FORMATS`), an unreadable header,
            or an unusable affine.
    """
    p = Path(path)
    opened = open_image(p, what)
    shape = opened.shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape[:3], check_affine(opened.affine, what, p)

