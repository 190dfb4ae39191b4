"""Writing a registration's outputs: one :func:`save` that ``synthvox register``, ``synthvox demo`` and
Python users share, so a script gets exactly what the command writes.

Files (all on FIXED's grid unless said otherwise; fields in the ITK/ANTs convention: LPS, mm):

* ``moved.nii.gz``: MOVING resampled onto FIXED's grid;
* ``warp.nii.gz``: the whole fixed -> moving map as one displacement field (``antsApplyTransforms -t
  warp.nii.gz`` or SimpleITK's ``DisplacementFieldTransform`` reproduces ``moved.nii.gz``);
* ``affine.txt``: the initial and affine stages as an ITK ``AffineTransform_double_3_3`` text file
  (read by antsApplyTransforms, Slicer, SimpleITK's ``ReadTransform``);
* ``deformable_warp.nii.gz``: the deformable stage alone, applied before ``affine.txt``:
  ``antsApplyTransforms -t deformable_warp.nii.gz -t affine.txt`` equals ``-t warp.nii.gz``;
* ``inverse_warp.nii.gz``: on MOVING's grid, the moving -> fixed map (moves FIXED onto MOVING);
* ``moved_labels.nii.gz`` (when moving labels were given), ``qc.png``, ``report.json``;
* ``jacobian.nii.gz`` (when the result holds it: ``register(..., jacobian=True)``, ``--jacobian``): the
  Jacobian determinant of the whole map; its share of values ``<= 0`` is the report's folding %.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from synthvox.registration.warp import RAS_TO_LPS

#: Every file :func:`save` may write, in order.
OUTPUTS = ("moved.nii.gz", "warp.nii.gz", "affine.txt", "deformable_warp.nii.gz", "inverse_warp.nii.gz",
           "moved_labels.nii.gz", "jacobian.nii.gz", "qc.png", "report.json")


def output_names(has_labels: bool, has_jacobian: bool = False) -> list[str]:
    """The files :func:`save` writes for a result with (or without) moved labels (and the Jacobian)."""
    return [n for n in OUTPUTS if (n != "moved_labels.nii.gz" or has_labels) and (n != "jacobian.nii.gz" or has_jacobian)]


def itk_affine_text(world_affine: np.ndarray) -> str:
    """An ITK transform file for a fixed-world to moving-world (RAS) 4x4 matrix.

    ITK works in LPS: with ``P = diag(-1, -1, 1)`` the transform is ``p -> (P A P) p + P t``, written
    with a zero centre, so ``FixedParameters`` are zeros.
    """
    w = np.asarray(world_affine, np.float64)
    p = np.diag(RAS_TO_LPS)
    a = p @ w[:3, :3] @ p
    t = p @ w[:3, 3]
    params = " ".join(f"{v:.17g}" for v in [*a.reshape(-1), *t])
    return ("#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
            f"Parameters: {params}\nFixedParameters: 0 0 0\n")


#: gzip level of the float volumes (moved image, fields, Jacobian): 0, stored. Their noisy float32 values
#: shrink by about 11% at level 1, for 5x the writing time (0.8 s per field of a 2 mm brain); label
#: maps keep nibabel's level 1, which shrinks them many times over.
FLOAT_COMPRESSION = 0


def _run_side_by_side(tasks: list[Callable[[], object]]) -> None:
    """Run ``tasks`` on a few threads; the first error is raised once all have stopped."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(3, os.cpu_count() or 1))) as pool:
        futures = [pool.submit(t) for t in tasks]
    for f in futures:
        f.result()


def save(result: Any, out: str | Path, *, force: bool = False, title: str | None = None) -> list[Path]:
    """Write a :class:`~synthvox.registration.RegistrationResult` into the folder ``out``.

    The files are written side by side into a staging folder (``report.json`` last) and moved into
    ``out`` together, and an existing output is refused unless ``force`` (before anything is written).

    Args:
        result: what :func:`synthvox.registration.register` returned.
        out: the output folder (created when missing).
        force: overwrite existing outputs.
        title: the QC picture's title.

    Returns:
        The paths written.

    Raises:
        InputError: outputs exist (without ``force``), or the folder cannot be written.
    """
    from synthvox import io
    from synthvox.errors import InputError
    from synthvox.registration.qc import qc_png_bytes

    out = Path(out)
    names = output_names(result.moved_labels is not None, getattr(result, "jacobian", None) is not None)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out must be a directory, but a file is there: {out}")
    if out.is_dir() and not force and any((out / n).exists() for n in names):
        raise InputError(f"output directory {out} already holds outputs (use --force to overwrite)")
    io.check_writable(out)
    report = json.dumps(result.report, indent=2, allow_nan=True)
    affine_txt = itk_affine_text(result.world_affine)

    def qc_png() -> bytes:
        return qc_png_bytes(result.fixed, result.moved, title=title or "registration", fixed_labels=result.fixed_labels,
                            moved_labels=result.moved_labels, label_names=result.report.get("label_names"),
                            dice=result.report.get("dice"))

    # everything into a staging folder first, then moved into place: an error or Ctrl-C leaves no
    # part of a set of outputs. The files are written side by side (gzip and PNG encoding release the
    # GIL); float volumes are stored uncompressed inside their .nii.gz (FLOAT_COMPRESSION)
    with io.staging_dir(out) as stage:
        writes: list[Callable[[], object]] = [
            lambda: (stage / "qc.png").write_bytes(qc_png()),
            lambda: io.save(result.inverse_warp, stage / "inverse_warp.nii.gz", force=True, vector=True,
                            compress_level=FLOAT_COMPRESSION),
            lambda: io.save(result.warp, stage / "warp.nii.gz", force=True, vector=True, compress_level=FLOAT_COMPRESSION),
            lambda: io.save(result.deformable_warp, stage / "deformable_warp.nii.gz", force=True, vector=True,
                            compress_level=FLOAT_COMPRESSION),
            lambda: io.save(result.moved, stage / "moved.nii.gz", force=True, compress_level=FLOAT_COMPRESSION),
            lambda: (stage / "affine.txt").write_text(affine_txt),
        ]
        if result.moved_labels is not None:
            writes.append(lambda: io.save(result.moved_labels, stage / "moved_labels.nii.gz", labels=True, force=True))
        if getattr(result, "jacobian", None) is not None:
            writes.append(lambda: io.save(result.jacobian, stage / "jacobian.nii.gz", force=True,
                                          compress_level=FLOAT_COMPRESSION))
        _run_side_by_side(writes)
        (stage / "report.json").write_text(report)
    return [out / n for n in names]
