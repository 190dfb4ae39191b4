"""The synthetic data engine: label ensembles, spatial transforms, appearance, two-view pairs.

Heavy submodules are imported on first use, so ``import synthvox.synth`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SynthConfig": "synthvox.synth.engine",
    "SynthBatch": "synthvox.synth.engine",
    "SynthEngine": "synthvox.synth.engine",
    "sample_generator": "synthvox.synth.engine",
    "LabelConfig": "synthvox.synth.labels",
    "LabelParams": "synthvox.synth.labels",
    "sample_label_params": "synthvox.synth.labels",
    "render_labels": "synthvox.synth.labels",
    "AffineParams": "synthvox.synth.spatial",
    "AffineRange": "synthvox.synth.spatial",
    "ElasticParams": "synthvox.synth.spatial",
    "ElasticRange": "synthvox.synth.spatial",
    "sample_affine": "synthvox.synth.spatial",
    "sample_elastic": "synthvox.synth.spatial",
    "apply_spatial": "synthvox.synth.spatial",
    "AppearanceConfig": "synthvox.synth.appearance",
    "AppearanceParams": "synthvox.synth.appearance",
    "sample_appearance": "synthvox.synth.appearance",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'synthvox.synth' has no attribute {name!r}")
