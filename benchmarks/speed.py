"""Speed of every stage in one run on one machine: engine, pretraining, features, registration, segmentation.

Stages (each with the baseline measured in the same run where there is a natural one):

- **engine**: synthetic pairs (label map + two views) per second at 128³ with the shipped shape
  bank, warm (templates prepared by a first pass over the same samples); baseline: the
  NumPy/SciPy version of the same steps from ``bench_synth.py``.
- **pretrain**: one contrastive pretraining step (``tiny`` config on the CPU, ``default`` at 128³ on
  CUDA), synthesis and network separately; baseline: a plain fp32 eager loop of the same model and
  loss (``bench_pretrain.py``).
- **features**: feature extraction of a 2 mm brain T1 (nichart Subj1) with the ``default``-variant
  UNet; the weights are randomly initialised (timing only: the cost does not depend on the values).
- **registration**: ``synthvox.registration.register`` of one nichart pair (T1 of Subj1 onto FLAIR
  of Subj4), seconds per stage, MIND features and, with weights (``--weights`` or the shipped ones),
  network features. No baseline (ANTs is not installed here): the load average is recorded.
- **segmentation**: finetuning seconds per step and inference seconds per 2 mm volume of a
  segmentation network finetuned for a few steps from random initialisation (``default`` variant;
  timing only, the model is not trained to convergence).

Writes ``speed.json`` and ``speed.md`` into ``--out`` (default ``benchmarks/results``).

    python -m benchmarks.speed                    # CPU, about 5 minutes on one core
    python -m benchmarks.speed --device cuda
    python -m benchmarks.speed --quick            # small sizes, a few repetitions (the test suite)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import common

STAGES = ("engine", "pretrain", "features", "registration", "segmentation")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_engine(device: torch.device, size: int, pairs: int, numpy_pairs: int) -> dict[str, Any]:
    """Warm engine seconds per pair (median) and the NumPy/SciPy version's, on the same samples."""
    from benchmarks.bench_synth import numpy_labels, numpy_view
    from synthvox.shapes import load_default_bank
    from synthvox.synth.appearance import AppearanceParams
    from synthvox.synth.engine import SynthConfig, SynthEngine
    from synthvox.synth.labels import LabelConfig, LabelParams

    bank = load_default_bank()
    cfg = SynthConfig(labels=LabelConfig(size=(size,) * 3))
    engine = SynthEngine(cfg, device, bank)
    t0 = time.perf_counter()
    for i in range(pairs):  # warm-up: prepares every template these samples use
        engine.batch([i])
    _sync(device)
    warm = time.perf_counter() - t0
    times = []
    for i in range(pairs):
        _sync(device)
        t = time.perf_counter()
        engine.batch([i])
        _sync(device)
        times.append(time.perf_counter() - t)
    eng = statistics.median(times)
    np_times = []
    rng = np.random.default_rng(0)
    for i in range(numpy_pairs):
        rec = engine.sample(i).params[0]
        lp = LabelParams.from_dict(rec["labels"])
        p1, p2 = AppearanceParams.from_dict(rec["view1"]), AppearanceParams.from_dict(rec["view2"])
        t = time.perf_counter()
        lab = numpy_labels(lp, cfg.labels, bank, rng)
        numpy_view(lab, p1, rng)
        numpy_view(lab, p2, rng)
        np_times.append(time.perf_counter() - t)
    base = statistics.median(np_times) if np_times else None
    return {
        "size": size,
        "pairs_timed": pairs,
        "warmup_s": warm,
        "s_per_pair": eng,
        "pairs_per_s": 1.0 / eng,
        "baseline": "NumPy/SciPy version (bench_synth.py)",
        "baseline_s_per_pair": base,
        "speedup": None if base is None else base / eng,
    }


def time_pretrain(device: torch.device, steps: int, warmup: int, synth_batches: int, prepare: bool) -> dict[str, Any]:
    """Seconds per pretraining step: synthesis + network, and a plain eager loop on the same batches."""
    from benchmarks.bench_pretrain import time_network, time_synthesis
    from synthvox.train.config import resolve_config
    from synthvox.train.objective import build_engine

    name = "default" if device.type == "cuda" else "tiny"
    cfg = resolve_config(name, ["tensorboard=false", "progress=false"])
    engine = build_engine(cfg, device)
    if prepare:
        engine.prepare()
    synth_s, batches = time_synthesis(engine, cfg.batch_pairs, synth_batches, device)
    ours, plain = float("inf"), float("inf")
    for _ in range(2):  # interleaved, best of two: the machine may be shared
        ours = min(ours, time_network(cfg, batches, device, warmup, steps))
        plain = min(plain, time_network(cfg, batches, device, warmup, steps, plain=True))
    step = synth_s + ours
    vox = 2 * cfg.batch_pairs * int(np.prod(cfg.data.size))
    return {
        "config": name,
        "size": list(cfg.data.size),
        "batch_pairs": cfg.batch_pairs,
        "synthesis_s_per_step": synth_s,
        "network_s_per_step": ours,
        "s_per_step": step,
        "steps_per_s": 1.0 / step,
        "voxels_per_s": vox / step,
        "synthesis_share": synth_s / step,
        "baseline": "plain fp32 eager loop, same model and loss (bench_pretrain.py)",
        "baseline_s_per_step": plain,
        "speedup": plain / ours,
    }


