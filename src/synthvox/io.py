"""Reading and writing image files, and the other inputs and outputs of the commands (transforms,
landmarks, output checks, clean-up of a failed command's files).

Every reader checks its input and raises :class:`synthvox.errors.InputError` with a one-line message
for a user's mistake; every writer writes to a temporary file beside the target and renames it into
place, so an output is never half-written, and refuses to overwrite unless ``force`` is set.
:func:`load` checks and converts what :mod:`synthvox.readers` opens in each format (nibabel; SimpleITK
for NRRD, MetaImage, DICOM); :func:`save` checks and prepares what :mod:`synthvox.writers` writes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from synthvox.errors import InputError
from synthvox.files import atomic_path, current_umask
from synthvox.itk import simpleitk
from synthvox.readers import first_line, is_nifti_path, open_image
from synthvox.volume import Volume, check_affine

#: Refuse volumes above this many voxels per channel (about 4 GB as float32 for one channel).
MAX_VOXELS = 1024**3


def load(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = torch.float32,
    labels: bool = False,
    allow_4d: bool = False,
    what: str = "image",
) -> Volume:
    """Read a 3D image into a :class:`Volume` of shape ``(1, X, Y, Z)`` with its RAS affine.

    Formats (:data:`synthvox.readers.ACCEPTED_FORMATS`): NIfTI and MGZ/MGH through nibabel; NRRD, MetaImage and a folder
    holding one DICOM series through SimpleITK (``pip install 'synthvox[formats]'``), whose LPS
    direction x spacing and origin become the RAS affine and whose ``Z, Y, X`` arrays become ``X, Y, Z``.

    Args:
        path: an image file, or a folder holding one DICOM series.
        dtype: tensor dtype for images (ignored for labels, which become ``int64``).
        labels: read as a label map: values must be whole numbers; returned as ``int64``.
        allow_4d: accept a 4D image (or a vector image), whose last axis becomes the channel axis.
        what: a word for error messages (``"fixed image"``, ``"label map"``, ...).

    Raises:
        InputError: missing file, another format, wrong dimensionality, NaN or infinite values,
            non-integer labels, or a volume too large for memory.
    """
    p = Path(path)
    opened = open_image(p, what)
    shape = opened.shape
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
        arr = opened.read()
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot read the data of {what} {p}: {exc}") from None
    arr = arr.reshape(shape)
    if arr.dtype.kind == "c":
        raise InputError(f"{what} has complex values, expected real numbers: {p}")
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{what} has values of type {arr.dtype}, expected numbers: {p}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError(f"{what} contains NaN or infinite values: {p}")
    if len(shape) == 3:
        arr = arr[None]
    else:
        arr = np.moveaxis(arr, -1, 0)
    affine = check_affine(opened.affine, what, p)
    if labels:
        arr = _label_array(arr, what, p)
        data = torch.from_numpy(np.ascontiguousarray(arr))
    else:
        data = torch.from_numpy(_float32_array(arr, what, p))
        if dtype is not None:
            data = data.to(dtype)
    return Volume(data, affine)


#: Largest label id a label map may hold: int64, the dtype label tensors use everywhere.
MAX_LABEL_ID = np.iinfo(np.int64).max
#: Largest magnitude an image intensity may have. Values are float32 once read; below 1e30, their
#: differences and sums over neighbourhoods stay far from float32's maximum of 3.4e38 (a float64
#: file with 1e39 would become infinite, one with 3e38 would overflow at the first difference).
MAX_INTENSITY = 1e30


def _float32_array(arr: np.ndarray, what: str, p: Path) -> np.ndarray:
    """``arr`` as float32, refusing values that float32 cannot hold or compute with."""
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{what} has values of type {arr.dtype}, expected numbers: {p}")
    if arr.size:
        hi = float(np.max(arr))
        lo = float(np.min(arr))
        if max(abs(hi), abs(lo)) > MAX_INTENSITY:
            raise InputError(
                f"{what} has values up to {max(abs(hi), abs(lo)):.3g}, beyond the supported "
                f"±{MAX_INTENSITY:.0e} (float32 arithmetic would overflow): {p}"
            )
    return np.ascontiguousarray(arr, dtype=np.float32)


def _label_array(arr: np.ndarray, what: str, p: Path) -> np.ndarray:
    """``arr`` as int64 label ids, exactly; refuses fractions, negative ids and ids int64 cannot hold."""
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{what} has values of type {arr.dtype}, expected whole numbers: {p}")
    if arr.size == 0:
        return arr.astype(np.int64)
    lo, hi = arr.min(), arr.max()
    if lo < 0:
        raise InputError(f"{what} has negative label ids: {p}")
    # compare as Python numbers: exact for every integer dtype
    if (int(hi) if arr.dtype.kind in "biu" else float(hi)) > MAX_LABEL_ID:
        raise InputError(f"{what} has label ids up to {int(hi)}, above the largest supported id {MAX_LABEL_ID}: {p}")
    if arr.dtype.kind == "f":
        rounded = np.rint(arr)
        if not np.allclose(arr, rounded, atol=1e-3, rtol=0.0):
            raise InputError(f"{what} is not a label map (it has non-integer values): {p}")
        arr = rounded
    return arr.astype(np.int64)


def load_labels(path: str | os.PathLike, what: str = "label map") -> Volume:
    """Read a 3D label map (whole-number values) as ``int64``."""
    return load(path, labels=True, what=what)


#: Transform files :func:`load_transform` reads (through SimpleITK).
TRANSFORM_SUFFIXES = (".txt", ".tfm", ".mat")


def load_transform(path: str | os.PathLike, what: str = "initial transform") -> np.ndarray:
    """Read a linear transform file as a 4x4 fixed-world to moving-world matrix in RAS (synthvox's
    world affines; see :func:`synthvox.volume.itk_to_ras_matrix`).

    Reads, through SimpleITK's ``ReadTransform``: ITK text transforms (``.txt``, ``.tfm``; the
    ``affine.txt`` that ``synthvox register`` writes), ANTs' ``.mat`` (MATLAB v4) affines, and any
    rigid, similarity or affine ITK transform (centre and offset included). The file maps FIXED's points
    to MOVING's, as ``antsApplyTransforms`` reads it.

    Raises:
        InputError: a missing or unreadable file, another suffix, a transform that is not linear.
    """
    from synthvox.volume import check_world_matrix, itk_to_ras_matrix, matrix_of_points

    p = Path(path)
    accepted = "an ITK transform (.txt, .tfm) or an ANTs affine (.mat)"
    if not p.is_file():
        raise InputError(f"{what} not found: {p}" if not p.exists() else f"{what} is not a file: {p}")
    if not p.name.lower().endswith(TRANSFORM_SUFFIXES):
        raise InputError(f"{what} must be {accepted}: {p}")
    sitk = simpleitk(f"reading the {what}")
    try:
        tx = sitk.ReadTransform(str(p))
    except RuntimeError:
        raise InputError(f"cannot read {what} {p}: not {accepted}") from None
    m = matrix_of_points(tx.TransformPoint, f"{what} {p}")
    return check_world_matrix(itk_to_ras_matrix(m), f"{what} {p}")


#: Landmark files :func:`load_points` reads and :func:`save_points` writes.
POINT_SUFFIXES = (".csv", ".fcsv", ".mrk.json")


def load_points(path: str | os.PathLike, what: str = "points") -> tuple[np.ndarray, list[str]]:
    """Read landmarks as ``(N, 3)`` RAS millimetres and their labels (``""`` when none).

    Formats: a CSV of ``x,y,z`` in RAS mm with an optional ``label`` column (a header row naming the
    columns is optional); Slicer's ``.fcsv`` (its ``CoordinateSystem`` line, RAS when absent) and
    Slicer's markups ``.mrk.json`` (``coordinateSystem`` LPS or RAS).

    Raises:
        InputError: a missing file, another suffix, no points, or a row that is not three numbers.
    """
    import csv
    import json

    p = Path(path)
    name = p.name.lower()
    if not p.is_file():
        raise InputError(f"{what} not found: {p}" if not p.exists() else f"{what} is not a file: {p}")
    if not name.endswith(POINT_SUFFIXES):
        raise InputError(f"{what} must be a CSV of x,y,z (RAS mm), a Slicer .fcsv or a .mrk.json: {p}")
    pts: list[list[float]] = []
    labels: list[str] = []
    lps = False
    try:
        if name.endswith(".mrk.json"):
            doc = json.loads(p.read_text(encoding="utf-8"))
            for m in doc.get("markups", []):
                flip = str(m.get("coordinateSystem", "LPS")).upper() == "LPS"
                for cp in m.get("controlPoints", []):
                    x = [float(v) for v in cp["position"]]
                    pts.append([-x[0], -x[1], x[2]] if flip else x)
                    labels.append(str(cp.get("label", "")))
        else:
            text = p.read_text(encoding="utf-8").splitlines()
            if name.endswith(".fcsv"):
                for line in text:
                    if line.startswith("#") and "coordinatesystem" in line.lower().replace(" ", ""):
                        lps = line.split("=")[-1].strip().upper() in ("LPS", "1")
                rows = [r for r in csv.reader(line for line in text if line.strip() and not line.startswith("#"))]
                cols, start = (1, 2, 3, 11), 0
            else:
                rows = [r for r in csv.reader(line for line in text if line.strip())]
                head = [c.strip().lower() for c in rows[0]] if rows else []
                start = 1 if head and all(k in head for k in ("x", "y", "z")) else 0
                cols = ((head.index("x"), head.index("y"), head.index("z"), head.index("label") if "label" in head else -1)
                        if start else (0, 1, 2, 3))
            for r in rows[start:]:
                x = [float(r[c]) for c in cols[:3]]
                pts.append([-x[0], -x[1], x[2]] if lps else x)
                labels.append(r[cols[3]].strip() if 0 <= cols[3] < len(r) else "")
    except (ValueError, IndexError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {what} {p}: each point needs x, y, z numbers ({type(exc).__name__})") from None
    arr = np.asarray(pts, np.float64).reshape(-1, 3)
    if len(arr) == 0:
        raise InputError(f"{what} has no points: {p}")
    if not np.isfinite(arr).all():
        raise InputError(f"{what} has non-finite coordinates: {p}")
    return arr, labels


def save_points(points: np.ndarray, labels: list[str] | None, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write landmarks (``(N, 3)`` RAS mm) as :func:`load_points` reads them: a CSV ``label,x,y,z``,
    or, by the name's suffix, a Slicer ``.fcsv`` or ``.mrk.json`` (both in LPS, as Slicer writes)."""
    import json

    p = check_output(path, force)
    name = p.name.lower()
    if not name.endswith(POINT_SUFFIXES):
        raise InputError(f"points output must end in .csv, .fcsv or .mrk.json: {p}")
    pts = np.asarray(points, np.float64).reshape(-1, 3)
    labels = list(labels) if labels else [""] * len(pts)
    lps = pts * [-1.0, -1.0, 1.0]
    if name.endswith(".mrk.json"):
        doc = {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#",
               "markups": [{"type": "Fiducial", "coordinateSystem": "LPS", "coordinateUnits": "mm",
                            "controlPoints": [{"id": str(i + 1), "label": lab, "position": q.tolist()}
                                              for i, (lab, q) in enumerate(zip(labels, lps))]}]}
        text = json.dumps(doc, indent=2) + "\n"
    elif name.endswith(".fcsv"):
        text = ("# Markups fiducial file version = 4.11\n# CoordinateSystem = LPS\n"
                "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
                + "".join(f"{i + 1},{q[0]:.6f},{q[1]:.6f},{q[2]:.6f},0,0,0,1,1,1,0,{lab},,\n"
                          for i, (lab, q) in enumerate(zip(labels, lps))))
    else:
        text = "label,x,y,z\n" + "".join(f"{lab},{q[0]:.6f},{q[1]:.6f},{q[2]:.6f}\n" for lab, q in zip(labels, pts))
    with atomic_path(p) as tmp:
        tmp.write_text(text)
    return p


