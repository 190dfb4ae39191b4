"""``synthvox synth``: render synthetic label maps with two views each, and a preview montage."""

from __future__ import annotations

from pathlib import Path

import typer

from synthvox.cli.common import DeviceOption, ForceOption, SeedOption, user_errors


def parse_size(text: str) -> tuple[int, int, int]:
    """``"128"`` or ``"96x128x80"`` into three sizes; anything else is an :class:`InputError`."""
    from synthvox.errors import InputError

    parts = str(text).lower().replace("×", "x").split("x")
    if len(parts) not in (1, 3):
        raise InputError(f"--size must be one number or three joined by 'x' (e.g. 128 or 96x128x80), got {text!r}")
    try:
        values = [int(p.strip()) for p in parts]
    except ValueError:
        raise InputError(f"--size must be whole numbers (e.g. 128 or 96x128x80), got {text!r}") from None
    if any(v < 8 for v in values):
        raise InputError(f"--size must be at least 8 voxels along each axis, got {text!r}")
    if any(v > 512 for v in values):
        raise InputError(f"--size must be at most 512 voxels along each axis, got {text!r}")
    return (values[0],) * 3 if len(values) == 1 else (values[0], values[1], values[2])


def output_names(n: int) -> list[str]:
    """Files ``synthvox synth`` writes for ``n`` samples."""
    names = [f"{i:04d}_{kind}.nii.gz" for i in range(n) for kind in ("labels", "view1", "view2")]
    return names + ["params.json", "preview.png"]


def add_commands(app: typer.Typer) -> None:
    """Add the ``synth`` command to ``app``."""

    @app.command("synth")
    @user_errors
    def synth(
        out: Path = typer.Option(..., "--out", help="Output directory."),
        n: int = typer.Option(8, "--n", help="Number of label maps (each with two views)."),
        size: str = typer.Option("128", "--size", help="Volume size: S or XxYxZ (e.g. 128 or 96x128x80)."),
        shapes: str = typer.Option(
            "default", "--shapes", help="Shape bank file (.npz from `synthvox shapes`), 'default' (shipped), or 'none'."
        ),
        batch_size: int = typer.Option(4, "--batch", help="Samples rendered together."),
        preview_samples: int = typer.Option(4, "--preview", help="Samples shown in preview.png."),
        seed: int = SeedOption,
        device: str = DeviceOption,
        force: bool = ForceOption,
    ) -> None:
        """Render N synthetic label maps with two random views each, plus a preview montage.

        Writes DIR/NNNN_labels.nii.gz, DIR/NNNN_view1.nii.gz, DIR/NNNN_view2.nii.gz, DIR/params.json (every random parameter, replayable) and DIR/preview.png.
        The set appears in DIR all at once at the end: a run that fails or is interrupted (Ctrl-C) writes nothing, so split a very large N into several runs (e.g. with --seed).
        """
        import json
        import time

        import numpy as np

        from synthvox import io
        from synthvox.cli.common import check_at_least, check_out_dir, resolve_device
        from synthvox.errors import InputError

        check_at_least(**{"--n": (n, 1), "--batch": (batch_size, 1), "--preview": (preview_samples, 1)})
        dims = parse_size(size)
        dev = resolve_device(device)
        names = output_names(n)

        from synthvox.synth.engine import SynthConfig, SynthEngine
        from synthvox.synth.labels import LabelConfig
        from synthvox.synth.preview import artefact_summary, preview_figure, scene_summary

        bank = None
        choice = shapes.strip()
        use_bank = choice.lower() != "none"
        if use_bank and choice.lower() != "default":
            from synthvox.shapes import ShapeBank

            bank = ShapeBank.load(choice)
            if len(bank) == 0:
                raise InputError(f"shape bank {choice} holds no templates")
        check_out_dir(out, force, names)  # after every input is read, before anything is written
        config = SynthConfig(labels=LabelConfig(size=dims), use_bank=use_bank, seed=seed)
        engine = SynthEngine(config, dev, bank)

        vox = config.labels.voxel_mm
        affine = np.diag([vox, vox, vox, 1.0])
        affine[:3, 3] = -vox * (np.asarray(dims) - 1) / 2.0  # centred on the world origin
        records: list[dict] = []
        shown: tuple[list, list, list] = ([], [], [])
        start = time.perf_counter()
        # Everything is written into a hidden staging folder inside --out and moved into place at the
        # end, so an error or Ctrl-C leaves neither samples without params.json nor a half-made folder.
        with io.staging_dir(out) as stage:
            for first in range(0, n, batch_size):
                idx = list(range(first, min(n, first + batch_size)))
                b = engine.batch(idx)
                for j, i in enumerate(idx):
                    io.save(b.labels[j].cpu(), stage / f"{i:04d}_labels.nii.gz", affine, labels=True)
                    # views are noisy floats that gzip hardly shrinks: store them (level 0), 10x faster
                    io.save(b.view1[j].cpu(), stage / f"{i:04d}_view1.nii.gz", affine, compress_level=0)
                    io.save(b.view2[j].cpu(), stage / f"{i:04d}_view2.nii.gz", affine, compress_level=0)
                    if len(shown[0]) < preview_samples:
                        shown[0].append(b.labels[j].cpu())
                        shown[1].append(b.view1[j].cpu())
                        shown[2].append(b.view2[j].cpu())
                records.extend(b.params)
            elapsed = time.perf_counter() - start

            doc = {"config": config.to_dict(), "device": str(dev), "voxel_mm": vox, "samples": records}
            (stage / "params.json").write_text(json.dumps(doc))
            titles = [f"#{i}  {int(lab.max()) + 1} labels" for i, lab in enumerate(shown[0])]
            notes = [f"{scene_summary(r['labels'])}\nview 1: {artefact_summary(r['view1'])}   |   view 2: {artefact_summary(r['view2'])}"
                     for r in records[: len(shown[0])]]
            fig = preview_figure(shown[0], shown[1], shown[2], titles=titles, notes=notes)
            fig.savefig(stage / "preview.png", format="png", facecolor=fig.get_facecolor())
        typer.echo(
            f"wrote {n} label maps with two views each ({'x'.join(map(str, dims))}, {vox:.3g} mm) to {out} "
            f"in {elapsed:.1f} s ({elapsed / n:.2f} s per pair on {dev}); preview: {out / 'preview.png'}"
        )
