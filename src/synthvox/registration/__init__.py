"""Multimodal registration on learned features or MIND-SSC (ConvexAdam-style)."""

from synthvox.registration.pipeline import RegistrationConfig, RegistrationResult, register
from synthvox.registration.warp import apply_warp

__all__ = ["RegistrationConfig", "RegistrationResult", "apply_warp", "register"]
