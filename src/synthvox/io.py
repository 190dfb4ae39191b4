"""The only module that reads or writes image files (nibabel; SimpleITK for NRRD, MetaImage, DICOM).

Every reader checks its input and raises :class:`synthvox.errors.InputError` with a one-line message
for a user's mistake; every writer writes to a temporary file beside the target and renames it into
place, so an output is never half-written, and refuses to overwrite unless ``force`` is set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from synthvox.errors import InputError
from synthvox.volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: Image files :func:`load` reads with nibabel (NIfTI, FreeSurfer's MGH and its gzipped MGZ).
NIBABEL_SUFFIXES = (*NIFTI_SUFFIXES, ".mgz", ".mgh")
#: Image files :func:`load` reads with SimpleITK (NRRD with attached or detached header, MetaImage).
SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = NIBABEL_SUFFIXES + SITK_SUFFIXES
#: The formats :func:`load` reads, as the one-line errors name them.
ACCEPTED_FORMATS = ("NIfTI (.nii, .nii.gz), MGZ/MGH (.mgz, .mgh), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) "
                    "or a folder holding one DICOM series")
#: Refuse volumes above this many voxels per channel (about 4 GB as float32 for one channel).
MAX_VOXELS = 1024**3


def is_nifti_path(path: str | os.PathLike) -> bool:
    name = str(path).lower()
    return name.endswith(NIFTI_SUFFIXES)


def is_image_path(path: str | os.PathLike) -> bool:
    """Whether the name of a file is one of the formats :func:`load` reads (DICOM series are folders)."""
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
    """Refuse, with one line naming :data:`ACCEPTED_FORMATS`, a path :func:`load` cannot read: missing,
    another suffix, or a folder that holds no DICOM series (reads no voxel data; checks before slow work)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} not found: {p}")
    if p.is_dir():
        _dicom_files(p, what)
    elif not is_image_path(p):
        raise _not_a_format(what, p)
    return p


@dataclasses.dataclass
class _Opened:
    """An image file opened without its voxels: shape as ``(X, Y, Z[, C])``, the affine as stored
    (RAS, unchecked) and the reader of the voxels in that axis order."""

    shape: tuple[int, ...]
    affine: np.ndarray
    read: Callable[[], np.ndarray]


def _open_image(p: Path, what: str) -> _Opened:
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
            raise _unreadable(what, p, _first_line(exc)) from None
        return _Opened(tuple(int(s) for s in img.shape), np.asarray(img.affine, np.float64),
                       lambda: np.asanyarray(img.dataobj))
    sitk = _simpleitk(f"reading {p.name}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        with _itk_quiet(sitk):
            reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _unreadable(what, p, _itk_error(exc)) from None
    dim = reader.GetDimension()
    size = tuple(int(s) for s in reader.GetSize())
    comps = int(reader.GetNumberOfComponents())
    affine = _ras_affine(reader.GetDirection(), reader.GetSpacing(), reader.GetOrigin(), dim)

    def read() -> np.ndarray:
        try:
            with _itk_quiet(sitk):
                image = reader.Execute()
        except RuntimeError as exc:
            raise InputError(f"cannot read the data of {what} {p}: {_itk_error(exc)}") from None
        return _xyz_array(sitk.GetArrayFromImage(image), dim)

    return _Opened(size + ((comps,) if comps > 1 else ()), affine, read)


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


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__


def _itk_error(exc: BaseException) -> str:
    """The useful line of an ITK exception (its text starts with the source file and line)."""
    lines = [s.strip() for s in str(exc).splitlines() if s.strip()]
    for line in lines:
        if line.lower().startswith("description:"):
            return line.split(":", 1)[1].strip()
    text = lines[-1] if lines else type(exc).__name__
    return text.removeprefix("sitk::ERROR:").strip()


@contextlib.contextmanager
def _itk_quiet(sitk) -> Iterator[None]:  # noqa: ANN001 - the module
    """ITK's multi-line warnings off while reading (what matters is refused in one line instead)."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _dicom_files(p: Path, what: str) -> list[str]:
    """The files of the one DICOM series in folder ``p``, in slice order (GDCM's), or a one-line error."""
    sitk = _simpleitk(f"reading the DICOM series {p}")
    try:
        with _itk_quiet(sitk):
            ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p))
            files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(p), ids[0])) if len(ids) == 1 else []
    except RuntimeError as exc:
        raise InputError(f"cannot read {what} {p}: {_itk_error(exc)}") from None
    if not ids:
        raise InputError(f"{what} is a folder without a DICOM series; expected {ACCEPTED_FORMATS}: {p}")
    if len(ids) > 1:
        raise InputError(f"{what} folder holds {len(ids)} DICOM series; give a folder that holds one: {p}")
    return files


