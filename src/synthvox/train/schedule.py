"""The learning-rate schedule shared by pretraining and finetuning: linear warm-up, then decay.

The rate is a pure function of the step, so a resumed run follows the same schedule as one that
never stopped.
"""

from __future__ import annotations

import math

#: Steps of learning-rate warm-up after AdamW restarts (a checkpoint without optimizer state).
REWARM_STEPS = 100
DECAYS = ("cosine", "linear", "none")


def warmup_decay(
    step: int,
    peak: float,
    total: int,
    warmup: int,
    decay: str = "cosine",
    final_ratio: float = 0.0,
    rewarm_from: int | None = None,
    rewarm_steps: int = REWARM_STEPS,
) -> float:
    """Learning rate of optimisation step ``step`` (0-based).

    Args:
        step: the step about to be taken.
        peak: the rate reached at the end of the warm-up.
        total: the run's number of steps (the decay ends there).
        warmup: steps of linear warm-up (``(step + 1) / warmup`` of ``peak``); 0 for none.
        decay: ``"cosine"`` or ``"linear"`` from ``peak`` down to ``final_ratio * peak`` at ``total``,
            or ``"none"`` (constant after the warm-up).
        final_ratio: the rate at the end as a fraction of ``peak``.
        rewarm_from: the step at which the optimizer was restarted without its state; the rate then
            ramps up again over ``rewarm_steps`` steps, on top of the schedule.
        rewarm_steps: length of that second warm-up.
    """
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {', '.join(DECAYS)}, got {decay!r}")
    factor = 1.0
    if warmup > 0 and step < warmup:
        factor = (step + 1) / warmup
    elif decay != "none":
        span = max(1, total - warmup)
        p = min(1.0, max(0.0, (step - warmup) / span))
        if decay == "cosine":
            factor = final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * p))
        else:
            factor = 1.0 - (1 - final_ratio) * p
    if rewarm_from is not None and step >= rewarm_from:
        factor *= min(1.0, (step - rewarm_from + 1) / rewarm_steps)
    return peak * factor