def check_output(path: str | os.PathLike, force: bool = False, image: bool = False) -> Path:
    """Check that ``path`` may be written, before any work: refuse an existing file unless ``force``,
    a folder in its place, a place that cannot be written (see :func:`check_writable`), and with
    ``image`` a name in none of the formats :func:`save` writes (one line naming them). The data file
    a detached ``.nhdr``/``.mhd`` header writes beside it is checked as the header is."""
    from synthvox.writers import check_writable_format, companions

    p = Path(path)
    if image:
        check_writable_format(p)
    for q in (p, *companions(p)):
        if q.is_dir():
            raise InputError(f"output is a directory, expected a file name: {q}")
        if q.exists() and not force:
            raise InputError(f"output exists, not overwriting (use --force): {q}")
    check_writable(p.parent)
    return p


def check_writable(folder: str | os.PathLike, what: str = "output") -> Path:
    """Refuse, with one line, a folder that cannot be written; creates nothing.

    ``folder`` need not exist yet: then its nearest existing ancestor must be a directory in which
    files can be created (tested by creating and removing a hidden probe file, which also catches
    read-only file systems and permissions that ``os.access`` misjudges).
    """
    target = Path(folder).absolute()
    anc = target
    while not anc.exists() and anc != anc.parent:
        if anc.is_symlink():  # a dangling link: mkdir would fail on it
            raise InputError(f"cannot write {what} in {target}: {anc} is a broken symbolic link")
        anc = anc.parent
    if not anc.is_dir():
        raise InputError(f"cannot write {what} in {target}: {anc} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".synthvox-write-test.", dir=anc)
    except OSError as exc:
        raise InputError(f"cannot write {what} in {target}: {exc.strerror or exc} ({anc})") from None
    os.close(fd)
    os.unlink(probe)
    return target


def label_dtype(arr: np.ndarray) -> np.dtype:
    """The smallest NIfTI integer type that holds every id of ``arr`` exactly.

    ``uint8``, ``int16``, ``int32`` (the types other tools read most widely), then ``uint32`` and
    ``int64`` for ids that do not fit a 32-bit signed integer (3,000,000,000, say), then ``uint64``.
    """
    if arr.size == 0:
        return np.dtype(np.uint8)
    lo, hi = int(arr.min()), int(arr.max())
    for dt in (np.uint8, np.int16, np.int32, np.uint32, np.int64, np.uint64):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dt)
    raise InputError(f"label ids from {lo} to {hi} do not fit any NIfTI integer type")


