"""The feature network: a 3D UNet, its named variants, self-describing weights and feature extraction."""

from synthvox.models.extract import extract_features, normalise_intensity
from synthvox.models.registry import VARIANTS, build_model, variant_kwargs
from synthvox.models.unet import UNet, count_parameters
from synthvox.models.weightsdir import (
    default_weights_path,
    load_default_model,
    load_model,
    read_model_config,
    save_model,
)

__all__ = [
    "UNet",
    "VARIANTS",
    "build_model",
    "count_parameters",
    "default_weights_path",
    "extract_features",
    "load_default_model",
    "load_model",
    "normalise_intensity",
    "read_model_config",
    "save_model",
    "variant_kwargs",
]
