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
        raw = json.loads(path.read_text(encoding="utf-8"))
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


def _check_batch_options(pairs: Path | None, fixed: Path | None, moving: Path | None, **per_pair: object) -> None:
    """``--pairs`` or FIXED MOVING, not both; the per-pair options belong in the CSV's columns."""
    from synthvox.errors import InputError

    if pairs is None:
        raise InputError("give FIXED and MOVING, or --pairs PAIRS.csv for a batch")
    if fixed is not None or moving is not None:
        raise InputError("give either FIXED MOVING or --pairs PAIRS.csv, not both")
    given = [f"--{k.replace('_', '-')}" for k, v in per_pair.items() if v]
    if given:
        raise InputError(f"with --pairs, {', '.join(given)} cannot be given: labels and masks are columns of the CSV "
                         "(moving_labels, fixed_labels, fixed_mask, moving_mask)")


def _register_pairs(pairs: Path, out: Path, *, num_parts: int, part_id: int, label_names: Path | None,
                    weights: str | None, features: str, init: str, affine: bool, deformable: bool,
                    spacing: float | None, quiet: bool, settings: list[str], transform: str | None, device: str,
                    seed: int, force: bool) -> None:
    """``synthvox register --pairs PAIRS.csv --out DIR``: :func:`synthvox.registration.batch.register_many`
    with the command's options; bad rows one line each, a summary, exit status 1 when a pair failed."""
    from synthvox.cli.common import check_number, resolve_device
    from synthvox.config import apply_overrides
    from synthvox.registration import RegistrationConfig
    from synthvox.registration.batch import RESULTS_TABLE, PairsError, register_many

    dev = resolve_device(device)
    base = {} if transform is None else {"transform": transform}
    if spacing is not None:
        base["spacing"] = check_number("--spacing", spacing, 0.0, low_open=True)
    config = apply_overrides(RegistrationConfig(**base), settings, "--set")
    names = _label_names(label_names)
    try:
        res = register_many(pairs, out, features=features, weights=weights, device=dev, init=init, affine=affine,
                            deformable=deformable, config=config, seed=seed, label_names=names, num_parts=num_parts,
                            part_id=part_id, force=force, progress=False if quiet else None,
                            log=lambda line: typer.echo(line, err=True))
    except PairsError as exc:
        for line in exc.problems:
            typer.echo(f"error: {pairs}: {line}", err=True)
        raise typer.Exit(2) from None
    flagged = [r["name"] for r in res.rows if r["quality"] == "check"]
    share = f" (share {part_id} of {num_parts})" if num_parts > 1 else ""
    typer.echo(f"registered {len(res.registered)} pair(s){share}, {len(res.skipped)} finished before, "
               f"{len(res.failed)} failed; wrote {res.table}"
               + (f"; {len(flagged)} to check: {', '.join(flagged[:5])}{' ...' if len(flagged) > 5 else ''}" if flagged else ""))
    if res.failed:
        name, error = next(iter(res.failed.items()))
        more = f" and {len(res.failed) - 1} more" if len(res.failed) > 1 else ""
        typer.echo(f"error: {len(res.failed)} pair(s) failed (see {RESULTS_TABLE}): {name}: {error}{more}", err=True)
        raise typer.Exit(1)


