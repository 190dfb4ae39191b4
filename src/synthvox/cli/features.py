"""``synthvox features``: write the network's feature maps of an image on its grid (a 4D NIfTI, or the format the output's name asks for)."""

from __future__ import annotations

from pathlib import Path

import typer

from synthvox.cli.common import DeviceOption, ForceOption, SeedOption, user_errors


def add_commands(app: typer.Typer) -> None:
    """Add the ``features`` command to ``app``."""

    @app.command("features")
    @user_errors
    def features_cmd(
        image: Path = typer.Argument(..., help="3D image (NIfTI, MGZ/MGH, NRRD, MHA/MHD, or a folder holding one DICOM series)."),
        out: Path = typer.Option(..., "--out", help="Output on the image's grid, in the format its name asks for (.nii.gz: 4D X, Y, Z, C; .mgz/.mgh: frames; .nrrd/.nhdr/.mha/.mhd: a vector image)."),
        weights: str = typer.Option(
            None, "--weights", help="Model directory (e.g. RUN/model); default: the shipped weights; 'random' for an untrained network."
        ),
        modality: str = typer.Option("auto", "--modality", help="Intensity normalisation: auto, mr or ct."),
        ct_window: str = typer.Option(None, "--ct-window", help="CT window in HU as LOW,HIGH (implies CT)."),
        patch: int = typer.Option(128, "--patch", help="Sliding-window size for large volumes."),
        device: str = DeviceOption,
        seed: int = SeedOption,
        force: bool = ForceOption,
    ) -> None:
        """Compute dense voxel features of IMAGE with the pretrained UNet."""
        import math

        from synthvox import io
        from synthvox.cli.common import check_at_least, resolve_device
        from synthvox.errors import InputError
        from synthvox.models import build_model
        from synthvox.models.extract import image_features

        io.check_output(out, force, image=True)
        window = None
        if ct_window:
            try:
                window = tuple(float(v) for v in ct_window.split(","))
            except ValueError:
                raise InputError(f"--ct-window must be LOW,HIGH in HU, got {ct_window!r}") from None
            if len(window) != 2 or not all(math.isfinite(v) for v in window) or not window[0] < window[1]:
                raise InputError(f"--ct-window must be two finite numbers LOW,HIGH in HU with LOW < HIGH, got {ct_window!r}")
        check_at_least(**{"--patch": (patch, 8)})
        if modality.lower() not in ("auto", "mr", "ct"):
            raise InputError(f"--modality must be auto, mr or ct, got {modality!r}")
        if weights is not None and weights != "random":
            from synthvox.models.weightsdir import read_model_config

            read_model_config(weights)  # a clear error for a wrong --weights before reading the image
        dev = resolve_device(device)
        vol = io.load(image, what="image")
        model = build_model("default", seed=seed).to(dev) if weights == "random" else weights
        feats = image_features(vol, model, dev, modality=modality, ct_window=window, patch=patch)
        io.save(feats, out, force=force)
        typer.echo(f"wrote {feats.data.shape[0]} feature channels of {'x'.join(map(str, vol.shape))} voxels to {out}")
