"""DDP with two CPU processes (gloo): it runs, and its gradient is the single-process gradient."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp
from test_pretrain import BlobPairs, tiny_cfg

from synthvox.train.checkpointing import list_checkpoints, load_checkpoint
from synthvox.train.distributed import DistInfo, cleanup_distributed, init_distributed
from synthvox.train.objective import batch_loss, build_module, sample_indices
from synthvox.train.pretrain import pretrain

CFG = ("steps=2", "ckpt_every=1", "keep_last=5", "log_every=1", "batch_pairs=1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info, device = init_distributed(torch.device("cpu"), DistInfo(rank, world, rank))
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        cfg = tiny_cfg(*CFG)
        src = BlobPairs((32, 32, 32))
        ddp = DDP(build_module(cfg, device))
        loss, _ = batch_loss(ddp, src, sample_indices(0, rank, world, cfg.batch_pairs), cfg.seed, device)
        loss.backward()
        if rank == 0:
            from safetensors.torch import save_file

            grads = {n: p.grad.detach().clone() for n, p in ddp.module.named_parameters()}
            save_file(grads, os.path.join(out, "ddp_grads.safetensors"))
        # the training command itself under DDP
        pretrain(cfg, os.path.join(out, "run"), device, source=src, dist_info=info)
    finally:
        cleanup_distributed()


def test_ddp_two_processes_match_single_process_gradient(tmp_path) -> None:
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    from safetensors.torch import load_file

    ddp_grads = load_file(str(tmp_path / "ddp_grads.safetensors"))
    cfg = tiny_cfg(*CFG)
    module = build_module(cfg, torch.device("cpu"))
    indices = [i for r in range(world) for i in sample_indices(0, r, world, cfg.batch_pairs)]
    loss, _ = batch_loss(module, BlobPairs((32, 32, 32)), indices, cfg.seed, torch.device("cpu"))
    loss.backward()
    for n, p in module.named_parameters():
        assert torch.allclose(ddp_grads[n], p.grad, rtol=1e-4, atol=1e-6), n
    # only rank 0 wrote; each step consumed world * batch_pairs samples
    run = tmp_path / "run"
    found = list_checkpoints(run / "checkpoints")
    assert [s for s, _ in found] == [1, 2]
    _, state = load_checkpoint(found[-1][1])
    assert state["world_size"] == 2 and state["samples_seen"] == 4
    assert (run / "model" / "config.json").is_file()
    assert not list((run / "checkpoints").glob(".*"))
