"""``synthvox pretrain``: contrastive pretraining of the feature network on synthetic pairs."""

from __future__ import annotations

from pathlib import Path

import typer

from synthvox.cli.common import DeviceOption, ForceOption, user_errors


def add_commands(app: typer.Typer) -> None:
    """Add the ``pretrain`` command to ``app``."""

    @app.command(
        "pretrain",
        epilog=(
            "Examples: 'synthvox pretrain --config tiny --out runs/tiny' (CPU, about a minute); "
            "'torchrun --nproc-per-node 8 $(which synthvox) pretrain --config default --out runs/big'; "
            "'synthvox pretrain --out runs/big --resume steps=200000'."
        ),
    )
    @user_errors
    def pretrain_cmd(
        overrides: list[str] = typer.Argument(None, help="Config overrides key=value, e.g. optim.lr=1e-3 batch_pairs=4 data.size=96."),
        config: str = typer.Option("tiny", "--config", help="Preset (tiny, default) or a YAML file."),
        out: Path = typer.Option(..., "--out", help="Run folder: config.yaml, checkpoints/, log.csv, tensorboard/, model/."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the newest intact checkpoint in RUN (start fresh if none)."),
        device: str = DeviceOption,
        seed: int = typer.Option(None, "--seed", help="Base random seed (overrides the config's)."),
        force: bool = ForceOption,
    ) -> None:
        """Contrastive pretraining of the UNet on synthetic pairs made on the fly; works under torchrun."""
        import torch

        from synthvox.cli.common import resolve_device
        from synthvox.train.config import load_yaml, resolve_config
        from synthvox.train.distributed import cleanup_distributed, env_dist_info, init_distributed
        from synthvox.train.pretrain import pretrain

        saved = out / "config.yaml"
        base = load_yaml(saved) if resume and saved.is_file() else None
        cfg = resolve_config(config, list(overrides or []), seed=seed, base=base)
        info = env_dist_info()
        dev = resolve_device(device)
        info, dev = init_distributed(dev, info)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        try:
            result = pretrain(cfg, out, dev, resume=resume, force=force, dist_info=info)
        finally:
            cleanup_distributed()
        if info.is_main:
            msg = f"step {result.step}/{cfg.steps}, last loss {result.last_loss:.4f}, skipped {result.skipped} step(s)"
            if result.interrupted:
                typer.echo(f"stopped by signal {result.signal} at {msg}; checkpoint {result.checkpoint}; continue with --resume", err=True)
            else:
                typer.echo(f"done: {msg}; weights in {result.model_dir}")
        if result.interrupted and result.signal is not None:
            raise typer.Exit(128 + int(result.signal))
