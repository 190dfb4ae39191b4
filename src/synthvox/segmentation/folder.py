"""Segmenting files and folders: ``synthvox segment IMAGE --out SEG`` and ``synthvox segment -i DIR -o DIR``.

A folder is segmented nnU-Net style: every image file in it (not its subfolders; NIfTI, MGZ/MGH,
NRRD, MHA/MHD) gets a label map of the same name in the output folder, ``NAME.nii.gz`` for an image
in another format (``scan.nrrd`` -> ``scan.nii.gz``): outputs are NIfTI. A DICOM series is a folder,
so it is one image (``synthvox segment SERIES_DIR --out SEG``), never one of a folder's images.
Everything that can be refused is refused before any work (no images, an output folder that is a
file or is the input folder, outputs that exist without ``force``, two images that would write one
label map); each label map is written atomically, so an interrupted or failed run leaves complete
label maps and nothing half-written.

A folder run resumes and splits like ``register --pairs``: each label map carries its record (quality
figure, labels present, seconds) in a NIfTI comment extension of its header, so an image whose
outputs are all there with that record is finished and skipped on a rerun (``force`` redoes it);
``num_parts``/``part_id`` segment one deterministic share of the images (every ``num_parts``-th from
``part_id``); an image that fails leaves its one-line error in ``NAME.error.txt`` beside where its label
map would be, the run goes on (and raises at the end, naming it), and the next run tries it again.
Every folder run ends by writing ``quality.csv`` for all the images from what is on disk, so one
plain run after all the shares gives the table of the whole folder.

What segments one image is a :data:`Segmenter`, any callable from an image :class:`Volume` to its
:class:`~synthvox.segmentation.result.Segmentation` (or a bare label-map :class:`Volume`) on the
image's grid: :func:`model_segmenter` makes one from a finetuned model directory; others (atlases, a
model plus atlases) plug into the same loop. With ``probabilities`` each label map gets its
per-label probability maps beside it (``NAME_probabilities.nii.gz`` and ``NAME_probabilities.json``);
a folder run writes ``quality.csv``, one row per image, worst quality figure first.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from synthvox.errors import InputError
from synthvox.files import atomic_path
from synthvox.segmentation.result import Segmentation, as_segmentation
from synthvox.volume import Volume

#: One image in, its segmentation (or label map) on the image's grid out.
Segmenter = Callable[[Volume], "Segmentation | Volume"]

#: The table of a folder run: one row per image, worst quality figure first.
QUALITY_TABLE = "quality.csv"
#: A failed image's one-line error: ``NAME.error.txt`` beside where its label map would be.
ERROR_SUFFIX = ".error.txt"
#: The key of a label map's record in its header's comment extension.
RECORD_KEY = "synthvox_segment"


@dataclass(frozen=True)
class Segmented:
    """One label map that :func:`segment_files` wrote."""

    image: Path
    output: Path
    labels_present: list[int]
    seconds: float
    quality: float | None = None
    measure: str = ""
    status: str = "done"  #: ``done``, ``failed`` (with ``error``) or ``pending`` (not segmented yet)
    error: str = ""


def error_path(out_path: Path) -> Path:
    """Where a failed image's one-line error goes."""
    return Path(out_path).with_name(Path(out_path).name + ERROR_SUFFIX)


def _record_text(d: Segmented) -> str:
    import json

    return json.dumps({RECORD_KEY: {"image": d.image.name, "quality": d.quality, "measure": d.measure,
                                    "labels_present": d.labels_present, "seconds": round(d.seconds, 3)}})


def read_record(image: Path, out_path: Path) -> Segmented | None:
    """The record a folder run wrote into a label map's header (``None``: no label map, or not ours)."""
    import json

    from synthvox.io import read_comment

    if not Path(out_path).is_file():
        return None
    text = read_comment(out_path)
    try:
        rec = json.loads(text)[RECORD_KEY] if text else None
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(rec, dict):
        return None
    return Segmented(Path(image), Path(out_path), [int(i) for i in rec.get("labels_present", [])],
                     float(rec.get("seconds", 0.0)), rec.get("quality"), str(rec.get("measure", "")))