def is_dicom_series(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder that holds a DICOM series (one :func:`load` reads as an image)."""
    p = Path(path)
    if not p.is_dir():
        return False
    try:
        import SimpleITK as sitk
    except ImportError:  # then no DICOM series can be read: the folder is what it otherwise is
        return False
    try:
        with _itk_quiet(sitk):
            return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p)))
    except RuntimeError:
        return False


def _open_dicom(p: Path, what: str) -> _Opened:
    """Read the DICOM series in folder ``p`` with SimpleITK (GDCM): slices sorted along their normal,
    rescale slope and intercept applied; refuses slices that are not evenly spaced."""
    sitk = _simpleitk(f"reading the DICOM series {p}")
    files = _dicom_files(p, what)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        with _itk_quiet(sitk):  # uneven slices are refused below, in one line
            image = reader.Execute()
    except RuntimeError as exc:
        raise _unreadable(what, p, _itk_error(exc)) from None
    if len(files) > 2:
        _check_slice_spacing(reader, len(files), what, p)
    dim = image.GetDimension()
    arr = _xyz_array(sitk.GetArrayFromImage(image), dim)
    return _Opened(tuple(int(s) for s in arr.shape),
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


def load(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = torch.float32,
    labels: bool = False,
    allow_4d: bool = False,
    what: str = "image",
) -> Volume:
    """Read a 3D image into a :class:`Volume` of shape ``(1, X, Y, Z)`` with its RAS affine.

    Formats (:data:`ACCEPTED_FORMATS`): NIfTI and MGZ/MGH through nibabel; NRRD, MetaImage and a folder
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
    opened = _open_image(p, what)
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


def check_affine(affine: np.ndarray, what: str, path: str | os.PathLike | None = None) -> np.ndarray:
    """A 4x4 float64 voxel-to-world affine, or an :class:`InputError` when it is unusable.

    Refuses non-finite entries, a singular or nearly singular 3x3 part (zero, duplicated or
    collinear axes) and voxel sizes outside 1e-6 to 1e6 mm (a nanometre to a kilometre), all of which
    make every later resampling step fail or produce garbage. Readers of images, label maps and
    warps use it, and :func:`save` checks the affine it writes.
    """
    where = f": {path}" if path is not None else ""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise InputError(f"{what} has an invalid (non-finite or malformed) affine{where}")
    lin = a[:3, :3]
    spacing = np.sqrt((lin**2).sum(axis=0))
    if np.any(spacing < 1e-6) or np.any(spacing > 1e6):
        raise InputError(f"{what} has voxel sizes {tuple(float(f'{s:.3g}') for s in spacing)} mm, outside 1e-6 to 1e6 mm{where}")
    # |det| relative to the product of the column norms: 1 for orthogonal axes, 0 for collinear ones
    if abs(np.linalg.det(lin)) < 1e-6 * float(np.prod(spacing)):
        raise InputError(f"{what} has a degenerate (singular) affine: its voxel axes are collinear{where}")
    return a


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


def _simpleitk(why: str):  # noqa: ANN202 - the module
    """SimpleITK, or a one-line :class:`InputError` saying how to install it."""
    try:
        import SimpleITK as sitk
    except ImportError:
        raise InputError(f"{why} needs SimpleITK: pip install 'synthvox[formats]' (or SimpleITK)") from None
    return sitk


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
    sitk = _simpleitk(f"reading the {what}")
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


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask (read by setting and restoring it, under a lock: files may be written from
    several threads at once, and two interleaved reads would leave the umask at 0)."""
    with _UMASK_LOCK:
        umask = os.umask(0)
        os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(p.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=suffix, dir=p.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = _umask()
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs get the usual permissions
    try:
        yield tmp_path
        # writers that replace the file (safetensors) bring back mkstemp's 0600: set it again
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, p)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


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
                    umask = _umask()
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
        raise InputError(f"cannot read {what} {p}: {_first_line(exc)}") from None
    if arr.ndim == 5 and arr.shape[3] == 1:
        arr = arr[:, :, :, 0, :]
    if arr.ndim != 4 or arr.shape[3] != 3 or arr.dtype.kind not in "biuf":
        raise InputError(f"{what} must be a 3D field of 3-vectors, got shape {arr.shape} in {p}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise InputError(f"{what} contains NaN or infinite values (or values beyond float32): {p}")
    affine = check_affine(img.affine, what, p)
    return Volume(torch.from_numpy(np.ascontiguousarray(np.moveaxis(arr, -1, 0))), affine)


def grid(path: str | os.PathLike, what: str = "image") -> tuple[tuple[int, ...], np.ndarray]:
    """The spatial shape and voxel-to-world affine of an image from its header alone (no data read; a
    DICOM series is read whole), as :func:`load` would give them: for checking many files' grids before
    any work (a batch of pairs).

    Raises:
        InputError: missing file, another format (see :data:`ACCEPTED_FORMATS`), an unreadable header,
            or an unusable affine.
    """
    p = Path(path)
    opened = _open_image(p, what)
    shape = opened.shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape[:3], check_affine(opened.affine, what, p)


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
