"""The one seed derivation: a random stream for every ``(base seed, key, ...)``, the same on every machine.

Sample ``i`` of seed ``s`` (the data engine), finetuning step ``t`` of seed ``s``, procedural shape
``k``: each gets its own ``torch.Generator`` from a hash of the base seed and its keys through NumPy's
``SeedSequence``, so neighbouring seeds and keys give unrelated streams and nothing depends on global
random state or on the order in which streams are made (STYLE habit 2).
"""

from __future__ import annotations

import numpy as np
import torch

#: Keys that keep the streams of different consumers of one base seed apart.
FINETUNE_STEPS = 0xF1E7
#: The voxels the new head's linear probe is fitted on (:mod:`synthvox.segmentation.head`).
PROBE_VOXELS = 0x9B0E


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed from ``seed`` and non-negative integer ``keys`` (any seed, negative included)."""
    if any(int(k) < 0 for k in keys):
        raise ValueError(f"seed keys must be non-negative, got {keys}")
    ss = np.random.SeedSequence([int(seed) & (2**64 - 1), *(int(k) for k in keys)])
    return int(ss.generate_state(1, np.uint64)[0]) >> 1


def generator(seed: int, *keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`derive_seed`."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *keys))
