"""The ``synthvox`` command: one Typer app, one module per subcommand.

Each subcommand module defines ``add_commands(app)``, which adds its command(s) to the app. Heavy imports
(torch, nibabel, monai) stay inside the command functions so that ``synthvox --help`` is instant.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="synthvox",
    help="General-purpose voxel features for 3D biomedical volumes, learned from synthetic data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from synthvox import __version__

        typer.echo(f"synthvox {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """General-purpose voxel features for 3D biomedical volumes, learned from synthetic data."""


#: Subcommand modules, in the order ``--help`` lists them.
SUBCOMMANDS: list[str] = ["demo", "register", "segment", "features", "pretrain", "synth", "shapes"]

for _name in SUBCOMMANDS:
    importlib.import_module(f"synthvox.cli.{_name}").add_commands(app)


def main() -> None:
    """Console-script entry point."""
    from synthvox.cli.common import tune_allocator

    tune_allocator()
    app()


if __name__ == "__main__":
    main()
