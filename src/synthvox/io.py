"""The only module that reads or writes image files (NIfTI through nibabel).

Every reader checks its input and raises :class:`synthvox.errors.InputError` with a one-line message
for a user's mistake; every writer writes to a temporary file beside the target and renames it into
place, so an output is never half-written, and refuses to overwrite unless ``force`` is set.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from synthvox.errors import InputError
from synthvox.volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: Refuse volumes above this many voxels per channel (about 4 GB as float32 for one channel).
MAX_VOXELS = 1024**3


def is_nifti_path(path: str | os.PathLike) -> bool:
    name = str(path).lower()
    return name.endswith(NIFTI_SUFFIXES)


def load(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = torch.float32,
    labels: bool = False,
    allow_4d: bool = False,
    what: str = "image",
) -> Volume:
    """Read a 3D NIfTI file into a :class:`Volume` of shape ``(1, X, Y, Z)``.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        dtype: tensor dtype for images (ignored for labels, which become ``int64``).
        labels: read as a label map: values must be whole numbers; returned as ``int64``.
        allow_4d: accept a 4D file, whose last axis becomes the channel axis.
        what: a word for error messages (``"fixed image"``, ``"label map"``, ...).

    Raises:
        InputError: missing file, not NIfTI, wrong dimensionality, NaN or infinite values,
            non-integer labels, or a volume too large for memory.
    """
    import nibabel as nib

    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} not found: {p}")
    if p.is_dir():
        raise InputError(f"{what} is a directory, expected a NIfTI file: {p}")
    if not is_nifti_path(p):
        raise InputError(f"{what} is not a NIfTI file (.nii or .nii.gz): {p}")
    try:
        img = nib.load(str(p))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"cannot read {what} {p}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    shape = tuple(int(s) for s in img.shape)
    # Drop trailing singleton dimensions (a 3D image stored as X, Y, Z, 1)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3 or (len(shape) == 3 and min(shape) < 2 and not allow_4d):
        raise InputError(f"{what} must be a 3D volume, got shape {shape} in {p}")
    if len(shape) > 3 and not (allow_4d and len(shape) == 4):
        raise InputError(f"{what} must be a 3D volume, got {len(shape)}D shape {shape} in {p}")
    if int(np.prod(shape[:3])) > MAX_VOXELS:
        raise InputError(f"{what} is too large for memory: {shape} voxels in {p}")
    try:
        arr = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise InputError(f"cannot read the data of {what} {p}: {exc}") from None
    arr = arr.reshape(shape)
    if arr.dtype.kind == "c":
        raise InputError(f"{what} has complex values, expected real numbers: {p}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError(f"{what} contains NaN or infinite values: {p}")
    if len(shape) == 3:
        arr = arr[None]
    else:
        arr = np.moveaxis(arr, -1, 0)
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{what} has an invalid (singular or non-finite) affine: {p}")
    if labels:
        if arr.dtype.kind == "f":
            rounded = np.rint(arr)
            if not np.allclose(arr, rounded, atol=1e-3):
                raise InputError(f"{what} is not a label map (it has non-integer values): {p}")
            arr = rounded
        data = torch.from_numpy(np.ascontiguousarray(arr).astype(np.int64))
        if (data < 0).any():
            raise InputError(f"{what} has negative label ids: {p}")
    else:
        data = torch.from_numpy(np.ascontiguousarray(arr).astype(np.float32))
        if dtype is not None:
            data = data.to(dtype)
    return Volume(data, affine)


def load_labels(path: str | os.PathLike, what: str = "label map") -> Volume:
    """Read a 3D label map (whole-number values) as ``int64``."""
    return load(path, labels=True, what=what)


def check_output(path: str | os.PathLike, force: bool = False, nifti: bool = False) -> Path:
    """Check that ``path`` may be written: refuse an existing file unless ``force``, and with ``nifti``
    a name without a ``.nii``/``.nii.gz`` suffix (so commands can refuse before doing the work)."""
    p = Path(path)
    if nifti and not is_nifti_path(p):
        raise InputError(f"output must be a NIfTI file (.nii or .nii.gz): {p}")
    if p.exists() and not force:
        raise InputError(f"output exists, not overwriting (use --force): {p}")
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(p.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=suffix, dir=p.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs get the usual permissions
    try:
        yield tmp_path
        # writers that replace the file (safetensors) bring back mkstemp's 0600: set it again
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, p)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save(
    vol: Volume | torch.Tensor | np.ndarray,
    path: str | os.PathLike,
    affine: np.ndarray | None = None,
    *,
    labels: bool = False,
    force: bool = False,
    vector: bool = False,
) -> Path:
    """Write a volume to NIfTI atomically, keeping its affine.

    Args:
        vol: a :class:`Volume` (``(C, X, Y, Z)``), or an array with ``affine`` given.
        path: ``.nii`` or ``.nii.gz``.
        affine: the affine when ``vol`` is a bare array.
        labels: store as the smallest integer type that holds the ids.
        force: overwrite an existing file.
        vector: store ``C`` channels as a 5D ``(X, Y, Z, 1, C)`` vector image (NIfTI intent 1007),
            as ITK expects for displacement fields.
    """
    import nibabel as nib

    p = check_output(path, force, nifti=True)
    if isinstance(vol, Volume):
        data, affine = vol.data, vol.affine
    else:
        data = vol
        if affine is None:
            raise ValueError("save() needs an affine for a bare array")
    arr = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"save() takes (C, X, Y, Z) arrays, got {arr.shape}")
    if vector:
        arr = np.moveaxis(arr, 0, -1)[:, :, :, None, :]
    elif arr.shape[0] == 1:
        arr = arr[0]
    else:
        arr = np.moveaxis(arr, 0, -1)
    if labels:
        hi = int(arr.max()) if arr.size else 0
        lo = int(arr.min()) if arr.size else 0
        dt = np.uint8 if lo >= 0 and hi < 256 else (np.int16 if -32768 <= lo and hi < 32768 else np.int32)
        arr = arr.astype(dt)
    elif arr.dtype == np.float64 or arr.dtype == np.float16 or arr.dtype.kind != "f":
        arr = arr.astype(np.float32)
    img = nib.Nifti1Image(arr, np.asarray(affine, np.float64))
    img.header.set_qform(np.asarray(affine, np.float64), code=1)
    img.header.set_sform(np.asarray(affine, np.float64), code=1)
    img.header.set_xyzt_units("mm", "sec")
    if vector:
        img.header.set_intent("vector", (), "")
    with atomic_path(p) as tmp:
        nib.save(img, str(tmp))
    return p
