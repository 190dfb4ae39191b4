"""Trilinear sampling of a feature volume at many points, split over threads, differentiable in the points.

The loops of registration (the affine fits, the instance optimisation) spend most of their time in
``grid_sample``'s forward and backward: on the CPU a single ``(1, C, X, Y, Z)`` input is sampled by one
thread whatever torch's intra-op setting (the kernel parallelises over the batch only), so those
loops ran on one core while the other idled. :func:`sample_points` cuts the points into one chunk
per worker and samples each on its own Python thread (torch releases the GIL inside the kernel),
forward and backward: one wait per call instead of a barrier per small operation, which is what
made intra-op threads collapse on a busy machine (see :mod:`synthvox.registration.parallel`). Every
point is sampled exactly as by ``grid_sample``, so the values and gradients do not depend on the
number of workers.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F

# fewer points than this per chunk: one call on this thread is faster than the hand-off
MIN_CHUNK = 4096
_PADDING = {"zeros": 0, "border": 1, "reflection": 2}
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``workers - 1`` threads (the calling thread takes the first chunk)."""
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(max_workers=workers - 1, thread_name_prefix="synthvox-sample")
        return _pools[workers]


def _chunks(n: int, workers: int) -> list[slice]:
    k = max(1, min(workers, n // MIN_CHUNK))
    step = -(-n // k)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _map(fn: Any, parts: list[slice], workers: int) -> list[Any]:
    """``fn(part)`` for every part: the first here, the others on the pool."""
    if len(parts) == 1:
        return [fn(parts[0])]
    futures = [_pool(workers).submit(fn, p) for p in parts[1:]]
    first = fn(parts[0])
    return [first, *(f.result() for f in futures)]


class _SamplePoints(torch.autograd.Function):
    """``grid_sample`` of ``(1, C, X, Y, Z)`` at ``(1, N, 1, 1, 3)`` positions by chunks of points."""

    @staticmethod
    def forward(ctx: Any, vol: torch.Tensor, grid: torch.Tensor, padding: int, workers: int) -> torch.Tensor:
        parts = _chunks(grid.shape[1], workers)
        outs = _map(lambda p: torch.grid_sampler(vol, grid[:, p], 0, padding, True), parts, workers)
        ctx.save_for_backward(vol, grid)
        ctx.padding, ctx.workers, ctx.parts = padding, workers, parts
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        vol, grid = ctx.saved_tensors
        grad_out = grad_out.contiguous()

        def part(p: slice) -> torch.Tensor:
            return torch.ops.aten.grid_sampler_3d_backward(grad_out[:, :, p], vol, grid[:, p], 0, ctx.padding,
                                                           True, [False, True])[1]

        grads = _map(part, ctx.parts, ctx.workers)
        return None, (torch.cat(grads, dim=1) if len(grads) > 1 else grads[0]), None, None


def sample_points(vol: torch.Tensor, pos: torch.Tensor, padding: str = "zeros", workers: int = 1) -> torch.Tensor:
    """Trilinear samples of ``(C, X, Y, Z)`` at ``(N, 3)`` positions in ``grid_sample``'s normalised,
    reversed coordinates (:func:`synthvox.volume.normalise_coords`; ``align_corners=True``) -> ``(C, N)``.

    Differentiable in ``pos`` (not in ``vol``); ``workers`` threads share the points (one: a plain
    ``grid_sample``). ``padding``: ``"zeros"``, ``"border"`` or ``"reflection"``.
    """
    grid = pos.reshape(1, -1, 1, 1, 3)
    if workers <= 1 or grid.shape[1] < 2 * MIN_CHUNK or vol.requires_grad or vol.device.type != "cpu":
        out = F.grid_sample(vol[None], grid, mode="bilinear", padding_mode=padding, align_corners=True)
    else:
        out = _SamplePoints.apply(vol[None].contiguous(), grid.contiguous(), _PADDING[padding], workers)
    return out[0, :, :, 0, 0]
