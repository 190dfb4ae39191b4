"""``synthvox finetune`` and ``synthvox segment``: few-shot segmentation from one to a few labelled volumes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from synthvox.cli.common import DeviceOption, ForceOption, SeedOption, user_errors

if TYPE_CHECKING:
    import torch

    from synthvox.segmentation import Segmenter


def finetune_command(
    image: list[Path] = typer.Option([], "--image", help="Training image (repeat for several)."),
    label: list[Path] = typer.Option([], "--label", help="Label map of the --image at the same position."),
    out: Path = typer.Option(..., "--out", help="Model directory to write."),
    atlas_image: list[Path] = typer.Option(
        [], "--atlas-image", help="Labelled image (repeat for several), as for segment --atlas-image: instead of --image."),
    atlas_label: list[Path] = typer.Option([], "--atlas-label", help="Label map of the --atlas-image at the same position."),
    unlabelled: list[Path] = typer.Option(
        [], "--unlabelled",
        help="A folder of the study's unlabelled images (any accepted format, as segment -i) or one image (repeatable): "
             "the labelled images are registered onto each and their fused labels trained on as well, each voxel "
             "weighted by the fusion's confidence (kept in MODEL/pseudo/, reused by --resume).",
    ),
    fusion: str | None = typer.Option(None, "--fusion", help="With --unlabelled: how the atlas labels are fused (weighted, the default, or majority)."),
    features: str | None = typer.Option(None, "--features", help="With --unlabelled: registration features (mind, the default, net, both or auto)."),
    min_confidence: float | None = typer.Option(
        None, "--min-confidence", help="With --unlabelled: pseudo-labelled voxels less confident than this weigh 0 in the loss (default 0.5)."),
    init: str = typer.Option("default", "--init", help="default (shipped pretrained weights), random, or a model directory."),
    variant: str = typer.Option("default", "--variant", help="Network variant for --init random (tiny, default, large)."),
    steps: int | None = typer.Option(None, "--steps", help="Optimisation steps (default: 2000 on a GPU; on a CPU a --minutes budget)."),
    minutes: float | None = typer.Option(None, "--minutes", help="Wall-clock budget in minutes instead of --steps (default on a CPU: 30)."),
    train: str = typer.Option("all", "--train", help="Parameters that learn: all, decoder (frozen encoder) or head."),
    val_image: Path | None = typer.Option(
        None, "--val-image",
        help="Held-out image for the Dice check (without it: training volumes held out in turn, or for one volume "
             "a mirrored copy when its labels have no sides, else a training-fit check on an augmented copy).",
    ),
    val_label: Path | None = typer.Option(None, "--val-label", help="Label map of --val-image."),
    patch: int | None = typer.Option(None, "--patch", help="Training patch (and inference window) size, voxels (default: 96 on a GPU, 48 on a CPU)."),
    batch: int = typer.Option(2, "--batch", help="Patches per step."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (AdamW, cosine decay; default: 1e-3 on a GPU, 3e-3 on a CPU)."),
    spacing: float | None = typer.Option(None, "--spacing", help="Training spacing in mm (default: median of the inputs; on a CPU at least 3 mm)."),
    modality: str = typer.Option("auto", "--modality", help="Intensity normalisation: auto, mr or ct."),
    val_every: int | None = typer.Option(None, "--val-every", help="Steps between held-out checks (default: steps/10)."),
    flip: bool = typer.Option(False, "--flip-augment", help="Random flips in augmentation (only for labels without left/right)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out."),
    settings: list[str] = typer.Option([], "--set", help="Augmentation setting KEY=VALUE of AugmentConfig, e.g. p_noise=0 (repeatable)."),
    device: str = DeviceOption,
    seed: int = SeedOption,
    force: bool = ForceOption,
) -> None:
    """Finetune a segmentation network on one to a few labelled volumes (label ids are kept); with
    --unlabelled, also on the atlas segmentation of a study's unlabelled scans (atlas accuracy at network speed).

    Examples: 'synthvox finetune --image a.nii.gz --label a_seg.nii.gz --out MODEL';
    'synthvox finetune --atlas-image a.nii.gz --atlas-label a_seg.nii.gz --atlas-image b.nii.gz
    --atlas-label b_seg.nii.gz --unlabelled study/ --out MODEL', then 'synthvox segment --model MODEL -i study -o seg'.
    """
    import dataclasses

    from synthvox import io
    from synthvox.cli.common import check_at_least, check_number, resolve_device
    from synthvox.config import apply_overrides
    from synthvox.errors import InputError
    from synthvox.segmentation import AugmentConfig, FinetuneConfig, finetune
    from synthvox.segmentation.loop import RUN_ENTRIES
    from synthvox.train.rundir import check_run_dir

    # Every option is checked before any input is read or anything is written. The options left out
    # are not passed: finetune fills them with what suits the device (FinetuneConfig.for_device).
    check_at_least(**{"--steps": (steps, 1), "--batch": (batch, 1), "--patch": (patch, 8), "--val-every": (val_every, 1)})
    if lr is not None:
        check_number("--lr", lr, 0.0, low_open=True)
    if spacing is not None:
        check_number("--spacing", spacing, 0.0, 100.0, low_open=True)
    if minutes is not None:
        check_number("--minutes", minutes, 0.0, 7 * 24 * 60.0, low_open=True)
    augment = apply_overrides(dataclasses.replace(AugmentConfig(), flip=flip), settings, "--set")
    given = {"steps": steps, "minutes": minutes, "patch_size": patch, "lr": lr, "spacing": spacing, "val_every": val_every}
    chosen = dict(init=init, variant=variant, train=train, batch_size=batch, modality=modality.lower(), seed=seed,
                  augment=augment, **{k: v for k, v in given.items() if v is not None})
    if image and atlas_image:
        raise InputError("give the labelled images as --image/--label or as --atlas-image/--atlas-label, not both")
    if label and atlas_label:
        raise InputError("give the label maps as --label (with --image) or as --atlas-label (with --atlas-image), not both")
    spelled = "--atlas-image" if atlas_image or atlas_label else "--image"
    image, label = (atlas_image, atlas_label) if spelled == "--atlas-image" else (image, label)
    tag = "--atlas-label" if spelled == "--atlas-image" else "--label"
    if not image:
        raise InputError("finetuning needs labelled images: --image with --label (or --atlas-image with --atlas-label), repeated for several")
    if len(image) != len(label):
        raise InputError(f"got {len(image)} {spelled} but {len(label)} {tag}: give one label map per image, in the same order")
    if (val_image is None) != (val_label is None):
        raise InputError("--val-image and --val-label go together: give both or neither")
    if not unlabelled:
        given_alone = [n for n, v in (("--fusion", fusion), ("--features", features), ("--min-confidence", min_confidence)) if v is not None]
        if given_alone:
            raise InputError(f"{', '.join(given_alone)} go(es) with --unlabelled (the atlas segmentation of unlabelled scans)")
    fusion, features = fusion or "weighted", features or "mind"
    min_confidence = 0.5 if min_confidence is None else min_confidence
    if unlabelled:
        check_number("--min-confidence", min_confidence, 0.0, 1.0, high_open=True)
        if val_image is not None:
            raise InputError("--val-image goes with plain finetuning: with --unlabelled the checks score the labelled images in turn")
    check_run_dir(out, RUN_ENTRIES, resume, force, what="a model")
    dev = resolve_device(device)
    FinetuneConfig.for_device(dev, **chosen).checked()  # --train, --modality, ...: before any image is read
    scans = _unlabelled_files(unlabelled) if unlabelled else []
    images = [io.load(p, what=f"image {p.name}") for p in image]
    labels = [io.load_labels(p, what=f"label map {p.name}") for p in label]
    if scans:
        model = _distil(image, images, labels, scans, out, fusion, features, min_confidence, dev, resume, force, chosen)
    else:
        val = None
        if val_image is not None and val_label is not None:
            val = (io.load(val_image, what="validation image"), io.load_labels(val_label, what="validation label map"))
        model = finetune(images, labels, out_dir=out, val=val, device=dev, resume=resume, force=force, **chosen)
    from synthvox.segmentation.modeldir import read_meta

    meta = read_meta(model)
    h = meta.history
    pseudo = meta.train.get("pseudo_labels")
    distilled = (f", {len(pseudo['scans'])} pseudo-labelled scans ({pseudo['made']} registered now, {pseudo['reused']} reused)"
                 if isinstance(pseudo, dict) else "")
    typer.echo(f"wrote {model} ({h.get('steps')} steps{distilled}, labels {meta.label_ids}, spacing "
               f"{[round(s, 3) for s in meta.spacing]} mm, {h.get('val_dice_name', 'held-out Dice')} "
               f"{h.get('last_val_dice', float('nan')):.4f}: {h.get('last_val_on', '')})")


def _unlabelled_files(paths: list[Path]) -> list[Path]:
    """The image files that ``--unlabelled`` names: every image of a folder (as ``segment -i``), or the file itself."""
    from synthvox import readers
    from synthvox.errors import InputError
    from synthvox.segmentation.folder import nifti_images

    files: list[Path] = []
    for p in paths:
        if p.is_dir() and not readers.is_dicom_series(p):
            found = nifti_images(p)
            if not found:
                raise InputError(f"--unlabelled: no images ({', '.join('*' + s for s in readers.IMAGE_SUFFIXES)}) in {p}")
            files += found
        else:
            files.append(readers.check_image_path(p, what="unlabelled image"))
    names: dict[str, Path] = {}
    for f in files:
        other = names.setdefault(readers.image_stem(f).lower(), f)
        if other != f:
            raise InputError(f"--unlabelled: {other} and {f} have the same name: their pseudo-labels would share files; rename one")
    return files


def _distil(image_paths: list[Path], images: list, labels: list, scans: list[Path], out: Path, fusion: str, features: str,
            min_confidence: float, device: torch.device, resume: bool, force: bool, chosen: dict) -> Path:
    """``finetune --unlabelled``: every scan read and every option checked, then :func:`~synthvox.segmentation.distill.distil`."""
    from synthvox import io
    from synthvox.readers import image_stem
    from synthvox.registration.network import resolve_features
    from synthvox.segmentation.atlas import Atlas, check_fusion
    from synthvox.segmentation.distill import distil

    check_fusion(fusion)
    features = resolve_features(features, None)
    unlabelled = {image_stem(p): io.load(p, what=f"unlabelled image {p.name}") for p in scans}
    atlases = [Atlas(im, lab, name=p.name) for p, im, lab in zip(image_paths, images, labels)]
    return distil(atlases, unlabelled, out_dir=out, fusion=fusion, features=features, min_confidence=min_confidence,
                  device=device, resume=resume, force=force, **chosen)


def segment_command(
    image: Path | None = typer.Argument(None, help="Image to segment (any grid and orientation; NIfTI, MGZ/MGH, NRRD, MHA/MHD, or a folder holding one DICOM series), or a folder of images."),
    input_dir: Path | None = typer.Option(
        None, "-i", "--input", help="Folder of image files (*.nii, *.nii.gz, *.mgz, *.mgh, *.nrrd, *.nhdr, *.mha, *.mhd) to segment, nnU-Net style (or one image); a DICOM series folder goes as IMAGE."
    ),
    out: Path = typer.Option(
        ..., "-o", "--out",
        help="Label map to write, in the format its name asks for (.nii.gz, .nii, .mgz, .mgh, .nrrd, .nhdr, .mha, .mhd); for a folder of images, the output folder (names as the inputs', NAME.nii.gz for inputs in other formats).",
    ),
    model: Path | None = typer.Option(None, "--model", help="Model directory written by synthvox finetune (with atlases: one more voter)."),
    atlas_image: list[Path] = typer.Option([], "--atlas-image", help="Atlas image, any contrast (repeat for several): registered onto each image."),
    atlas_label: list[Path] = typer.Option([], "--atlas-label", help="Label map of the --atlas-image at the same position."),
    fusion: str = typer.Option("weighted", "--fusion", help="How atlas labels are fused: weighted (by local feature match) or majority."),
    features: str = typer.Option("mind", "--features", help="Registration features for the atlases: mind, net, both or auto."),
    weights: Path | None = typer.Option(None, "--weights", help="Network weights for --features net/both (default: the shipped weights)."),
    tta: bool = typer.Option(False, "--tta", help="Average over test-time flips (assumes no left/right labels)."),
    overlap: float = typer.Option(0.5, "--overlap", help="Sliding-window overlap."),
    probabilities: bool = typer.Option(
        False, "--probabilities",
        help="Also write NAME_probabilities.nii.gz (one channel per label, summing to one; their ids in NAME_probabilities.json) beside each label map.",
    ),
    num_parts: int = typer.Option(1, "--num-parts", help="For a folder: split the images into N shares (a job array)."),
    part_id: int = typer.Option(0, "--part-id", help="For a folder: segment share K (0..N-1) only."),
    device: str = DeviceOption,
    seed: int = SeedOption,
    force: bool = ForceOption,
) -> None:
    """Segment IMAGE (or every image of a folder) with a finetuned model, or with labelled atlases registered
    onto it (no training); label maps on the images' grids with the training (or atlas) label ids.

    Examples: 'synthvox segment scan.nii.gz --model MODEL --out seg.nii.gz';
    'synthvox segment -i imagesTs -o predictions --model MODEL --tta';
    'synthvox segment scan.nii.gz --out seg.nii.gz --atlas-image a1.nii.gz --atlas-label a1_seg.nii.gz
    --atlas-image a2.nii.gz --atlas-label a2_seg.nii.gz'.
    """
    from synthvox import io
    from synthvox.cli.common import resolve_device
    from synthvox.errors import InputError
    from synthvox.readers import is_dicom_series

    # Options first, then every output, then the model: all before any image is read.
    if not 0 <= overlap < 1:
        raise InputError(f"--overlap must be in [0, 1), got {overlap}")
    if len(atlas_image) != len(atlas_label):
        raise InputError(f"got {len(atlas_image)} --atlas-image but {len(atlas_label)} --atlas-label: give one label map per atlas image, in the same order")
    if image is not None and input_dir is not None:
        raise InputError("give the image (or folder) to segment once: as IMAGE or with -i, not both")
    source = image if image is not None else input_dir
    if source is None:
        raise InputError("nothing to segment: give IMAGE, or -i DIR for a folder of images")
    # A folder given with -i is a folder of image files; given as IMAGE, a folder holding a DICOM series is one image.
    folder = source.is_dir() and not (image is not None and is_dicom_series(source))
    from synthvox.segmentation import folder_jobs

    if folder:
        jobs = folder_jobs(source, out, force, probabilities, num_parts=num_parts, part_id=part_id)
    elif num_parts != 1 or part_id != 0:
        raise InputError("--num-parts and --part-id split a folder of images (-i DIR), not one image")
    else:
        from synthvox.segmentation.folder import outputs_of

        jobs = [(source, io.check_output(out, force, image=True))]
        for extra in outputs_of(out, probabilities)[1:]:
            io.check_output(extra, force)
    dev = resolve_device(device)
    if atlas_image:
        segmenter = _atlas_segmenter(atlas_image, atlas_label, model, fusion, features, weights, dev, tta, folder,
                                     probabilities)
    else:
        segmenter = _segmenter(model, dev, tta, overlap, probabilities)

    from synthvox.segmentation import segment_files

    if folder:
        _segment_folder(source, out, jobs, segmenter, probabilities, num_parts, part_id)
        return
    done = segment_files(jobs, segmenter, progress=False, probabilities=probabilities)
    d = done[0]
    quality = f", quality {d.quality:.3f} ({d.measure})" if d.quality is not None else ""
    typer.echo(f"wrote {out} (labels present: {d.labels_present}{quality})")


def _segment_folder(source: Path, out: Path, jobs: list, segmenter: Segmenter, probabilities: bool,
                    num_parts: int, part_id: int) -> None:
    """A folder run (the images of this share not finished yet), its table covering every image, and a summary."""
    from synthvox.segmentation import segment_files
    from synthvox.segmentation.folder import QUALITY_TABLE, folder_outputs

    every = folder_outputs(source, out)
    mine = len(every[part_id::num_parts])
    done = segment_files(jobs, segmenter, progress=None, out_dir=out, probabilities=probabilities, table_jobs=every)
    seconds = sum(d.seconds for d in done)
    rated = [d for d in done if d.quality is not None]
    worst = min(rated, key=lambda d: d.quality) if rated else None
    tail = f"; lowest quality {worst.quality:.3f} ({worst.measure}): {worst.image.name}" if worst else ""
    skipped = f", {mine - len(jobs)} finished before" if mine > len(jobs) else ""
    share = f" (share {part_id} of {num_parts})" if num_parts > 1 else ""
    typer.echo(f"wrote {len(done)} label maps{share}{skipped} and {QUALITY_TABLE} to {out} ({seconds:.1f} s, "
               f"{seconds / max(len(done), 1):.1f} s per image{tail})")


def _segmenter(model: Path | None, device: torch.device, tta: bool, overlap: float, probabilities: bool) -> Segmenter:
    """The one function that segments each image, from the command's options (model directory checked first)."""
    from synthvox.errors import InputError
    from synthvox.segmentation import model_segmenter
    from synthvox.segmentation.modeldir import read_meta

    if model is None:
        raise InputError("nothing to segment with: give --model (a directory written by synthvox finetune) or atlases (--atlas-image with --atlas-label)")
    read_meta(model)  # a clear error for a non-model directory before any image is read
    return model_segmenter(model, device=device, tta=tta, overlap=overlap, probabilities=probabilities)


def _atlas_segmenter(images: list[Path], labels: list[Path], model: Path | None, fusion: str, features: str,
                     weights: Path | None, device: torch.device, tta: bool, quiet: bool, probabilities: bool) -> Segmenter:
    """Atlas segmentation from the command's options: every option and atlas checked before any image is read."""
    from synthvox import io
    from synthvox.registration.network import resolve_features
    from synthvox.segmentation.atlas import Atlas, atlas_segmenter, check_fusion

    check_fusion(fusion)
    features = resolve_features(features, weights)
    atlases = [Atlas(io.load(i, what=f"atlas image {i.name}"), io.load_labels(lab, what=f"atlas label map {lab.name}"), name=i.name)
               for i, lab in zip(images, labels)]

    def say(line: str) -> None:
        typer.echo("  " + line, err=True)

    return atlas_segmenter(atlases, fusion=fusion, features=features, weights=weights, model=model, tta=tta,
                           device=device, log=None if quiet else say, probabilities=probabilities)


def add_commands(app: typer.Typer) -> None:
    """Add ``finetune`` and ``segment`` to the app."""
    app.command("finetune")(user_errors(finetune_command))
    app.command("segment")(user_errors(segment_command))
