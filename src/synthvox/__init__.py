"""synthvox: general-purpose voxel features for 3D biomedical volumes, learned from synthetic data.

The Python API mirrors the command line (each command is a thin layer on one of these)::

    import synthvox
    from synthvox import io

    fixed, moving = io.load("ct.nii.gz"), io.load("mr.nii.gz")
    result = synthvox.register(fixed, moving, features="net")        # synthvox register
    io.save(result.moved, "moved.nii.gz")
    synthvox.register_many("pairs.csv", "study")                     # synthvox register --pairs

    model_dir = synthvox.finetune([image], [labels], out_dir="MODEL")  # synthvox finetune
    seg = synthvox.segment(model_dir, new_image)                     # synthvox segment
    feats = synthvox.features(image)                                 # synthvox features

Heavy modules (torch, monai) are imported on first use, so ``import synthvox`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from synthvox.errors import InputError
from synthvox.volume import Volume

__version__ = "0.1.0"

#: Public name -> (module, attribute), imported on first access.
_LAZY: dict[str, tuple[str, str]] = {
    "register": ("synthvox.registration", "register"),
    "register_many": ("synthvox.registration.batch", "register_many"),
    "apply_warp": ("synthvox.registration", "apply_warp"),
    "RegistrationConfig": ("synthvox.registration", "RegistrationConfig"),
    "finetune": ("synthvox.segmentation", "finetune"),
    "segment": ("synthvox.segmentation", "segment"),
    "FinetuneConfig": ("synthvox.segmentation", "FinetuneConfig"),
    "load_model": ("synthvox.models", "load_model"),
    "load_default_model": ("synthvox.models", "load_default_model"),
    "features": ("synthvox.models.extract", "image_features"),
    "SynthEngine": ("synthvox.synth", "SynthEngine"),
    "run_demo": ("synthvox.demo", "run_demo"),
}

__all__ = ["InputError", "Volume", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'synthvox' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
