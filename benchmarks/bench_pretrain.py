"""Pretraining speed: steps/s and voxels/s, split into synthesis and network time.

CPU (default): the ``tiny`` config (32^3, tiny UNet, one pair per step) through ``synthvox.train``'s
training step, against a plain fp32 eager loop of the same model and loss on pre-rendered batches,
measured in the same run.

GPU (``--device cuda``): the ``default`` config (128^3, 5.9 M-parameter UNet) for eager fp32, bf16,
bf16 + channels-last, bf16 + channels-last + ``torch.compile``, with batch 1 pair and larger batches;
synthesis timed separately on the same device. Reports ms per 128^3 pair (synthesis included) and the
synthesis share.

    python -m benchmarks.bench_pretrain                      # CPU, tiny
    python -m benchmarks.bench_pretrain --device cuda --batches 1 2 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_synthesis(engine: Any, batch_pairs: int, n: int, device: torch.device, start: int = 0) -> tuple[float, list[Any]]:
    """Seconds per batch of the engine (after a warm-up batch), and the rendered batches."""
    engine.batch(list(range(10_000_000, 10_000_000 + batch_pairs)))  # warm-up
    out, t = [], 0.0
    for i in range(n):
        _sync(device)
        t0 = time.perf_counter()
        b = engine.batch(list(range(start + i * batch_pairs, start + (i + 1) * batch_pairs)))
        _sync(device)
        t += time.perf_counter() - t0
        out.append(b)
    return t / n, out


def time_network(cfg: Any, batches: list[Any], device: torch.device, warmup: int, steps: int, plain: bool = False) -> float:
    """Median seconds per optimisation step on pre-rendered batches.

    ``plain``: a straightforward loop (AdamW, no clipping, no schedule, no finiteness checks) of the
    same model and loss, with the config's precision options.
    """
    from synthvox.train.objective import build_module, make_optimizer, pair_generators
    from synthvox.train.pretrain import lr_at

    module = build_module(cfg, device)
    opt = make_optimizer(module, cfg) if not plain else torch.optim.AdamW(module.parameters(), lr=cfg.optim.lr)
    params = [p for p in module.parameters()]
    times = []
    for i in range(warmup + steps):
        b = batches[i % len(batches)]
        _sync(device)
        t0 = time.perf_counter()
        gens = pair_generators(range(i * cfg.batch_pairs, (i + 1) * cfg.batch_pairs), cfg.seed, device)
        loss, _ = module(b.view1, b.view2, b.labels, gens)
        loss.backward()
        if not plain:
            for g in opt.param_groups:
                g["lr"] = lr_at(i, cfg)
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            if torch.isfinite(loss.detach()) and torch.isfinite(gn):
                opt.step()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]  # median: robust to other work on a shared machine


def run_cpu(args: argparse.Namespace) -> dict[str, Any]:
    from synthvox.train.config import resolve_config
    from synthvox.train.objective import build_engine

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    cfg = resolve_config("tiny", ["tensorboard=false", "progress=false"])
    engine = build_engine(cfg, device)
    engine.prepare()  # build every template once: a long run pays this only at its start
    synth_s, batches = time_synthesis(engine, cfg.batch_pairs, args.synth_batches, device)
    ours, plain = float("inf"), float("inf")
    for _ in range(2):  # interleaved, best of two: the machine may be shared
        ours = min(ours, time_network(cfg, batches, device, args.warmup, args.steps))
        plain = min(plain, time_network(cfg, batches, device, args.warmup, args.steps, plain=True))
    vox = 2 * cfg.batch_pairs * int(torch.tensor(cfg.data.size).prod())
    step = synth_s + ours
    return {
        "device": "cpu",
        "threads": args.threads,
        "config": "tiny",
        "size": list(cfg.data.size),
        "batch_pairs": cfg.batch_pairs,
        "synthesis_s_per_step": synth_s,
        "network_s_per_step": ours,
        "network_overhead_vs_plain": ours / plain,
        "plain_eager_network_s_per_step": plain,
        "steps_per_s": 1 / step,
        "voxels_per_s": vox / step,
        "network_voxels_per_s": vox / ours,
        "synthesis_share": synth_s / step,
    }


def run_cuda(args: argparse.Namespace) -> dict[str, Any]:
    from synthvox.train.config import resolve_config
    from synthvox.train.objective import build_engine

    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    variants = {
        "eager fp32": ["amp=false", "channels_last=false", "compile=false"],
        "bf16": ["amp=true", "channels_last=false", "compile=false"],
        "bf16 + channels-last": ["amp=true", "channels_last=true", "compile=false"],
        "bf16 + channels-last + compile": ["amp=true", "channels_last=true", "compile=true"],
    }
    rows = []
    for bp in args.batches:
        base = resolve_config("default", [f"batch_pairs={bp}", "tensorboard=false", "progress=false"])
        engine = build_engine(base, device)
        engine.prepare()
        synth_s, batches = time_synthesis(engine, bp, args.synth_batches, device)
        for name, ov in variants.items():
            if name.endswith("compile") and args.no_compile:
                continue
            cfg = resolve_config("default", [f"batch_pairs={bp}", *ov])
            try:
                net_s = time_network(cfg, batches, device, args.warmup, args.steps)
            except torch.cuda.OutOfMemoryError:
                rows.append({"variant": name, "batch_pairs": bp, "error": "out of memory"})
                torch.cuda.empty_cache()
                continue
            step = synth_s + net_s
            rows.append(
                {
                    "variant": name,
                    "batch_pairs": bp,
                    "synthesis_s_per_step": synth_s,
                    "network_s_per_step": net_s,
                    "steps_per_s": 1 / step,
                    "ms_per_pair": 1000 * step / bp,
                    "voxels_per_s": 2 * bp * 128**3 / step,
                    "synthesis_share": synth_s / step,
                    "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
                }
            )
            torch.cuda.reset_peak_memory_stats()
            print(json.dumps(rows[-1]), flush=True)
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=20, help="timed optimisation steps per variant")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--synth-batches", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4], help="pairs per step (GPU)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    res = run_cpu(args) if args.device == "cpu" else run_cuda(args)
    res.update(machine=platform.machine(), processor=platform.processor() or platform.platform(), date=time.strftime("%Y-%m-%d"))
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
