"""Batch-normalisation statistics for inference, re-estimated on synthetic views before a network is exported.

During pretraining a batch-normalised network normalises each layer by the statistics of its batch
(two views of one or two scenes on a CPU) and keeps a running average of them with momentum 0.1,
i.e. mostly over the last ten batches. At inference it uses that average instead, so features are a
fixed function of the image within their receptive field, whatever else the volume holds. Before
export, :func:`recalibrate` replaces the running statistics by their plain average over many
batches of the training distribution (samples the run never trained on), the usual last step of
training with batch normalisation (e.g. ``torch.optim.swa_utils.update_bn``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

#: Sample indices of the re-estimation batches start here, far beyond any training run's samples.
FIRST_INDEX = 10**12
#: Batches the statistics are re-estimated on when a checkpoint is exported as a model directory.
EXPORT_BATCHES = 64


def recalibrate(net: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Set every batch-norm layer's running statistics to their average over ``batches``.

    Each batch goes through ``net`` in training mode without gradients, with cumulative averaging
    (``momentum=None``); ``net`` comes back in the mode it was in and with its momenta. Returns the
    number of batches seen (0 leaves ``net`` unchanged).
    """
    layers = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return 0
    saved = {m: (m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in layers}
    was_training = net.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    n = 0
    net.train()
    with torch.no_grad():
        for x in batches:
            net(x)
            n += 1
    for m in layers:
        momentum, mean, var, count = saved[m]
        m.momentum = momentum
        if n == 0:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
    net.train(was_training)
    return n


def synthetic_views(config: dict[str, Any], n_batches: int, device: torch.device | str = "cpu") -> Iterable[torch.Tensor]:
    """``n_batches`` batches of views as a pretraining run with ``config`` (a checkpoint's ``config``)
    sees them: ``batch_pairs`` scenes each, both views, from sample :data:`FIRST_INDEX` on."""
    from synthvox.train.config import config_from_dict
    from synthvox.train.objective import build_engine

    cfg = config_from_dict(config)
    engine = build_engine(cfg, torch.device(device))
    k = int(cfg.batch_pairs)
    for b in range(int(n_batches)):
        first = FIRST_INDEX + b * k
        batch = engine.batch(list(range(first, first + k)))
        yield torch.cat([batch.view1, batch.view2])
