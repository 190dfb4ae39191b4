"""Shapes for the data engine: a bank of anatomical templates cut from label maps, and procedural shapes."""

from synthvox.shapes.bank import (
    ShapeBank,
    build_bank,
    default_bank_path,
    load_default_bank,
    template_to_cube,
    templates_from_label_map,
)
from synthvox.shapes.procedural import deformed_sphere, procedural_cubes

__all__ = [
    "ShapeBank",
    "build_bank",
    "default_bank_path",
    "deformed_sphere",
    "load_default_bank",
    "procedural_cubes",
    "template_to_cube",
    "templates_from_label_map",
]
