"""``synthvox shapes``: build a shape bank from label maps."""

from __future__ import annotations

from pathlib import Path

import typer

from synthvox.cli.common import DeviceOption, ForceOption, SeedOption, user_errors


def source_name(path: Path) -> str:
    """The name recorded as a template's source: the file's folder and name (``brains/seg_01.nii.gz``)."""
    parent = path.resolve().parent.name
    return f"{parent}/{path.name}" if parent else path.name


@user_errors
def shapes(
    label_maps: list[Path] = typer.Argument(..., help="Label maps (NIfTI, MGZ, NRRD, MHA/MHD or a DICOM series folder) to cut into templates.", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="Output bank file (.npz).", show_default=False),
    spacing: float = typer.Option(2.0, "--spacing", help="Common isotropic spacing of the templates, mm."),
    min_voxels: int = typer.Option(
        64, "--min-voxels", help="Drop connected components smaller than this many voxels at --spacing."
    ),
    max_extent: int = typer.Option(
        64,
        "--max-extent",
        help="Templates longer than this many voxels are stored at a coarser spacing of their own (0: no cap).",
    ),
    force: bool = ForceOption,
    device: str = DeviceOption,
    seed: int = SeedOption,
) -> None:
    """Cut every label of every LABELMAP into binary templates and store them in one bank file.

    Each label is split into connected components; components of at least --min-voxels voxels are
    cropped, resampled through the label map's affine to --spacing mm and bit-packed into OUT with
    their provenance (source file, label id, component), together with the data engine's prepared
    form of each template (so synthesis with the bank starts at full speed). Building is
    deterministic; --seed is accepted like every command's but draws nothing.
    """
    import time

    from synthvox import io
    from synthvox.cli.common import check_number, resolve_device
    from synthvox.errors import InputError
    from synthvox.readers import check_image_path
    from synthvox.shapes.bank import build_bank

    del seed  # building is deterministic
    start = time.perf_counter()
    dev = resolve_device(device)
    if not out.name.lower().endswith(".npz"):
        raise InputError(f"--out must be a .npz file, got {out}")
    io.check_output(out, force)
    check_number("--spacing", spacing, 0.0, 100.0, low_open=True)
    if min_voxels < 1:
        raise InputError(f"--min-voxels must be at least 1, got {min_voxels}")
    if max_extent < 0 or max_extent == 1:
        raise InputError(f"--max-extent must be 0 (no cap) or at least 2, got {max_extent}")
    # Check every path before the slow part, so a typo in the last file fails at once.
    for p in label_maps:
        check_image_path(p, what="label map")
    if len({p.resolve() for p in label_maps}) != len(label_maps):
        raise InputError("the same label map is given more than once")
    sources = [source_name(p) for p in label_maps]

    def lazily():
        for p in label_maps:
            yield io.load_labels(p, what="input")

    bank = build_bank(
        lazily(),
        sources,
        spacing=spacing,
        min_voxels=min_voxels,
        max_extent=max_extent or None,
        device=dev,
    )
    if len(bank) == 0:
        raise InputError(f"no component of any label has {min_voxels} voxels at {spacing:g} mm; lower --min-voxels")
    from synthvox.synth.labels import prepare_bank

    prepare_bank(bank)  # the engine's per-template cache ships in the file: no slow first samples
    path = bank.save(out, force=force)
    size_mb = path.stat().st_size / 2**20
    typer.echo(
        f"wrote {path}: {len(bank)} templates from {len(sources)} label map(s) at {spacing:g} mm, "
        f"{size_mb:.2f} MB, in {time.perf_counter() - start:.1f} s"
    )


def add_commands(app: typer.Typer) -> None:
    """Add ``synthvox shapes`` to the app."""
    app.command("shapes")(shapes)