def is_finished(image: Path, out_path: Path, probabilities: bool) -> bool:
    """Every file of the image is there and its label map carries the record of a folder run."""
    return all(p.is_file() for p in outputs_of(out_path, probabilities)) and read_record(image, out_path) is not None


def outputs_of(out_path: Path, probabilities: bool) -> list[Path]:
    """Every file one image's segmentation writes: the label map, and with ``probabilities`` its maps and their ids."""
    from synthvox.segmentation.result import probabilities_path, probabilities_sidecar

    return [out_path, probabilities_path(out_path), probabilities_sidecar(out_path)] if probabilities else [out_path]


def model_segmenter(
    model: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    tta: bool | Sequence[int] = False,
    overlap: float = 0.5,
    probabilities: bool = False,
) -> Segmenter:
    """A :data:`Segmenter` from a finetuned model directory, loaded once for all the images
    (with ``probabilities``, its results carry the per-label probability maps).

    Raises:
        InputError: ``model`` is not a segmentation model directory.
    """
    from synthvox.segmentation.infer import predict
    from synthvox.segmentation.modeldir import load_model_dir

    net, meta = load_model_dir(model, device)

    def segmenter(image: Volume) -> Segmentation:
        return predict(net, meta, image, device=device, tta=tta, overlap=overlap, probabilities=probabilities)

    return segmenter