def add_commands(app: typer.Typer) -> None:
    """Add the ``register`` and ``apply`` commands to ``app``."""

    @app.command("register")
    @user_errors
    def register_cmd(
        fixed: Path = typer.Argument(None, help="Fixed (reference) 3D image: NIfTI, MGZ/MGH, NRRD, MHA/MHD, or a folder holding one DICOM series (not with --pairs)."),
        moving: Path = typer.Argument(None, help="Moving 3D image, in any of those formats (any grid, spacing, orientation)."),
        out: Path = typer.Option(..., "--out", help="Output directory (with --pairs: DIR/NAME/ per pair and DIR/results.csv)."),
        pairs: Path = typer.Option(None, "--pairs", help="CSV of pairs (columns fixed, moving; optional moving_labels, fixed_labels, fixed_mask, moving_mask, name; paths relative to the CSV): all registered in one process, finished pairs skipped."),
        num_parts: int = typer.Option(1, "--num-parts", help="With --pairs: split the pairs into N shares (a job array)."),
        part_id: int = typer.Option(0, "--part-id", help="With --pairs: register share K (0..N-1) only."),
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
        jacobian: bool = typer.Option(False, "--jacobian", help="Also write jacobian.nii.gz, the whole map's Jacobian determinant on FIXED's grid (its share <= 0 is the report's folding %)."),
        fixed_points: Path = typer.Option(None, "--fixed-points", help="Landmarks of FIXED: a CSV of x,y,z in RAS mm (optional label column), a Slicer .fcsv or .mrk.json; with --moving-points, TRE before and after in report.json."),
        moving_points: Path = typer.Option(None, "--moving-points", help="The corresponding landmarks of MOVING, in the same order."),
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
        if pairs is not None or fixed is None or moving is None:
            _check_batch_options(pairs, fixed, moving, moving_labels=moving_labels, fixed_labels=fixed_labels,
                                 fixed_mask=fixed_mask, moving_mask=moving_mask,
                                 initial_transform=initial_transform, jacobian=jacobian,
                                 fixed_points=fixed_points, moving_points=moving_points)
            return _register_pairs(pairs, out, num_parts=num_parts, part_id=part_id, label_names=label_names,
                                   weights=weights, features=features, init=init, affine=not no_affine,
                                   deformable=not no_deformable, spacing=spacing, quiet=quiet, settings=settings,
                                   transform=transform, device=device, seed=seed, force=force)
        from synthvox import io
        from synthvox.cli.common import check_number, check_out_dir, resolve_device
        from synthvox.config import apply_overrides
        from synthvox.errors import InputError
        from synthvox.registration import RegistrationConfig
        from synthvox.registration.outputs import output_names
        from synthvox.registration.pipeline import register as run_registration

        dev = resolve_device(device)
        if spacing is not None:
            check_number("--spacing", spacing, 0.0, low_open=True)
        config = apply_overrides(RegistrationConfig(transform=transform) if spacing is None
                                 else RegistrationConfig(transform=transform, spacing=spacing), settings, "--set")
        check_out_dir(out, force, output_names(moving_labels is not None, jacobian))
        start = io.load_transform(initial_transform) if initial_transform else None
        if (fixed_points is None) != (moving_points is None):
            raise InputError("give --fixed-points and --moving-points together")
        fp, point_labels = io.load_points(fixed_points, what="fixed points") if fixed_points else (None, None)
        mp = io.load_points(moving_points, what="moving points")[0] if moving_points else None
        if fp is not None and len(fp) != len(mp):  # type: ignore[arg-type]
            raise InputError(f"--fixed-points has {len(fp)} points, --moving-points {len(mp)}: they must correspond one to one")  # type: ignore[arg-type]
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
            config=config, seed=seed, log=log, label_names=names, initial_transform=start, jacobian=jacobian,
            fixed_points=fp, moving_points=mp, point_labels=point_labels,
        )
        res.report["inputs"] = {"fixed": str(fixed), "moving": str(moving),
                                "moving_labels": str(moving_labels) if moving_labels else None,
                                "fixed_labels": str(fixed_labels) if fixed_labels else None,
                                "label_names": str(label_names) if label_names else None,
                                "initial_transform": str(initial_transform) if initial_transform else None,
                                "fixed_points": str(fixed_points) if fixed_points else None,
                                "moving_points": str(moving_points) if moving_points else None}
        res.save(out, force=force, title=f"{moving.name} -> {fixed.name} ({res.report['features']})")
        summary = f"folding {res.report['folding_percent']:.3f}%, {res.report['seconds']['total']:.1f} s"
        if "mean_dice" in res.report:
            summary += f", mean Dice {res.report['mean_dice']:.3f}"
        typer.echo(f"wrote {out} ({summary})")

    @app.command("apply")
    @user_errors
    def apply_cmd(
        image: Path = typer.Argument(None, help="Image or label map to move (in MOVING's space); or --points."),
        warp: Path = typer.Option(..., "--warp", help="warp.nii.gz written by synthvox register."),
        out: Path = typer.Option(..., "--out", help="Output image, in the format its name asks for: .nii.gz, .nii, .mgz, .mgh, .nrrd, .nhdr, .mha, .mhd (with --points: .csv, .fcsv or .mrk.json)."),
        points: Path = typer.Option(None, "--points", help="Landmarks to carry instead of an image (CSV x,y,z RAS mm, .fcsv, .mrk.json): p -> p + d(p), so warp.nii.gz takes FIXED's points to MOVING's and inverse_warp.nii.gz MOVING's to FIXED's (following the moved image)."),
        fixed: Path = typer.Option(None, "--fixed", help="Grid to write onto (default: the warp's, i.e. FIXED's)."),
        labels: bool = typer.Option(False, "--labels", help="Nearest neighbour; label ids kept."),
        device: str = DeviceOption,
        seed: int = SeedOption,
        force: bool = ForceOption,
    ) -> None:
        """Apply a saved warp to IMAGE (linear, or nearest neighbour with --labels), or to --points."""
        from synthvox import io
        from synthvox.cli.common import resolve_device
        from synthvox.errors import InputError
        from synthvox.registration.warp import apply_warp

        dev = resolve_device(device)
        if (image is None) == (points is None):
            raise InputError("give IMAGE or --points (one of them)")
        if points is not None:
            from synthvox.registration.landmarks import apply_warp_to_points

            io.check_output(out, force)
            pts, names = io.load_points(points)
            mapped, inside = apply_warp_to_points(pts, io.load_warp(warp))
            if not inside.all():
                typer.echo(f"warning: {int((~inside).sum())} point(s) lie outside the warp's grid (given the "
                           "displacement at its nearest border)", err=True)
            io.save_points(mapped, names, out, force=force)
            typer.echo(f"wrote {out} ({len(pts)} points)")
            return
        io.check_output(out, force, image=True)
        w = io.load_warp(warp)
        img = io.load_labels(image, what="label map") if labels else io.load(image)
        ref = io.load(fixed, what="fixed image") if fixed else None
        moved = apply_warp(img.to(dev), w.to(dev), labels=labels, reference=ref)
        io.save(moved.to("cpu"), out, labels=labels, force=force)
        typer.echo(f"wrote {out}")
