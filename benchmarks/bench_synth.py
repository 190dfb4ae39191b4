"""Speed of the data engine: synthetic pairs (label map + two views) per second at 128^3.

Measures, in one run and on the same samples:

- the synthvox engine (PyTorch: ``SynthEngine.batch``), split into label maps and views;
- a straightforward NumPy/SciPy version of the same steps with the same parameters: each template
  placed by ``scipy.ndimage.affine_transform`` over the whole volume, the foreground by
  ``zoom`` + morphology, the views by NumPy/SciPy (``gaussian_filter``, ``zoom``, ``numpy.fft``).

Usage::

    python -m benchmarks.bench_synth                 # CPU, 2 threads, 128^3
    python -m benchmarks.bench_synth --device cuda --batch 8

Template preparation is a one-off per template (cached for the engine's lifetime, like the method's
own preprocessing of its templates), so the timed samples are rendered once as a warm-up first.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from scipy import ndimage


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------------------------------
# NumPy / SciPy reference of the same steps


def numpy_labels(lp, cfg, bank, rng: np.random.Generator) -> np.ndarray:
    """Label map of ``lp`` (a LabelParams) the straightforward way: one full-volume affine per template."""
    from synthvox.shapes import template_to_cube
    from synthvox.shapes.procedural import procedural_cubes

    size = np.asarray(lp.size)
    res = cfg.max_resolution
    out = np.zeros(lp.size, dtype=np.int32)
    for rank, t in enumerate(lp.templates, start=1):
        if t.source == "bank":
            cube = template_to_cube(bank.get(t.index), res).numpy()
            half = float(np.max(bank.extents_mm[t.index])) / 2
        else:
            gen = torch.Generator().manual_seed(int(t.index))
            cube = procedural_cubes(1, 32, gen, "cpu")[0, 0].float().numpy()
            cube = ndimage.zoom(cube, res / 32, order=1)
            half = t.size_mm / 2
        cube = ndimage.gaussian_filter(cube, cfg.smoothing)
        # output voxel p -> cube index q = A (p - c) + (res - 1) / 2
        fwd = t.affine.matrix() * (half / lp.voxel_mm) * (2.0 / res)
        inv = np.linalg.inv(fwd)
        offset = (res - 1) / 2 - inv @ np.asarray(t.centre)
        occ = ndimage.affine_transform(cube, inv, offset=offset, output_shape=tuple(size), order=1) > cfg.threshold
        out[occ] = rank
    if lp.foreground is not None:
        fg = lp.foreground
        axes = [(np.arange(n) - (n - 1) / 2) / (n * fg.radius) for n in size]
        x, y, z = np.meshgrid(*axes, indexing="ij")
        norm = np.sqrt(x**2 + y**2 + z**2)
        noise = ndimage.zoom(rng.standard_normal((6, 6, 6)), size / 6, order=3)
        mask = norm <= np.exp(fg.roughness * noise / max(noise.std(), 1e-6))
        out[~mask] = 0
        out[mask & (out == 0)] = len(lp.templates) + 1
        if fg.envelope:
            ball = ndimage.generate_binary_structure(3, 1)
            dil = ndimage.binary_dilation(mask, ball, iterations=fg.envelope)
            ero = ndimage.binary_erosion(mask, ball, iterations=fg.envelope)
            out[dil & ~ero] = len(lp.templates) + 2
    _, inverse = np.unique(out, return_inverse=True)
    return inverse.reshape(out.shape)


def numpy_view(labels: np.ndarray, p, rng: np.random.Generator) -> np.ndarray:
    """One view of ``labels`` with the appearance parameters ``p``, step by step in NumPy/SciPy."""
    shape = np.asarray(labels.shape)
    # (the NumPy foreground differs slightly, so a label map may hold a label more or less)
    lab = labels % len(p.means)
    means = np.array([m[0] for m in p.means]) / 255
    stds = np.array([s[0] for s in p.stds]) / 255
    x = means[lab] + stds[lab] * rng.standard_normal(labels.shape)
    if p.texture is not None:
        tex = np.zeros(labels.shape)
        for scale, std in zip(p.texture.scales, p.texture.stds):
            coarse = rng.standard_normal(np.maximum(2, np.ceil(shape / scale).astype(int)))
            tex += std * ndimage.zoom(coarse, shape / coarse.shape, order=3)
        x = x * np.clip(1 + p.texture.amplitude * tex, 0, None)
    x = np.clip(x, 0, None)
    if p.bias is not None:
        coarse = rng.standard_normal(p.bias.coarse_shape) * p.bias.strength
        x = x * np.exp(ndimage.zoom(coarse, shape / np.asarray(coarse.shape), order=3))
    if p.gamma is not None:
        m = x.max()
        x = (x / m) ** p.gamma * m
    if p.blur is not None:
        x = ndimage.gaussian_filter(x, p.blur)
    if p.sharpen is not None:
        x = x + p.sharpen.amount * (x - ndimage.gaussian_filter(x, p.sharpen.sigma))
    if p.low_res is not None:
        f = np.ones(3)
        f[p.low_res.axis] = 1 / p.low_res.factor
        small = ndimage.zoom(ndimage.gaussian_filter1d(x, p.low_res.factor / 2.355, axis=p.low_res.axis), f, order=1)
        x = ndimage.zoom(small, shape / np.asarray(small.shape), order=1)
    if p.spikes is not None or p.gibbs is not None:
        spec = np.fft.rfftn(x)
        if p.spikes is not None:
            for pos, mag in zip(p.spikes.positions, p.spikes.magnitudes):
                k = tuple(int(round(r * (s // 2))) % s for r, s in zip(pos, spec.shape))
                spec[k] += mag * abs(spec[0, 0, 0])
        if p.gibbs is not None:
            for ax in p.gibbs.axes:
                keep = int(p.gibbs.keep_fraction * spec.shape[ax] / (1 if ax == 2 else 2))
                sl = [slice(None)] * 3
                if ax == 2:
                    sl[ax] = slice(keep, None)
                else:
                    sl[ax] = slice(keep, spec.shape[ax] - keep)
                spec[tuple(sl)] = 0
        x = np.fft.irfftn(spec, s=labels.shape, axes=(0, 1, 2))
    if p.noise is not None:
        s = p.noise.std * np.abs(x).max()
        if p.noise.kind == "rician":
            x = np.sqrt((x + s * rng.standard_normal(x.shape)) ** 2 + (s * rng.standard_normal(x.shape)) ** 2)
        else:
            x = x + s * rng.standard_normal(x.shape)
    lo, hi = np.percentile(x, [0.5, 99.5])
    return np.clip((x - lo) / max(hi - lo, 1e-12), 0, 1).astype(np.float32)


# ---------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch and BLAS threads on the CPU")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=12, help="pairs timed for the engine")
    ap.add_argument("--numpy-pairs", type=int, default=2, help="pairs timed for NumPy/SciPy (0: skip)")
    ap.add_argument("--batch", type=int, default=1, help="pairs per engine call")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from synthvox.shapes import load_default_bank
    from synthvox.synth.engine import SynthConfig, SynthEngine
    from synthvox.synth.labels import LabelConfig, render_labels_batch, sample_label_params

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    bank = load_default_bank()
    cfg = SynthConfig(labels=LabelConfig(size=(args.size,) * 3))
    engine = SynthEngine(cfg, device, bank)
    load_before = os.getloadavg()

    indices = list(range(args.pairs))
    batches = [indices[i : i + args.batch] for i in range(0, len(indices), args.batch)]
    t0 = time.perf_counter()
    for b in batches:  # warm-up: prepares (and caches) every template these samples use
        engine.batch(b)
    sync()
    warm_s = time.perf_counter() - t0

    pair_s, label_s = [], []
    for b in batches:
        gens = [engine.generator(i) for i in b]
        lps = [sample_label_params(g, cfg.labels, engine.n_bank) for g in gens]
        sync()
        t = time.perf_counter()
        render_labels_batch(lps, cfg.labels, engine._bank_set, engine._procedural, device)
        sync()
        label_s.append((time.perf_counter() - t) / len(b))
        t = time.perf_counter()
        engine.batch(b)
        sync()
        pair_s.append((time.perf_counter() - t) / len(b))
    eng_pair = statistics.median(pair_s)
    eng_label = statistics.median(label_s)
    print(f"engine: {eng_pair:.3f} s/pair (labels {eng_label:.3f} s); warm-up {warm_s:.1f} s", flush=True)

    np_pair = np_label = None
    if args.numpy_pairs > 0:
        rng = np.random.default_rng(0)
        np_pairs, np_labels = [], []
        for i in range(args.numpy_pairs):
            rec = engine.sample(i).params[0]
            from synthvox.synth.appearance import AppearanceParams
            from synthvox.synth.labels import LabelParams

            lp = LabelParams.from_dict(rec["labels"])
            p1, p2 = AppearanceParams.from_dict(rec["view1"]), AppearanceParams.from_dict(rec["view2"])
            t = time.perf_counter()
            lab = numpy_labels(lp, cfg.labels, bank, rng)
            tl = time.perf_counter() - t
            numpy_view(lab, p1, rng)
            numpy_view(lab, p2, rng)
            np_pairs.append(time.perf_counter() - t)
            np_labels.append(tl)
        np_pair, np_label = statistics.median(np_pairs), statistics.median(np_labels)

    load_after = os.getloadavg()
    result = {
        "date": dt.date.today().isoformat(),
        "machine": f"{os.cpu_count()}-core CPU, {cpu_model()}"
        + (f"; GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        "torch": torch.__version__,
        "device": str(device),
        "threads": args.threads,
        "size": args.size,
        "batch": args.batch,
        "pairs_timed": args.pairs,
        "warmup_s": round(warm_s, 2),
        "engine_s_per_pair": round(eng_pair, 4),
        "engine_labels_s": round(eng_label, 4),
        "engine_views_s": round(eng_pair - eng_label, 4),
        "engine_pairs_per_s": round(1 / eng_pair, 2),
        "numpy_s_per_pair": None if np_pair is None else round(np_pair, 3),
        "numpy_labels_s": None if np_label is None else round(np_label, 3),
        "numpy_pairs_per_s": None if np_pair is None else round(1 / np_pair, 3),
        "speedup": None if np_pair is None else round(np_pair / eng_pair, 1),
        "load_average": [round(load_before[0], 2), round(load_after[0], 2)],
    }
    print(f"{result['machine']}, torch {torch.__version__}, {args.threads} threads, {args.size}^3, {result['date']}")
    print(f"load average (1 min) before/after: {result['load_average']}")
    print(f"synthvox engine : {eng_pair:.3f} s/pair ({1 / eng_pair:.2f} pairs/s); labels {eng_label:.3f} s, views {eng_pair - eng_label:.3f} s")
    if np_pair is not None:
        print(f"NumPy/SciPy     : {np_pair:.2f} s/pair ({1 / np_pair:.3f} pairs/s); labels {np_label:.2f} s")
        print(f"speed-up        : {np_pair / eng_pair:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