def _integral(arr: np.ndarray, p: Path) -> np.ndarray:
    """Floating-point label ids as the smallest integer type, refusing fractions and non-finite values."""
    if not np.isfinite(arr).all():
        raise InputError(f"label map has NaN or infinite values; not writing {p}")
    rounded = np.rint(arr)
    if not np.array_equal(rounded, arr):
        raise InputError(f"label map has non-integer values; not writing {p}")
    if arr.size and (rounded.min() < np.iinfo(np.int64).min or rounded.max() > np.iinfo(np.uint64).max):
        raise InputError(f"label ids up to {float(np.abs(rounded).max()):.3g} do not fit any NIfTI integer type")
    as_int = rounded.astype(np.uint64) if rounded.size and rounded.min() >= 0 else rounded.astype(np.int64)
    return as_int.astype(label_dtype(as_int))


def missing_dirs(path: str | os.PathLike) -> list[Path]:
    """``path`` and those of its ancestors that do not exist yet, deepest first."""
    missing, d = [], Path(path).absolute()
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    return missing


@contextlib.contextmanager
def cleanup_on_failure(out: str | os.PathLike, keep: Callable[[], bool] = lambda: False) -> Iterator[Path]:
    """On an error, Ctrl-C or SIGTERM inside the block, delete what appeared in the folder ``out``
    during it, and ``out`` and its parents when the block created them, unless ``keep()`` says the
    partial result is worth keeping (a checkpoint to resume from). Entries that were there before
    stay. SIGTERM raises ``SystemExit(143)`` in the block (the default would kill the process
    without any clean-up); code inside may install its own handler meanwhile."""
    import shutil

    target = Path(out).absolute()
    created = missing_dirs(target)
    before = set(target.iterdir()) if target.is_dir() else set()
    try:
        with _sigterm_exits():
            yield target
    except BaseException:
        if not keep():
            for entry in set(target.iterdir()) - before if target.is_dir() else ():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
            _remove_empty(created)
        raise


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """While active (main thread only), SIGTERM raises ``SystemExit(143)``, so clean-ups run."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _remove_empty(dirs: list[Path]) -> None:
    """Remove the folders in ``dirs`` (deepest first) while they are empty."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            break


