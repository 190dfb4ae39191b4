"""``synthvox demo``: the main job on bundled data with the default weights."""

from __future__ import annotations

from pathlib import Path

import typer

from synthvox.cli.common import DeviceOption, ForceOption, SeedOption, user_errors


def add_commands(app: typer.Typer) -> None:
    """Add the ``demo`` command to ``app``."""

    @app.command("demo")
    @user_errors
    def demo_cmd(
        out: Path = typer.Option(..., "--out", help="Output directory."),
        features: str = typer.Option(
            "auto", "--features", help="auto (the default weights' best setting; mind when no weights ship), net, mind or both."
        ),
        weights: str = typer.Option(None, "--weights", help="Model directory (default: the shipped weights)."),
        device: str = DeviceOption,
        seed: int = SeedOption,
        force: bool = ForceOption,
    ) -> None:
        """Register the bundled abdominal MR onto a CT of another person; print Dice on 7 organs."""
        from synthvox.cli.common import check_out_dir, resolve_device
        from synthvox.demo import dice_table, run_demo
        from synthvox.registration.network import resolve_features
        from synthvox.registration.outputs import output_names

        dev = resolve_device(device)
        features = resolve_features(features, weights)
        check_out_dir(out, force, output_names(True))  # refuse before the work, not after it; create nothing yet
        if weights is not None:
            from synthvox.models.weightsdir import read_model_config

            read_model_config(weights)  # a wrong --weights is one line before the work starts, not after its progress line
        typer.echo(f"registering the bundled MR onto the bundled CT ({features} features, {dev}) ...", err=True)
        res = run_demo(features=features, weights=weights, device=dev, seed=seed,
                       log=lambda line: typer.echo(line, err=True))
        reg = res.registration
        reg.save(out, force=force, title=f"demo: MR -> CT ({features})")
        typer.echo("Dice on the 7 organs both label maps share (CT labels as reference):")
        typer.echo(dice_table(res))
        typer.echo(f"folding {reg.report['folding_percent']:.3f}% of voxels, {reg.report['seconds']['total']:.1f} s; "
                   f"wrote {out}/ (moved.nii.gz, warp.nii.gz, affine.txt, deformable_warp.nii.gz, inverse_warp.nii.gz, "
                   "moved_labels.nii.gz, qc.png, report.json)")