def brain_t1(spacing: float | None) -> Any:
    """nichart Subj1's T1 (2 mm), optionally resampled to a coarser ``spacing``."""
    from synthvox import io
    from synthvox.volume import resample_to_spacing

    vol = io.load(common.nichart_paths("Subj1")["t1"])
    return vol if spacing is None else resample_to_spacing(vol, (spacing,) * 3, mode="linear")


def time_features(device: torch.device, variant: str, spacing: float | None, repeats: int) -> dict[str, Any]:
    """Seconds per volume of ``extract_features`` with a randomly initialised UNet (median of ``repeats``)."""
    from synthvox.models import build_model, count_parameters, extract_features, normalise_intensity

    vol = brain_t1(spacing)
    model = build_model(variant, seed=0).to(device).eval()
    x = normalise_intensity(vol.data.float())
    extract_features(model, x[:, :32, :32, :32], device)  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        extract_features(model, x, device)
        _sync(device)
        times.append(time.perf_counter() - t)
    return {
        "variant": variant,
        "n_parameters": count_parameters(model),
        "weights": "random initialisation (timing only)",
        "shape": list(vol.shape),
        "spacing_mm": [round(float(s), 3) for s in vol.spacing],
        "window": 128,
        "s_per_volume": statistics.median(times),
    }


def time_registration(device: torch.device, weights: Path | None, quick: bool) -> dict[str, Any]:
    """Seconds per stage of ``register`` on one nichart T1 -> FLAIR pair, MIND (and net with weights)."""
    from synthvox import io
    from synthvox.registration import RegistrationConfig, register

    mov, fix = common.nichart_paths("Subj1"), common.nichart_paths("Subj4")
    moving, moving_labels = io.load(mov["t1"]), io.load_labels(mov["dlmuse"])
    fixed, fixed_labels = io.load(fix["flair"]), io.load_labels(fix["flair_dlmuse"])
    cfg = RegistrationConfig(spacing=4.0, affine_iters=(10, 5), adam_iters=10) if quick else RegistrationConfig()
    groups = common.dlmuse_groups()
    out: dict[str, Any] = {"pair": "Subj1 T1 -> Subj4 FLAIR", "config": "quick (4 mm, few iterations)" if quick else "default",
                           "baseline": None, "baseline_note": "no ANTs on this machine: no ratio; see load average"}
    kinds = ["mind"] + (["net"] if weights is not None else [])
    if weights is None:
        out["net_skipped"] = "no weights (--weights or shipped default): network features not timed"
    from synthvox.metrics import dice_per_label

    for kind in kinds:
        t = time.perf_counter()
        res = register(fixed, moving, features=kind, weights=None if weights is None else str(weights), device=device,
                       moving_labels=moving_labels, config=cfg)
        _sync(device)
        total = time.perf_counter() - t
        d = dice_per_label(res.moved_labels.data, fixed_labels.data, groups)
        out[kind] = {"s_per_pair": total, "stages_s": res.report["seconds"],
                     "mean_dice_14": float(np.nanmean(list(d.values())))}
    return out


def time_segmentation(device: torch.device, variant: str, steps: int, patch: int, batch: int,
                      spacing: float | None) -> dict[str, Any]:
    """Finetune seconds per step and inference seconds per volume (random-init network, a few steps)."""
    from benchmarks.fewshot import load_subject, step_seconds
    from synthvox.segmentation import FinetuneConfig, finetune, load_model_dir, segment_with

    groups = common.dlmuse_groups()
    image, labels = load_subject("Subj1", groups)
    test, _ = load_subject("Subj2", groups)
    with tempfile.TemporaryDirectory(prefix="speed_seg_") as tmp:
        out = Path(tmp) / "model"
        # the same settings on every device (not the device's defaults): the timings compare
        cfg = FinetuneConfig(init="random", variant=variant, steps=steps, patch_size=[patch] * 3, batch_size=batch,
                             seed=0, spacing=spacing, val_every=steps)
        finetune([image], [labels], cfg, out_dir=out, device=device, progress=False)
        timing = step_seconds(out / "log.csv")
        net, meta = load_model_dir(out, device)
        segment_with(net, meta, corner_crop(test, 40), device=device)  # warm-up
        _sync(device)
        t = time.perf_counter()
        seg = segment_with(net, meta, test, device=device)
        _sync(device)
        inf = time.perf_counter() - t
    return {
        "model": f"{variant} variant, random initialisation, finetuned {steps} steps on Subj1 (timing only)",
        "patch": patch,
        "batch": batch,
        "training_spacing_mm": spacing or 2.0,
        "finetune_s_per_step": timing["s_per_step"],
        "finetune_steps_per_s": 1.0 / timing["s_per_step"],
        "inference_s_per_volume": inf,
        "inference_shape": list(seg.shape),
        "baseline": None,
    }