@contextlib.contextmanager
def staging_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden folder inside ``out`` for a command's outputs; on success move them into ``out``.

    On any error, Ctrl-C or SIGTERM (``kill``; the command then exits with status 143), the staging
    folder is deleted, and so are ``out`` and its parents when this call created them, so a failed
    command leaves nothing behind. The final moves (renames on one file system) run with both
    signals deferred, so ``out`` never gets part of a set of outputs.
    """
    import shutil
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    target = Path(out)
    created = missing_dirs(target)
    ok = False
    with _sigterm_exits():
        try:
            target.mkdir(parents=True, exist_ok=True)
            stage = Path(tempfile.mkdtemp(prefix=".partial.", dir=target))
            try:
                yield stage
                deferred: list[int] = []
                old = {}
                if main:
                    for sig in (signal.SIGINT, signal.SIGTERM):
                        old[sig] = signal.signal(sig, lambda signum, frame: deferred.append(signum))
                try:
                    umask = current_umask()
                    for f in sorted(stage.iterdir()):
                        if f.is_file():
                            os.chmod(f, 0o666 & ~umask)
                        os.replace(f, target / f.name)
                finally:
                    for sig, handler in old.items():
                        signal.signal(sig, handler)
                ok = True
                if signal.SIGTERM in deferred:
                    raise SystemExit(128 + signal.SIGTERM)
                if deferred:
                    raise KeyboardInterrupt
            finally:
                shutil.rmtree(stage, ignore_errors=True)
        finally:
            if not ok:
                _remove_empty(created)


def save(
    vol: Volume | torch.Tensor | np.ndarray,
    path: str | os.PathLike,
    affine: np.ndarray | None = None,
    *,
    labels: bool = False,
    force: bool = False,
    vector: bool = False,
    compress_level: int | None = None,
    comment: str | None = None,
) -> Path:
    """Write a volume atomically, keeping its affine, in the format the name asks for
    (:data:`synthvox.writers.WRITE_FORMATS`; see :mod:`synthvox.writers`).

    Args:
        vol: a :class:`Volume` (``(C, X, Y, Z)``), or an array with ``affine`` given.
        path: ``.nii``, ``.nii.gz``, ``.mgz``, ``.mgh``, ``.nrrd``, ``.nhdr``, ``.mha`` or ``.mhd``
            (NRRD and MetaImage need SimpleITK; ``.nhdr`` and ``.mhd`` write their data beside them).
        affine: the affine when ``vol`` is a bare array.
        labels: store as the smallest integer type that holds the ids exactly (see :func:`label_dtype`;
            MGH holds 32-bit ids at most and refuses larger ones in one line).
        force: overwrite an existing file.
        vector: NIfTI: store ``C`` channels as a 5D ``(X, Y, Z, 1, C)`` vector image (NIfTI intent
            1007), as ITK expects for displacement fields (NRRD and MetaImage store channels as vector
            components anyway, MGH as frames).
        compress_level: gzip level 0-9 for ``.nii.gz`` (default: nibabel's, 1). Noisy float images
            hardly compress: level 0 writes a 128³ float32 volume about 10x faster for a file about
            13% larger (what ``synthvox synth`` uses for its views).
        comment: NIfTI: text stored in the header as a comment extension (code 6), which other readers
            ignore; :func:`read_comment` reads it back from the header alone (other formats: not kept).
    """
    from synthvox import writers

    p = check_output(path, force, image=True)
    arr, affine = _prepared(vol, affine, p, labels)
    if compress_level is not None and not 0 <= int(compress_level) <= 9:
        raise ValueError(f"compress_level must be 0-9, got {compress_level}")
    writers.write(arr, affine, p, labels=labels, vector=vector, compress_level=compress_level, comment=comment)
    return p


def check_savable(vol: Volume, path: str | os.PathLike, *, labels: bool = False) -> None:
    """Raise, writing nothing, the :class:`InputError` that :func:`save` would raise for the values of
    ``vol`` in the format of ``path`` (fractions in a label map, ids beyond MGH's 32-bit integers, values
    beyond float32): for a command that writes several files, before it writes the first."""
    from synthvox.writers import check_values

    p = Path(path)
    arr, _ = _prepared(vol, None, p, labels)
    check_values(arr, p, labels=labels)


def _prepared(vol: Volume | torch.Tensor | np.ndarray, affine: np.ndarray | None, p: Path,
              labels: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(C, X, Y, Z)`` values of the type :func:`save` stores (see there) and the checked affine."""
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
    affine = check_affine(affine, "output", p)
    if labels:
        arr = arr.astype(label_dtype(arr), copy=False) if arr.dtype.kind in "biu" else _integral(arr, p)
    elif arr.dtype != np.float32:
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"save() takes numeric arrays, got {arr.dtype}")
        if arr.size and np.abs(arr).max() > np.finfo(np.float32).max:
            raise InputError(f"values up to {float(np.abs(arr).max()):.3g} do not fit float32; not writing {p}")
        arr = arr.astype(np.float32)
    return arr, affine


