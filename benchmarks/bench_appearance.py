"""Speed of the appearance model at 128^3 against a straightforward NumPy/SciPy version of the same steps.

Both implementations render the same parameter sets (drawn by ``sample_appearance``) of the same
label map in one run: the average random configuration and the worst case (every step on). The
NumPy/SciPy version is what one would write first: ``table[labels]`` plus ``rng.normal`` for the
Gaussian mixtures, ``scipy.ndimage.zoom`` for the texture octaves and the bias field,
``gaussian_filter`` for blur and sharpening, ``uniform_filter1d`` + ``zoom`` for thick slices, a full
``numpy.fft.fftn`` for spikes and Gibbs, ``numpy.percentile`` for the normalisation (float64, NumPy's
default). Its images are not bit-identical to synthvox's (other random streams and interpolators),
but they do the same work.

    python -m benchmarks.bench_appearance [--size 128] [--threads 2] [--views 12]

Prints wall-clock ms per view (mean and median) and process CPU ms per view for each, the ratios,
the time of a two-view ``render_batch`` call, and a per-step breakdown of synthvox's steps. On a
shared machine (see the printed load average) wall-clock times swing; with ``--threads 1`` the CPU
times are the stable figure. With several threads the CPU time also counts OpenMP's spin-waiting.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time

import numpy as np
import scipy.ndimage as ndi
import torch

from synthvox.synth.appearance import (
    AppearanceConfig,
    AppearanceParams,
    add_noise,
    apply_gamma,
    bias_field,
    gaussian_blur,
    gmm_intensities,
    low_resolution,
    normalise,
    perlin_noise,
    render,
    render_batch,
    sample_appearance,
)
from synthvox.synth.artefacts import gibbs_ringing, kspace_spikes


def voronoi_labels(size: int, n_labels: int, seed: int = 0) -> torch.Tensor:
    """A ``size^3`` label map of ``n_labels`` Voronoi cells (ids 0..n_labels-1)."""
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(n_labels, 3, generator=g) * size
    ax = torch.arange(size, dtype=torch.float32)
    lab = torch.empty(size, size, size, dtype=torch.long)
    yz = torch.stack(torch.meshgrid(ax, ax, indexing="ij"), -1).reshape(-1, 2)
    for x in range(size):
        c = torch.cat([torch.full((yz.shape[0], 1), float(x)), yz], 1)
        lab[x] = torch.cdist(c, pts).argmin(1).reshape(size, size)
    return lab


# ------------------------------------------------------------------------ NumPy/SciPy reference


def _zoom_to(a: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    out = ndi.zoom(a, [s / n for s, n in zip(shape, a.shape)], order=order, mode="nearest", grid_mode=True)
    return out[tuple(slice(0, s) for s in shape)]


def numpy_render(labels: np.ndarray, p: AppearanceParams, percentiles=(0.5, 99.5)) -> np.ndarray:
    """The same steps as :func:`synthvox.synth.appearance.render`, written plainly with NumPy/SciPy."""
    shape = labels.shape
    rng = np.random.default_rng(p.seed)
    k = max(len(m) for m in p.means)
    means = np.zeros((len(p.means), k))
    stds = np.zeros_like(means)
    cum = np.ones_like(means)
    for i, (m, s, w) in enumerate(zip(p.means, p.stds, p.weights)):
        means[i, : len(m)], stds[i, : len(m)], cum[i, : len(w)] = m, s, np.cumsum(w)
    comp = np.zeros(shape, dtype=np.int64)
    if k > 1:
        u = rng.random(shape)
        for j in range(k - 1):
            comp += u > cum[labels, j]
    img = (means[labels, comp] + stds[labels, comp] * rng.standard_normal(shape)) / 255.0
    if p.texture is not None:
        t = p.texture
        trng = np.random.default_rng(t.seed)
        tex = np.zeros(shape)
        for scale, std in zip(t.scales, t.stds):
            coarse = trng.standard_normal([math.ceil(n / scale) + 1 for n in shape]) * std
            tex += _zoom_to(coarse, shape, order=1) if scale > 1 else coarse[tuple(slice(0, s) for s in shape)]
        img = img + t.amplitude * tex if t.additive else img * np.clip(1 + t.amplitude * tex, 0, None)
    img = np.clip(img, 0, None)
    if p.bias is not None:
        coarse = np.random.default_rng(p.bias.seed).standard_normal(p.bias.coarse_shape) * p.bias.strength
        img = img * np.exp(_zoom_to(coarse, shape, order=3))
    if p.gamma is not None:
        m = img.max()
        img = m * (img / m) ** p.gamma
    if p.blur is not None:
        img = ndi.gaussian_filter(img, p.blur, mode="nearest", truncate=3.0)
    if p.sharpen is not None:
        img = img + p.sharpen.amount * (img - ndi.gaussian_filter(img, p.sharpen.sigma, mode="nearest", truncate=3.0))
    if p.low_res is not None:
        ax, f = p.low_res.axis, p.low_res.factor
        avg = ndi.uniform_filter1d(img, size=max(1, round(f)), axis=ax, mode="nearest")
        m = max(1, round(shape[ax] / f))
        zoom_down = [1.0] * 3
        zoom_down[ax] = m / shape[ax]
        low = ndi.zoom(avg, zoom_down, order=1, mode="nearest", grid_mode=True)
        img = _zoom_to(low, shape, order=1)
    if p.spikes is not None or p.gibbs is not None:
        spec = np.fft.fftn(img)
        if p.spikes is not None:
            dc = np.abs(img).sum()
            for rel, mag, ph in zip(p.spikes.positions, p.spikes.magnitudes, p.spikes.phases):
                kk = tuple(int(round(r * (n // 2))) % n for r, n in zip(rel, shape))
                spec[kk] += dc * mag * np.exp(1j * ph)
                spec[tuple(-q % n for q, n in zip(kk, shape))] += dc * mag * np.exp(-1j * ph)
        if p.gibbs is not None:
            for ax in p.gibbs.axes:
                n = shape[ax]
                freq = np.abs(np.fft.fftfreq(n, d=1.0 / n))
                keep = freq <= max(1, math.floor(p.gibbs.keep_fraction * (n // 2)))
                spec *= keep.reshape([-1 if a == ax else 1 for a in range(3)])
        img = np.real(np.fft.ifftn(spec))
    if p.noise is not None:
        nrng = np.random.default_rng(p.noise.seed)
        std = p.noise.std * np.abs(img).max()
        img = img + nrng.normal(0, std, shape)
        if p.noise.kind == "rician":
            img = np.sqrt(img**2 + nrng.normal(0, std, shape) ** 2)
    lo, hi = np.percentile(img, percentiles)
    return (np.clip(img, lo, hi) - lo) / max(hi - lo, 1e-12)


# ---------------------------------------------------------------------------------------- timing


def timed(fn) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one call."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - w) * 1e3, (time.process_time() - c) * 1e3


def bench_params(name, labels, params, repeats=1):
    lab_np = labels.numpy()
    render(labels, params[0])  # warm-up
    t_wall, t_cpu, n_wall, n_cpu = [], [], [], []
    for p in params:
        for _ in range(repeats):
            w, c = timed(lambda p=p: render(labels, p))
            t_wall.append(w)
            t_cpu.append(c)
        w, c = timed(lambda p=p: numpy_render(lab_np, p))
        n_wall.append(w)
        n_cpu.append(c)
    tw, nw = statistics.mean(t_wall), statistics.mean(n_wall)
    tc, nc = statistics.mean(t_cpu), statistics.mean(n_cpu)
    print(
        f"{name:<22} synthvox {tw:7.1f} ms/view wall ({statistics.median(t_wall):6.1f} median, {tc:6.1f} CPU)"
        f"   numpy/scipy {nw:7.1f} ms/view wall ({nc:6.1f} CPU)   speed-up {nw / tw:5.1f}x wall, {nc / tc:5.1f}x CPU"
    )
    return tw, nw


def step_breakdown(size: int, labels: torch.Tensor, n_labels: int) -> None:
    shape = (size, size, size)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    p = sample_appearance(torch.Generator().manual_seed(1), n_labels, AppearanceConfig.all_on())
    steps = {
        "gmm intensities": lambda: gmm_intensities(labels, p.means, p.stds, p.weights, 1, 1 / 255),
        "perlin (4 octaves)": lambda: perlin_noise(shape, (4, 8, 16, 32), 3, "cpu", (1, 2, 3, 4)),
        "bias field": lambda: bias_field(shape, (4, 4, 4), 3, 0.3, "cpu"),
        "gamma": lambda: apply_gamma(x, 0.7),
        "blur sigma=1": lambda: gaussian_blur(x, (1.0, 1.0, 1.0)),
        "low-res x4 axis 0": lambda: low_resolution(x, 0, 4.0),
        "spikes (own FFT)": lambda: kspace_spikes(x, [(3, 4, 5)], 0.1),
        "gibbs (own FFT)": lambda: gibbs_ringing(x, (0, 1), 0.5),
        "noise rician": lambda: add_noise(x, 0.05, 1, "rician"),
        "normalise": lambda: normalise(x),
    }
    print("synthvox per step (ms, median of 5 wall / CPU):")
    for name, fn in steps.items():
        fn()
        runs = [timed(fn) for _ in range(5)]
        print(f"  {name:<22} {statistics.median(r[0] for r in runs):6.1f} / {statistics.median(r[1] for r in runs):6.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--views", type=int, default=12, help="random parameter sets for the average case")
    ap.add_argument("--labels", type=int, default=40)
    args = ap.parse_args()
    try:
        from synthvox.cli.common import tune_allocator

        tune_allocator()
    except ImportError:
        pass
    torch.set_num_threads(args.threads)
    print(f"appearance model at {args.size}^3, {args.labels} labels, torch {torch.__version__} with {args.threads} threads, "
          f"numpy {np.__version__}, {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    labels = voronoi_labels(args.size, args.labels)
    avg = [sample_appearance(torch.Generator().manual_seed(s), args.labels) for s in range(args.views)]
    worst = [sample_appearance(torch.Generator().manual_seed(s), args.labels, AppearanceConfig.all_on(max_components=3))
             for s in range(3)]
    bench_params("average random config", labels, avg)
    bench_params("worst case (all on)", labels, worst)
    pair = torch.stack([labels, labels])
    render_batch(pair, avg[:2])
    runs = [timed(lambda i=i: render_batch(pair, avg[2 * i : 2 * i + 2])) for i in range(args.views // 2)]
    print(f"two views in one render_batch call: {statistics.mean(r[0] for r in runs):.1f} ms wall "
          f"({statistics.mean(r[1] for r in runs):.1f} CPU) per pair of views")
    step_breakdown(args.size, labels, args.labels)


if __name__ == "__main__":
    main()