def corner_crop(vol: Any, n: int) -> Any:
    """The first ``n``³ corner of a volume (same affine): a cheap warm-up input."""
    from synthvox.volume import Volume

    return Volume(vol.data[:, :n, :n, :n].contiguous(), vol.affine)


def markdown(payload: dict[str, Any]) -> str:
    """One table: stage, what is timed, ours, baseline, ratio."""
    r = payload["stages"]
    rows: list[list[Any]] = []

    def add(stage: str, what: str, ours: float | None, base: float | None = None, unit: str = "s") -> None:
        ratio = f"{base / ours:.1f}×" if (ours and base) else None
        rows.append([stage, what, None if ours is None else f"{ours:.3g} {unit}",
                     None if base is None else f"{base:.3g} {unit}", ratio])

    for name in STAGES:
        s = r.get(name, {})
        if "skipped" in s:
            rows.append([name, s["skipped"], None, None, None])
            continue
        if name == "engine":
            add(name, f"pair at {s['size']}³ (warm)", s["s_per_pair"], s["baseline_s_per_pair"])
        elif name == "pretrain":
            add(name, f"step, {s['config']} config ({'×'.join(map(str, s['size']))}), synthesis", s["synthesis_s_per_step"])
            add(name, "step, network (vs plain eager loop)", s["network_s_per_step"], s["baseline_s_per_step"])
        elif name == "features":
            add(name, f"{'×'.join(map(str, s['shape']))} brain volume, {s['variant']} UNet", s["s_per_volume"])
        elif name == "registration":
            for kind in ("mind", "net"):
                if kind in s:
                    st = s[kind]["stages_s"]
                    parts = ", ".join(f"{k} {v:.2g}" for k, v in st.items() if k != "total")
                    add(name, f"pair, {kind} features ({parts})", s[kind]["s_per_pair"])
        elif name == "segmentation":
            add(name, f"finetune step ({s['patch']}³ × {s['batch']})", s["finetune_s_per_step"])
            add(name, f"inference, {'×'.join(map(str, s['inference_shape']))} volume", s["inference_s_per_volume"])
    la = payload["load_avg_before_after"]
    head = (f"{payload['date']} · commit {payload['commit']} · {common.machine_line(payload['machine'])} · "
            f"device {payload['device']} · load avg {la[0]} → {la[1]}" + (" · quick mode" if payload["quick"] else ""))
    return head + "\n\n" + common.md_table(["stage", "what", "synthvox", "baseline", "speed-up"], rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: unchanged)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    ap.add_argument("--weights", type=Path, default=None, help="pretrained model for network registration features")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    ap.add_argument("--quick", action="store_true", help="small sizes and few repetitions (the test suite)")
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}: use {', '.join(STAGES)}")
    from synthvox.models import default_weights_path

    weights = args.weights or default_weights_path()
    q = args.quick
    header = common.header("speed", args.device)
    load0 = os.getloadavg()[0]
    print(f"{common.machine_line(header['machine'])}; device {device}{'; quick' if q else ''}", flush=True)
    data = common.has_shared_data()
    no_data = f"nichart_dev not found under {common.eval_dir()}"
    runners = {
        "engine": lambda: time_engine(device, 32 if q else 128, 2 if q else 12, 1 if q else 2),
        "pretrain": lambda: time_pretrain(device, 3 if q else 20, 1 if q else 3, 2 if q else 10, prepare=not q),
        "features": lambda: time_features(device, "tiny" if q else "default", 4.0 if q else None, 1 if q else 3),
        "registration": lambda: time_registration(device, weights, q),
        "segmentation": lambda: time_segmentation(device, "tiny" if q else "default", 3 if q else 6,
                                                  32 if q else 96, 1 if q else 2, 4.0 if q else None),
    }
    results: dict[str, Any] = {}
    for name in stages:
        if name in ("features", "registration", "segmentation") and not data:
            results[name] = {"skipped": no_data}
            print(f"{name}: skipped ({no_data})", flush=True)
            continue
        t = time.perf_counter()
        results[name] = runners[name]()
        results[name]["stage_wall_s"] = time.perf_counter() - t
        results[name]["load_avg_after"] = round(os.getloadavg()[0], 2)
        print(f"{name}: {({k: v for k, v in results[name].items() if isinstance(v, (int, float))})}", flush=True)
    payload = {
        **header,
        "device": str(device),
        "quick": q,
        "weights": None if weights is None else str(weights),
        "load_avg_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "stages": results,
        "peak_rss_mb": common.peak_rss_mb(),
    }
    md = markdown(payload)
    js, mdp = common.write_results("speed", payload, md, args.out)
    print("\n" + md)
    print(f"wrote {js}, {mdp}")
    return payload


if __name__ == "__main__":
    main()
