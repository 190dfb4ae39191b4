"""Threads that hold up on a busy machine: independent tasks side by side, each on one torch thread.

Registration runs loops of small tensor operations (the candidates' and the affine fit's Adam steps,
the instance optimisation). Split across torch's intra-op threads, every operation waits at a barrier
for all of them, and on a machine whose cores are shared with other jobs a descheduled thread stalls
each of those thousands of barriers: measured on a busy 2-core machine, 2 intra-op threads made one
brain pair take 209 s instead of 10 s on one. Instead :func:`single_op_threads` runs the whole
registration with one intra-op thread, and :func:`run_tasks` spreads *independent* tasks (the initial
candidates, FIXED's and MOVING's features, the two directions of the convex search, the outputs)
over as many Python threads as torch was allowed (torch releases the GIL inside its operations), so
a slow core delays one task, not every operation. Results do not depend on the number of threads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def single_op_threads(device: torch.device) -> Iterator[int]:
    """Within the block torch uses one intra-op CPU thread; yields how many it was allowed before
    (restored afterwards). On another device nothing changes and 1 is yielded."""
    if device.type != "cpu":
        yield 1
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield max(1, n)
    finally:
        torch.set_num_threads(n)


def run_tasks(tasks: Sequence[Callable[[], Any]], workers: int) -> list[Any]:
    """Run independent zero-argument callables on ``workers`` threads; results in order (the first
    exception is raised). With one worker (or one task) they run here, one after the other."""
    if workers <= 1 or len(tasks) <= 1:
        return [t() for t in tasks]
    with ThreadPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
        futures = [pool.submit(t) for t in tasks]
        return [f.result() for f in futures]
