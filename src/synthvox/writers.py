"""Image files written in the format their name asks for: one writer per family of formats.

:func:`synthvox.io.save` checks the output and prepares the array (channels, label or float types);
the writers here put it on disk, each into a temporary place beside the target that is renamed into
place only when complete (:func:`synthvox.files.atomic_path`, or a temporary folder for the formats
that write a header and a data file), so an output is never half-written:

- NIfTI (``.nii``, ``.nii.gz``) through nibabel, the affine as sform and qform;
- FreeSurfer's MGH (``.mgh``, ``.mgz``) through nibabel (8, 16 and 32-bit integers or float32; a
  multi-channel volume as frames);
- NRRD (``.nrrd``; ``.nhdr`` with its data in ``NAME.raw.gz``) and MetaImage (``.mha``; ``.mhd``
  with ``NAME.zraw``) through SimpleITK, gzip-compressed; the RAS affine becomes ITK's LPS direction,
  spacing and origin, and a multi-channel volume a vector image.

Every non-NIfTI file's header is read back (:func:`synthvox.readers.grid`, as :func:`synthvox.io.load`
reads it) before it is renamed into place, and refused unless it gives the grid and affine it was
given.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from synthvox import files
from synthvox.errors import InputError
from synthvox.itk import itk_error, itk_quiet, simpleitk
from synthvox.readers import grid

NIFTI_WRITE = (".nii", ".nii.gz")
MGH_WRITE = (".mgz", ".mgh")
ITK_WRITE = (".nrrd", ".nhdr", ".mha", ".mhd")
#: Output names :func:`synthvox.io.save` writes, by suffix.
WRITE_SUFFIXES = NIFTI_WRITE + MGH_WRITE + ITK_WRITE
#: The formats an image output may have, as the one-line errors name them.
WRITE_FORMATS = ("NIfTI (.nii, .nii.gz), MGZ/MGH (.mgz, .mgh), NRRD (.nrrd, .nhdr) or MetaImage (.mha, .mhd)")
#: The data file SimpleITK writes beside a detached header (``NAME.nhdr`` -> ``NAME.raw.gz``), compressed.
_DETACHED = {".nhdr": ".raw.gz", ".mhd": ".zraw"}
#: Integer types an MGH file holds (besides float32).
_MGH_INTS = (np.uint8, np.int16, np.int32)


def suffix_of(path: str | os.PathLike) -> str | None:
    """The write suffix of ``path`` (lower case, ``.nii.gz`` before ``.nii``), or ``None``."""
    name = str(path).lower()
    for s in sorted(WRITE_SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return None


def companions(path: str | os.PathLike) -> list[Path]:
    """The other files writing ``path`` makes (the data file of a detached NRRD or MetaImage header)."""
    p = Path(path)
    s = suffix_of(p)
    if s not in _DETACHED:
        return []
    return [p.with_name(p.name[: -len(s)] + _DETACHED[s])]


def check_writable_format(path: str | os.PathLike) -> str:
    """The write suffix of ``path``; one line naming :data:`WRITE_FORMATS` for another name, and for
    NRRD and MetaImage a check that SimpleITK is installed (before any work)."""
    s = suffix_of(path)
    if s is None:
        raise InputError(f"output must be an image file in {WRITE_FORMATS}: {path}")
    if s in ITK_WRITE:
        simpleitk(f"writing {Path(path).name}")
    return s


def write(arr: np.ndarray, affine: np.ndarray, path: Path, *, labels: bool, vector: bool = False,
          compress_level: int | None = None, comment: str | None = None) -> None:
    """Write ``(C, X, Y, Z)`` ``arr`` (already of the type to store) on the grid ``affine`` to ``path``
    by its suffix (checked by the caller); ``vector``, ``compress_level`` and ``comment`` are NIfTI's
    (see :func:`synthvox.io.save`)."""
    s = suffix_of(path)
    if s in NIFTI_WRITE:
        _write_nifti(arr, affine, path, vector=vector, compress_level=compress_level, comment=comment)
    elif s in MGH_WRITE:
        _write_mgh(arr, affine, path, labels=labels)
    elif s in ITK_WRITE:
        _write_itk(arr, affine, path)
    else:
        raise InputError(f"output must be an image file in {WRITE_FORMATS}: {path}")


def _write_nifti(arr: np.ndarray, affine: np.ndarray, p: Path, *, vector: bool, compress_level: int | None,
                 comment: str | None) -> None:
    import nibabel as nib

    if vector:
        data = np.moveaxis(arr, 0, -1)[:, :, :, None, :]
    else:
        data = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    img = nib.Nifti1Image(data, affine, dtype=data.dtype)
    img.header.set_qform(np.asarray(affine, np.float64), code=1)
    img.header.set_sform(np.asarray(affine, np.float64), code=1)
    img.header.set_xyzt_units("mm", "sec")
    if vector:
        img.header.set_intent("vector", (), "")
    if comment is not None:
        img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", comment.encode()))
    with files.atomic_path(p) as tmp:
        if compress_level is not None and str(p).lower().endswith(".gz"):
            import gzip

            with gzip.open(tmp, "wb", compresslevel=int(compress_level)) as f:
                f.write(img.to_bytes())
        else:
            nib.save(img, str(tmp))


def check_values(arr: np.ndarray, p: Path, *, labels: bool) -> None:
    """Refuse, in one line, values the format of ``p`` cannot hold: integers beyond MGH's 32 bits."""
    if suffix_of(p) in MGH_WRITE and arr.dtype.kind in "biu" and arr.dtype not in [np.dtype(t) for t in _MGH_INTS]:
        info = np.iinfo(np.int32)
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo < info.min or hi > info.max:
            what = "label ids" if labels else "values"
            raise InputError(f"{what} from {lo} to {hi} do not fit MGH's 32-bit integers; write {p.name} as "
                             f"NIfTI (.nii.gz) or NRRD (.nrrd) instead: {p}")


