"""``synthvox register`` (MOVING onto FIXED) and ``synthvox apply`` (a saved warp onto any image)."""

from __future__ import annotations

from pathlib import Path

import typer

from synthvox.cli.common import DeviceOption, ForceOption, SeedOption, user_errors


def _label_names(path: Path | None) -> dict[int, str] | None:
    """Read ``--label-names``: a JSON object of name -> id (or of id -> name)."""
    import json

    from synthvox.errors import InputError

    if path is None:
        return None
    if not path.is_file():
        raise InputError(f"--label-names file not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"--label-names is not a readable JSON file ({type(exc).__name__}): {path}") from None
    if not isinstance(raw, dict) or not raw:
        raise InputError(f"--label-names must be a JSON object of name -> label id: {path}")
    names: dict[int, str] = {}
    for k, v in raw.items():
        if str(k).startswith("_"):
            continue
        ident, name = (v, k) if not str(k).lstrip("-").isdigit() else (k, v)
        if isinstance(ident, bool) or not str(ident).lstrip("-").isdigit() or not isinstance(name, str):
            raise InputError(f"--label-names must map names to whole-number label ids, got {k!r}: {v!r} in {path}")
        names[int(ident)] = name
    return names


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
        label_names: Path = typer.Option(None, "--label-names", help="JSON file of label name -> id, for the report."),
        weights: str = typer.Option(None, "--weights", help="Model directory for --features net/both."),
        features: str = typer.Option("mind", "--features", help="auto (as demo: the shipped weights' best setting), net, mind or both."),
        init: str = typer.Option("moments", "--init", help="none (headers), com (headers, centres of mass) or moments (also principal axes)."),
        no_affine: bool = typer.Option(False, "--no-affine", help="Skip the affine stage."),
        no_deformable: bool = typer.Option(False, "--no-deformable", help="Stop after the affine stage."),
        transform: str = typer.Option("deformable", "--transform", help="How far to go: rigid, affine or deformable; the same files are written (warp.nii.gz then holds the rigid or affine map)."),
        initial_transform: Path = typer.Option(None, "--initial-transform", help="Start from this transform instead of the --init search: an ITK .txt/.tfm, an ANTs .mat or a synthvox affine.txt, mapping FIXED's points to MOVING's (as antsApplyTransforms reads it)."),
        fixed_mask: Path = typer.Option(None, "--fixed-mask", help="Region of FIXED to match."),
        moving_mask: Path = typer.Option(None, "--moving-mask", help="Region of MOVING to match."),
        spacing: float | None = typer.Option(None, "--spacing", help="Working spacing in mm (default: RegistrationConfig's, in report.json as working_spacing_mm; FIXED's when coarser). Finer is slower: 2 mm takes about 1.4x as long as the default."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress lines on stderr (warnings still)."),
        settings: list[str] = typer.Option([], "--set", help="Solver setting KEY=VALUE of RegistrationConfig, e.g. adam_iters=80 (repeatable)."),
        device: str = DeviceOption,
        seed: int = SeedOption,
        force: bool = ForceOption,
    ) -> None:
        """Register MOVING onto FIXED; writes moved.nii.gz, warp.nii.gz, affine.txt, deformable_warp.nii.gz,
        inverse_warp.nii.gz (ITK/ANTs), qc.png, report.json."""
        from synthvox import io
        from synthvox.cli.common import check_number, check_out_dir, resolve_device
        from synthvox.config import apply_overrides
        from synthvox.demo import resolve_features
        from synthvox.registration import RegistrationConfig
        from synthvox.registration.outputs import output_names
        from synthvox.registration.pipeline import register as run_registration

        dev = resolve_device(device)
        if spacing is not None:
            check_number("--spacing", spacing, 0.0, low_open=True)
        config = apply_overrides(RegistrationConfig(transform=transform) if spacing is None
                                 else RegistrationConfig(transform=transform, spacing=spacing), settings, "--set")
        features = resolve_features(features, weights)
        check_out_dir(out, force, output_names(moving_labels is not None))
        start = io.load_transform(initial_transform) if initial_transform else None
        names = _label_names(label_names)
        fx = io.load(fixed, what="fixed image")
        mv = io.load(moving, what="moving image")
        ml = io.load_labels(moving_labels, what="moving label map") if moving_labels else None
        fl = io.load_labels(fixed_labels, what="fixed label map") if fixed_labels else None
        fm = io.load(fixed_mask, what="fixed mask") if fixed_mask else None
        mm = io.load(moving_mask, what="moving mask") if moving_mask else None

        def log(line: str) -> None:
            if not quiet or line.startswith("warning:"):
                typer.echo(line, err=True)

        res = run_registration(
            fx, mv, features=features, weights=weights, device=dev, moving_labels=ml, fixed_labels=fl,
            fixed_mask=fm, moving_mask=mm, init=init, affine=not no_affine, deformable=not no_deformable,
            config=config, seed=seed, log=log, label_names=names, initial_transform=start,
        )
        res.report["inputs"] = {"fixed": str(fixed), "moving": str(moving),
                                "moving_labels": str(moving_labels) if moving_labels else None,
                                "fixed_labels": str(fixed_labels) if fixed_labels else None,
                                "label_names": str(label_names) if label_names else None,
                                "initial_transform": str(initial_transform) if initial_transform else None}
        res.save(out, force=force, title=f"{moving.name} -> {fixed.name} ({features})")
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
        w = io.load_warp(warp)
        img = io.load_labels(image, what="label map") if labels else io.load(image)
        ref = io.load(fixed, what="fixed image") if fixed else None
        moved = apply_warp(img.to(dev), w.to(dev), labels=labels, reference=ref)
        io.save(moved.to("cpu"), out, labels=labels, force=force)
        typer.echo(f"wrote {out}")
