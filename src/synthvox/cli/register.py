"""``synthvox register`` (MOVING onto FIXED) and ``synthvox apply`` (a saved warp onto any image)."""

from __future__ import annotations

from pathlib import Path

import typer

from synthvox.cli.common import DeviceOption, ForceOption, SeedOption, user_errors

OUTPUTS = ("moved.nii.gz", "warp.nii.gz", "moved_labels.nii.gz", "qc.png", "report.json")


def _load_warp(path: Path):  # noqa: ANN202 - returns a Volume (imported lazily)
    """Read a displacement field written by ``register`` (5D vector NIfTI, or 4D with 3 components)."""
    import nibabel as nib
    import numpy as np
    import torch

    from synthvox.errors import InputError
    from synthvox.io import is_nifti_path
    from synthvox.volume import Volume

    if not path.exists():
        raise InputError(f"warp not found: {path}")
    if not is_nifti_path(path):
        raise InputError(f"warp is not a NIfTI file (.nii or .nii.gz): {path}")
    try:
        img = nib.load(str(path))
        arr = np.asanyarray(img.dataobj).astype(np.float32)
    except Exception as exc:
        raise InputError(f"cannot read warp {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if arr.ndim == 5 and arr.shape[3] == 1:
        arr = arr[:, :, :, 0, :]
    if arr.ndim != 4 or arr.shape[3] != 3:
        raise InputError(f"warp must be a 3D field of 3-vectors, got shape {arr.shape} in {path}")
    if not np.isfinite(arr).all():
        raise InputError(f"warp contains NaN or infinite values: {path}")
    return Volume(torch.from_numpy(np.ascontiguousarray(np.moveaxis(arr, -1, 0))), np.asarray(img.affine, np.float64))


def write_outputs(out: Path, fixed, res, names: list[str], force: bool, title: str,  # noqa: ANN001
                  fixed_labels=None) -> None:  # noqa: ANN001
    """Write a registration's outputs into ``out``: moved, warp, moved labels, qc.png, report.json.

    Everything is computed before the first file is written, and each file is written atomically, so
    an error leaves no half-written output.
    """
    import json

    from synthvox import io
    from synthvox.cli.common import check_out_dir
    from synthvox.registration.qc import qc_png_bytes

    png = qc_png_bytes(fixed, res.moved, title=title, fixed_labels=fixed_labels, moved_labels=res.moved_labels)
    report = json.dumps(res.report, indent=2, allow_nan=True)
    check_out_dir(out, force, names)
    io.save(res.moved, out / "moved.nii.gz", force=True)
    io.save(res.warp, out / "warp.nii.gz", force=True, vector=True)
    if res.moved_labels is not None:
        io.save(res.moved_labels, out / "moved_labels.nii.gz", labels=True, force=True)
    with io.atomic_path(out / "qc.png") as tmp:
        tmp.write_bytes(png)
    with io.atomic_path(out / "report.json") as tmp:
        tmp.write_text(report)


def register(app: typer.Typer) -> None:
    """Add the ``register`` and ``apply`` commands to ``app``."""

    @app.command("register")
    @user_errors
    def register_cmd(
        fixed: Path = typer.Argument(..., help="Fixed (reference) 3D NIfTI image."),
        moving: Path = typer.Argument(..., help="Moving 3D NIfTI image (any grid, spacing, orientation)."),
        out: Path = typer.Option(..., "--out", help="Output directory."),
        moving_labels: Path = typer.Option(None, "--moving-labels", help="Label map of MOVING (on its grid)."),
        fixed_labels: Path = typer.Option(None, "--fixed-labels", help="Label map of FIXED: Dice in the report."),
        weights: str = typer.Option(None, "--weights", help="Model directory for --features net/both."),
        features: str = typer.Option("mind", "--features", help="net, mind or both."),
        init: str = typer.Option("moments", "--init", help="none, com or moments."),
        no_affine: bool = typer.Option(False, "--no-affine", help="Skip the affine stage."),
        no_deformable: bool = typer.Option(False, "--no-deformable", help="Stop after the affine stage."),
        fixed_mask: Path = typer.Option(None, "--fixed-mask", help="Region of FIXED to match."),
        moving_mask: Path = typer.Option(None, "--moving-mask", help="Region of MOVING to match."),
        spacing: float = typer.Option(2.0, "--spacing", help="Working spacing in mm (FIXED's when coarser)."),
        device: str = DeviceOption,
        seed: int = SeedOption,
        force: bool = ForceOption,
    ) -> None:
        """Register MOVING onto FIXED; writes moved.nii.gz, warp.nii.gz (ITK/ANTs), qc.png, report.json."""
        from synthvox import io
        from synthvox.cli.common import check_out_dir, resolve_device
        from synthvox.registration.pipeline import RegistrationConfig
        from synthvox.registration.pipeline import register as run_registration

        dev = resolve_device(device)
        names = [n for n in OUTPUTS if n != "moved_labels.nii.gz" or moving_labels is not None]
        if out.is_dir() and not force and any((out / n).exists() for n in names):
            check_out_dir(out, force, names)
        fx = io.load(fixed, what="fixed image")
        mv = io.load(moving, what="moving image")
        ml = io.load_labels(moving_labels, what="moving label map") if moving_labels else None
        fl = io.load_labels(fixed_labels, what="fixed label map") if fixed_labels else None
        fm = io.load(fixed_mask, what="fixed mask") if fixed_mask else None
        mm = io.load(moving_mask, what="moving mask") if moving_mask else None
        res = run_registration(
            fx, mv, features=features, weights=weights, device=dev, moving_labels=ml, fixed_labels=fl,
            fixed_mask=fm, moving_mask=mm, init=init, affine=not no_affine, deformable=not no_deformable,
            config=RegistrationConfig(spacing=spacing), seed=seed,
        )
        res.report["inputs"] = {"fixed": str(fixed), "moving": str(moving),
                                "moving_labels": str(moving_labels) if moving_labels else None,
                                "fixed_labels": str(fixed_labels) if fixed_labels else None}
        write_outputs(out, fx, res, names, force, title=f"{moving.name} -> {fixed.name} ({features})",
                      fixed_labels=fl)
        summary = f"folding {res.report['folding_percent']:.3f}%, {res.report['seconds']['total']:.1f} s"
        if "mean_dice" in res.report:
            summary += f", mean Dice {res.report['mean_dice']:.3f}"
        typer.echo(f"wrote {out} ({summary})")

    @app.command("apply")
    @user_errors
    def apply_cmd(
        image: Path = typer.Argument(..., help="Image or label map to move (in MOVING's space)."),
        warp: Path = typer.Option(..., "--warp", help="warp.nii.gz written by synthvox register."),
        out: Path = typer.Option(..., "--out", help="Output NIfTI."),
        fixed: Path = typer.Option(None, "--fixed", help="Grid to write onto (default: the warp's, i.e. FIXED's)."),
        labels: bool = typer.Option(False, "--labels", help="Nearest neighbour; label ids kept."),
        device: str = DeviceOption,
        seed: int = SeedOption,
        force: bool = ForceOption,
    ) -> None:
        """Apply a saved warp to IMAGE (linear, or nearest neighbour with --labels)."""
        from synthvox import io
        from synthvox.cli.common import resolve_device
        from synthvox.registration.warp import apply_warp

        dev = resolve_device(device)
        io.check_output(out, force, nifti=True)
        w = _load_warp(warp)
        img = io.load_labels(image, what="label map") if labels else io.load(image)
        ref = io.load(fixed, what="fixed image") if fixed else None
        moved = apply_warp(img.to(dev), w.to(dev), labels=labels, reference=ref)
        io.save(moved.to("cpu"), out, labels=labels, force=force)
        typer.echo(f"wrote {out}")