def _write_mgh(arr: np.ndarray, affine: np.ndarray, p: Path, *, labels: bool) -> None:
    import nibabel as nib

    check_values(arr, p, labels=labels)
    if arr.dtype.kind in "biu" and arr.dtype not in [np.dtype(t) for t in _MGH_INTS]:
        arr = arr.astype(np.int32)
    data = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    img = nib.MGHImage(np.ascontiguousarray(data), np.asarray(affine, np.float64))
    with files.atomic_path(p) as tmp:
        nib.save(img, str(tmp))
        _check_back(tmp, p, data.shape[:3], affine)


def itk_geometry(affine: np.ndarray) -> tuple[list[float], list[float], list[float]]:
    """ITK's direction (row-major 3x3), spacing and origin, in LPS, of a RAS voxel-to-world ``affine``
    (the inverse of the reader's conversion)."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    return direction.reshape(-1).tolist(), spacing.tolist(), lps[:3, 3].tolist()


def _write_itk(arr: np.ndarray, affine: np.ndarray, p: Path) -> None:
    sitk = simpleitk(f"writing {p.name}")

    if arr.shape[0] == 1:
        image = sitk.GetImageFromArray(np.ascontiguousarray(arr[0].transpose(2, 1, 0)))
    else:  # channels become the components of a vector image, as ITK stores displacement fields
        image = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(3, 2, 1, 0)), isVector=True)
    direction, spacing, origin = itk_geometry(affine)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    image.SetOrigin(origin)
    with _atomic_folder(p) as tmp:
        try:
            with itk_quiet(sitk):
                sitk.WriteImage(image, str(tmp), useCompression=True)
        except RuntimeError as exc:
            raise InputError(f"cannot write {p}: {itk_error(exc)}") from None
        expected = {tmp.name, *(c.name for c in companions(tmp))}
        made = {f.name for f in tmp.parent.iterdir()}
        if made != expected:
            raise RuntimeError(f"SimpleITK wrote {sorted(made)} for {p.name}, expected {sorted(expected)}")
        _check_back(tmp, p, arr.shape[1:], affine)


@contextlib.contextmanager
def _atomic_folder(path: Path) -> Iterator[Path]:
    """Yield ``NAME`` inside a temporary folder beside ``path``; on success move what was written there
    into ``path``'s folder (data files first, the header last: a header is never there without its
    data), else delete it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield stage / path.name
        umask = files.current_umask()
        for f in sorted(stage.iterdir(), key=lambda f: f.name == path.name):
            os.chmod(f, 0o666 & ~umask)
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _check_back(written: Path, p: Path, shape: tuple[int, ...], affine: np.ndarray) -> None:
    """Refuse a file whose header, read as :func:`synthvox.io.load` reads it, gives another grid than
    ``shape`` and ``affine`` (within a thousandth of a voxel, and float32 precision of the origin)."""
    got_shape, got = grid(written, what="written file")
    a = np.asarray(affine, np.float64)
    spacing = float(np.linalg.norm(a[:3, :3], axis=0).min())
    tol = 1e-3 * spacing + 1e-6 * float(np.abs(a[:3, 3]).max())
    if tuple(got_shape) != tuple(int(v) for v in shape[:3]) or not np.allclose(got, a, rtol=0, atol=tol):
        off = float(np.abs(got - a).max()) if got.shape == a.shape else float("inf")
        raise InputError(f"cannot write {p} as {suffix_of(p)}: its header reads back {off:.3g} mm from the "
                         f"image's affine (shape {tuple(got_shape)}); write NIfTI (.nii.gz) instead")