def nifti_images(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (hidden files left out), sorted by name: every format
    :func:`synthvox.io.load` reads as a file (NIfTI, MGZ/MGH, NRRD, MHA/MHD); a DICOM series, a folder
    itself, is not one of them (segment it as one image: ``synthvox segment SERIES_DIR --out SEG``)."""
    from synthvox.readers import is_image_path

    return sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".") and is_image_path(p))


def label_map_name(image: Path) -> str:
    """The label map's name in the output folder: the image's own for NIfTI, ``NAME.nii.gz`` for the
    other formats (``scan.nrrd`` -> ``scan.nii.gz``): outputs are NIfTI."""
    from synthvox.readers import image_stem, is_nifti_path

    return image.name if is_nifti_path(image) else image_stem(image) + ".nii.gz"


def folder_outputs(in_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[tuple[Path, Path]]:
    """``(image, label map)`` for every image of ``in_dir``, after checking both folders.

    Raises:
        InputError: ``in_dir`` is not a folder or holds no NIfTI image; ``out_dir`` is a file, looks
            like a file name, or is ``in_dir``.
    """
    from synthvox.writers import suffix_of

    src, dst = Path(in_dir), Path(out_dir)
    if not src.is_dir():
        raise InputError(f"input folder not found: {src}")
    if dst.exists() and not dst.is_dir():
        raise InputError(f"output folder is a file: {dst} (with a folder of images, --out is a folder)")
    if not dst.exists() and suffix_of(dst) is not None:
        raise InputError(f"with a folder of images, --out is a folder, not an image file name: {dst}")
    if dst.exists() and dst.resolve() == src.resolve():
        raise InputError(f"the output folder is the input folder {src}: the label maps would replace the images")
    images = nifti_images(src)
    if not images:
        from synthvox.readers import IMAGE_SUFFIXES, is_dicom_series

        series = " (it holds a DICOM series: give it as IMAGE to segment it as one image)" if is_dicom_series(src) else ""
        raise InputError(f"no images ({', '.join('*' + s for s in IMAGE_SUFFIXES)}) in {src}{series}")
    names: dict[str, Path] = {}
    for p in images:
        other = names.setdefault(label_map_name(p), p)
        if other != p:
            raise InputError(f"{other.name} and {p.name} in {src} would both write {label_map_name(p)}: rename one")
    return [(p, dst / label_map_name(p)) for p in images]


def folder_jobs(
    in_dir: str | os.PathLike, out_dir: str | os.PathLike, force: bool = False, probabilities: bool = False,
    *, num_parts: int = 1, part_id: int = 0,
) -> list[tuple[Path, Path]]:
    """``(image, label map to write)`` for every image of ``in_dir`` in share ``part_id`` of ``num_parts``
    that is not finished yet (all of the share with ``force``); checks everything before any work
    (every file each image writes, see :func:`outputs_of`, and the folder's :data:`QUALITY_TABLE`).

    Raises:
        InputError: ``in_dir`` is not a folder or holds no NIfTI image; ``out_dir`` is a file, looks
            like a file name, is ``in_dir`` or cannot be written; an output of an unfinished image
            exists (without ``force``) or is a folder; a share that does not exist.
    """
    from synthvox.io import check_writable
    from synthvox.registration.batch import share

    dst = Path(out_dir)
    mine = share(folder_outputs(in_dir, out_dir), num_parts, part_id)
    jobs = [(i, o) for i, o in mine if force or not is_finished(i, o, probabilities)]
    outputs = [f for _, o in jobs for f in outputs_of(o, probabilities)] + [dst / QUALITY_TABLE]
    folders = [o for o in outputs if o.is_dir()]
    if folders:
        raise InputError(f"output is a directory, expected a file name: {folders[0]}")
    existing = [o for o in outputs[:-1] if o.exists()]
    if existing and not force:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise InputError(f"output exists, not overwriting (use --force): {existing[0]}{more}")
    check_writable(dst)
    return jobs


def segment_files(
    jobs: Sequence[tuple[Path, Path]],
    segmenter: Segmenter,
    *,
    progress: bool | None = None,
    out_dir: str | os.PathLike | None = None,
    probabilities: bool = False,
    table_jobs: Sequence[tuple[Path, Path]] | None = None,
) -> list[Segmented]:
    """Read each image, segment it and write its label map atomically (``jobs`` already checked).

    Args:
        jobs: ``(image, output)`` pairs, from :func:`folder_jobs` or checked by the caller.
        segmenter: what segments one image.
        progress: a progress bar over the files on stderr (``None``: only on a terminal).
        out_dir: the output folder of a folder run: removed again when this call made it and wrote
            nothing into it; an image that fails there is recorded (``NAME.error.txt``) and the run
            goes on; at the end :data:`QUALITY_TABLE` is written into it for ``table_jobs``.
        probabilities: also write each image's probability maps (the segmenter must give them).
        table_jobs: every ``(image, output)`` of the folder, for the table (default: ``jobs``), so a
            resumed or sharded run's table covers all the images from what is on disk.

    Returns:
        What was written, in order.

    Raises:
        InputError: an image that cannot be read (named), or whatever ``segmenter`` refuses; in a
            folder run, after the others are done and the table written, naming the failed images.
            The label maps written before stay; none is half-written.
    """
    from tqdm.auto import tqdm

    from synthvox import io
    from synthvox.registration.batch import one_line

    done: list[Segmented] = []
    failed: dict[str, str] = {}
    bar = tqdm(total=len(jobs), desc="segment", unit="image", file=sys.stderr, dynamic_ncols=True,
               disable=None if progress is None else not progress)
    try:
        with io.cleanup_on_failure(out_dir, keep=lambda: bool(done or failed)) if out_dir is not None else contextlib.nullcontext():
            for image_path, out_path in jobs:
                bar.set_postfix_str(Path(image_path).name, refresh=False)
                try:
                    done.append(_segment_one(Path(image_path), Path(out_path), segmenter, probabilities))
                except Exception as exc:  # in a folder run one image's failure is recorded, the run goes on
                    if out_dir is None:
                        raise
                    failed[Path(image_path).name] = one_line(exc)
                    with atomic_path(error_path(out_path)) as tmp:
                        tmp.write_text(failed[Path(image_path).name] + "\n")
                bar.update(1)
            if out_dir is not None:
                write_quality_table(folder_records(table_jobs if table_jobs is not None else jobs, probabilities),
                                    Path(out_dir) / QUALITY_TABLE)
    finally:
        bar.close()
    if failed:
        name, error = next(iter(failed.items()))
        more = f" and {len(failed) - 1} more" if len(failed) > 1 else ""
        raise InputError(f"{len(failed)} of {len(jobs)} image(s) failed (recorded in {QUALITY_TABLE}): {name}: {error}{more}")
    return done


def _segment_one(image_path: Path, out_path: Path, segmenter: Segmenter, probabilities: bool) -> Segmented:
    """Segment one image and write its files, the label map (with its record) last."""
    from synthvox import io

    t0 = time.perf_counter()
    image = io.load(image_path, what=f"image {image_path.name}")
    seg = as_segmentation(segmenter(image))
    io.check_savable(seg.labels, out_path, labels=True)  # before any file: ids beyond its format's integers
    if probabilities:
        _save_probabilities(seg, out_path)
    ids = sorted(int(i) for i in seg.labels.data.unique().tolist())
    d = Segmented(image_path, out_path, ids, time.perf_counter() - t0, seg.quality, seg.measure)
    io.save(seg.labels, out_path, labels=True, force=True, comment=_record_text(d))
    error_path(out_path).unlink(missing_ok=True)
    return d


def folder_records(jobs: Sequence[tuple[Path, Path]], probabilities: bool = False) -> list[Segmented]:
    """What is on disk for each image: its record (finished), its error (failed), or ``pending``."""
    out = []
    for image, label_map in jobs:
        rec = read_record(image, label_map) if is_finished(image, label_map, probabilities) else None
        if rec is not None:
            out.append(rec)
        elif error_path(label_map).is_file():
            out.append(Segmented(Path(image), Path(label_map), [], 0.0, status="failed",
                                 error=error_path(label_map).read_text(encoding="utf-8").strip()))
        else:
            out.append(Segmented(Path(image), Path(label_map), [], 0.0, status="pending"))
    return out


def _save_probabilities(seg: Segmentation, out_path: Path) -> None:
    import json

    from synthvox import io
    from synthvox.segmentation.result import probabilities_path, probabilities_sidecar

    if seg.probabilities is None:
        raise InputError("this segmenter gives no probability maps (--probabilities needs a model or atlases)")
    io.save(seg.probabilities, probabilities_path(out_path), force=True)
    with atomic_path(probabilities_sidecar(out_path)) as tmp:
        tmp.write_text(json.dumps({"label_ids": list(seg.label_ids), "axis": 3,
                                   "file": probabilities_path(out_path).name}, indent=1) + "\n")


def write_quality_table(done: Sequence[Segmented], path: Path) -> Path:
    """``quality.csv``: image, label map, quality figure, what it measures, labels present, seconds,
    status and error; failed images first, then worst quality first (images without a figure after),
    then those not segmented yet, so a study's failures head the table."""
    import csv

    order = {"failed": 0, "done": 1, "pending": 2}
    rows = sorted(done, key=lambda d: (order.get(d.status, 1), d.quality is None,
                                       d.quality if d.quality is not None else 0.0, d.image.name))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "labels", "quality", "measure", "labels_present", "seconds", "status", "error"])
        for d in rows:
            w.writerow([d.image.name, d.output.name, "" if d.quality is None else f"{d.quality:.4f}", d.measure,
                        " ".join(map(str, d.labels_present)), f"{d.seconds:.2f}" if d.status == "done" else "",
                        d.status, d.error])
    return path


def segment_folder(
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    segmenter: Segmenter,
    *,
    force: bool = False,
    progress: bool | None = None,
    probabilities: bool = False,
    num_parts: int = 1,
    part_id: int = 0,
) -> list[Segmented]:
    """Segment every NIfTI image of ``in_dir`` (of share ``part_id`` of ``num_parts``) not finished yet
    into a label map of the same name in ``out_dir``; ``quality.csv`` covers every image of ``in_dir``.

    >>> from synthvox.segmentation import model_segmenter, segment_folder
    >>> segment_folder("imagesTs", "predictions", model_segmenter("MODEL", device="cuda"))

    See :func:`folder_jobs` for what is refused before any work and :func:`segment_files` for the rest.
    """
    jobs = folder_jobs(in_dir, out_dir, force, probabilities, num_parts=num_parts, part_id=part_id)
    return segment_files(jobs, segmenter, progress=progress, out_dir=out_dir, probabilities=probabilities,
                         table_jobs=folder_outputs(in_dir, out_dir))
