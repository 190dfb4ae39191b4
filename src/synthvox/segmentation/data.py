"""Training data for finetuning: volumes in the model's frame, and the patches each step draws.

The training volumes are brought to one frame (closest canonical orientation, a common spacing: the
median of the inputs unless given), intensities are normalised, and label ids are mapped to
contiguous class indices (kept in the model directory and mapped back by ``segment``). Each step draws
patches, a ``foreground_fraction`` of them centred on a random voxel of a random foreground class,
and augments them (:mod:`synthvox.segmentation.augment`). Step ``i`` of seed ``s`` draws the same
patches in every run, so a resumed run continues exactly where its checkpoint left off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from synthvox.errors import InputError
from synthvox.segmentation.augment import augment_batch
from synthvox.segmentation.config import FinetuneConfig
from synthvox.segmentation.infer import check_image
from synthvox.volume import Volume, resample_to_spacing, same_grid, to_canonical


@dataclass
class Subject:
    """A training (or validation) volume in the model's frame."""

    image: torch.Tensor  # (1, X, Y, Z) float32, normalised
    classes: torch.Tensor  # (1, X, Y, Z) int64 contiguous class indices
    affine: np.ndarray
    #: flat voxel indices of each foreground class present (class index -> indices)
    foreground: dict[int, torch.Tensor] = field(default_factory=dict)


def check_pair(image: Volume, labels: Volume, what: str) -> None:
    check_image(image, f"{what} image")
    if not isinstance(labels, Volume):
        raise InputError(f"{what} label map must be a synthvox Volume, got {type(labels).__name__}")
    if labels.data.shape[0] != 1:
        raise InputError(f"{what} label map must be a single-channel 3D volume, got {labels.data.shape[0]} channels")
    if not same_grid(image, labels):
        raise InputError(
            f"{what} label map does not match its image's grid (shapes {labels.shape} and {image.shape}, "
            "or different affines): resample it onto the image first"
        )
    lab = labels.data
    if torch.is_floating_point(lab) and not torch.allclose(lab, lab.round(), atol=1e-3):
        raise InputError(f"{what} label map has non-integer values")
    if (lab < 0).any():
        raise InputError(f"{what} label map has negative label ids")


def label_ids_of(labels: Sequence[Volume]) -> list[int]:
    """The sorted union of label ids; each map must hold at least two (background and a structure)."""
    ids: set[int] = set()
    for i, lab in enumerate(labels):
        present = torch.unique(lab.data.round().long()).tolist()
        if len(present) < 2:
            raise InputError(
                f"training label map {i + 1} has only one label (id {present[0] if present else 'none'}): "
                "it needs background and at least one structure"
            )
        ids.update(int(v) for v in present)
    return sorted(ids)


def common_spacing(images: Sequence[Volume]) -> list[float]:
    """Median spacing per axis of the canonical (RAS) arrays."""
    sp = np.stack([to_canonical(Volume(im.data[:1, :1, :1, :1], im.affine)).spacing for im in images])
    return [float(s) for s in np.median(sp, axis=0)]


def to_classes(labels: torch.Tensor, label_ids: Sequence[int], what: str = "label map") -> torch.Tensor:
    """Map label ids to contiguous class indices (``label_ids[i] -> i``)."""
    ids = torch.as_tensor(list(label_ids), dtype=torch.int64, device=labels.device)
    idx = torch.searchsorted(ids, labels.long()).clamp_(max=len(ids) - 1)
    bad = ids[idx] != labels
    if bad.any():
        unknown = sorted(set(torch.unique(labels[bad]).tolist()))[:10]
        raise InputError(f"{what} has label ids that are not in the training labels: {unknown}")
    return idx


def prepare_subject(
    image: Volume,
    labels: Volume,
    label_ids: Sequence[int],
    spacing: Sequence[float],
    normalisation: dict[str, Any],
    what: str = "training",
) -> Subject:
    """Bring an image and its label map to the model frame (canonical, ``spacing``, normalised)."""
    from synthvox.segmentation.infer import normalise

    check_pair(image, labels, what)
    im = to_canonical(image)
    lab = to_canonical(labels)
    im = Volume(normalise(im.data, normalisation), im.affine)
    sp = tuple(float(s) for s in spacing)
    if not np.allclose(im.spacing, sp, rtol=1e-4, atol=1e-5):
        im = resample_to_spacing(im, sp, mode="linear")
        lab = resample_to_spacing(lab, sp, mode="nearest")
    classes = to_classes(lab.data.round().long(), label_ids, f"{what} label map")
    flat = classes.reshape(-1)
    fg = {}
    for c in torch.unique(flat).tolist():
        if c != 0 or label_ids[0] != 0:
            fg[int(c)] = torch.nonzero(flat == c).reshape(-1)
    return Subject(im.data.float().contiguous(), classes.contiguous(), im.affine, fg)


# ----------------------------------------------------------------------------------------------------
# Patches


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of step ``step`` for base ``seed`` (independent of any earlier step)."""
    from synthvox.seeding import FINETUNE_STEPS, generator

    return generator(seed, FINETUNE_STEPS, step)


def sample_centres(
    subjects: Sequence[Subject],
    n: int,
    foreground_fraction: float,
    generator: torch.Generator,
    exclude: int | None = None,
) -> list[tuple[int, torch.Tensor]]:
    """``n`` (subject index, centre voxel) pairs; a ``foreground_fraction`` of them on a random
    voxel of a random foreground class, the others anywhere in the volume. Subject ``exclude``
    (one held out for the check) is never drawn."""
    eligible = [i for i in range(len(subjects)) if i != exclude]
    if not eligible:
        raise ValueError("no subject left to draw patches from")
    out = []
    for _ in range(n):
        s = eligible[int(torch.randint(len(eligible), (1,), generator=generator))]
        sub = subjects[s]
        shape = torch.tensor(sub.image.shape[1:])
        on_fg = bool(torch.rand((), generator=generator) < foreground_fraction) and len(sub.foreground) > 0
        if on_fg:
            keys = sorted(sub.foreground)
            cls = keys[int(torch.randint(len(keys), (1,), generator=generator))]
            pool = sub.foreground[cls]
            flat = int(pool[int(torch.randint(len(pool), (1,), generator=generator))])
            yz = int(shape[1] * shape[2])
            centre = torch.tensor([flat // yz, (flat // int(shape[2])) % int(shape[1]), flat % int(shape[2])])
        else:
            centre = (torch.rand(3, generator=generator) * (shape - 1)).round().long()
        out.append((s, centre.float()))
    return out


def draw_batch(
    subjects: Sequence[Subject], cfg: FinetuneConfig, step: int, device: torch.device, exclude: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The augmented batch of step ``step``: images ``(B, 1, *patch)`` and classes ``(B, 1, *patch)``,
    none of them from subject ``exclude``."""
    g = step_generator(cfg.seed, step)
    centres = sample_centres(subjects, cfg.batch_size, cfg.foreground_fraction, g, exclude)
    return augment_batch(
        [subjects[s].image for s, _ in centres],
        [subjects[s].classes for s, _ in centres],
        [c for _, c in centres],
        cfg.patch_size,
        cfg.augment,
        g,
        device,
    )