def load_warp(path: str | os.PathLike, what: str = "warp") -> Volume:
    """Read a displacement field as ``synthvox register`` writes it (ITK/ANTs convention: LPS, mm):
    a 5D vector NIfTI ``(X, Y, Z, 1, 3)``, or 4D with 3 components; returns ``(3, X, Y, Z)`` float32."""
    import nibabel as nib

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} not found: {p}" if not p.exists() else f"{what} is not a file: {p}")
    if not is_nifti_path(p):
        raise InputError(f"{what} is not a NIfTI file (.nii or .nii.gz): {p}")
    try:
        img = nib.load(str(p))
        arr = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise InputError(f"cannot read {what} {p}: {first_line(exc)}") from None
    if arr.ndim == 5 and arr.shape[3] == 1:
        arr = arr[:, :, :, 0, :]
    if arr.ndim != 4 or arr.shape[3] != 3 or arr.dtype.kind not in "biuf":
        raise InputError(f"{what} must be a 3D field of 3-vectors, got shape {arr.shape} in {p}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise InputError(f"{what} contains NaN or infinite values (or values beyond float32): {p}")
    affine = check_affine(img.affine, what, p)
    return Volume(torch.from_numpy(np.ascontiguousarray(np.moveaxis(arr, -1, 0))), affine)


def read_comment(path: str | os.PathLike) -> str | None:
    """The comment extension :func:`save` wrote into a NIfTI header (``None``: none, or not readable)."""
    import nibabel as nib

    try:
        exts = nib.load(str(path)).header.extensions
    except Exception:
        return None
    for ext in exts:
        if ext.get_code() == 6:
            content = ext.get_content()
            return content.decode(errors="replace") if isinstance(content, bytes) else str(content)
    return None
