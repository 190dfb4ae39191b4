"""Training data for finetuning: volumes in the model's frame, and the patches each step draws.

The training volumes are brought to one frame (closest canonical orientation, a common spacing: the
median of the inputs unless given), intensities are normalised, and label ids are mapped to
contiguous class indices (kept in the model directory and mapped back by ``segment``). Each step draws
patches, a ``foreground_fraction`` of them centred on a random voxel of a random foreground class,
and augments them (:mod:`synthvox.segmentation.augment`). Step ``i`` of seed ``s`` draws the same
patches in every run, so a resumed run continues exactly where its checkpoint left off.

Pseudo-labelled volumes (:class:`PseudoLabels`, made by :mod:`synthvox.segmentation.distill`) carry a
weight per voxel (their confidence, zero below a floor); their patches come with that weight map,
sampled on the same grid as the labels, for the loss (:mod:`synthvox.losses.dice_ce`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from synthvox.errors import InputError
from synthvox.segmentation.augment import augment_batch, extract_patch, patch_grid, sample_patch_augment
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
    #: (1, X, Y, Z) float32 weight of each voxel in the loss (pseudo-labels); ``None``: all one
    weight: torch.Tensor | None = None


@dataclass
class PseudoLabels:
    """Volumes labelled by another method (atlas fusion, :mod:`synthvox.segmentation.distill`) to train on
    beside the labelled pairs: each voxel's loss is weighted by its confidence, zero below
    ``min_confidence``, and the checks never score them (they are not ground truth).

    Attributes:
        images: the images (any grid and orientation).
        labels: one label map per image, on its grid, with label ids of the labelled pairs.
        confidence: one map per image, on its grid, in ``[0, 1]``.
        names: one name per image (the metadata and error messages use it).
        min_confidence: voxels less confident than this weigh zero; the others their confidence.
        labelled_every: every this many steps (steps ``0, k, 2k, ...``) draw from the labelled pairs,
            the other steps from the pseudo-labelled volumes (1: never from them).
        record: how they were made (recorded in the model directory's metadata).
    """

    images: list[Volume]
    labels: list[Volume]
    confidence: list[Volume]
    names: list[str]
    min_confidence: float = 0.5
    labelled_every: int = 3
    record: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Refuse lists of unequal lengths and settings out of range (one line)."""
        n = len(self.images)
        if not (len(self.labels) == len(self.confidence) == len(self.names) == n):
            raise InputError(f"pseudo-labels: {n} images, {len(self.labels)} label maps, {len(self.confidence)} "
                             f"confidence maps and {len(self.names)} names: give one of each per image")
        if n == 0:
            raise InputError("pseudo-labels: no pseudo-labelled image")
        check_pseudo_settings(self.min_confidence, self.labelled_every)

    def weights(self, i: int) -> Volume:
        """The loss weight of each voxel of volume ``i``: its confidence, zero below ``min_confidence``."""
        conf = self.confidence[i]
        return Volume(torch.where(conf.data >= self.min_confidence, conf.data, torch.zeros_like(conf.data)).float(),
                      conf.affine)

    def labelled_step(self, step: int) -> bool:
        """Whether step ``step`` (0-based) draws from the labelled pairs."""
        return step % self.labelled_every == 0


def check_pseudo_settings(min_confidence: float, labelled_every: int) -> None:
    """Refuse a confidence floor outside ``[0, 1)`` or a draw interval that is not a whole number >= 1."""
    if isinstance(min_confidence, bool) or not isinstance(min_confidence, (int, float)) or not 0.0 <= min_confidence < 1.0:
        raise InputError(f"--min-confidence must be a number in [0, 1), got {min_confidence!r}")
    if isinstance(labelled_every, bool) or not isinstance(labelled_every, int) or labelled_every < 1:
        raise InputError(f"labelled_every must be a whole number of at least 1, got {labelled_every!r}")


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
    weight: Volume | None = None,
) -> Subject:
    """Bring an image and its label map (and a per-voxel loss ``weight`` on its grid, resampled as the
    labels are) to the model frame (canonical, ``spacing``, normalised)."""
    from synthvox.segmentation.infer import normalise

    check_pair(image, labels, what)
    if weight is not None:
        check_weight(image, weight, what)
    im = to_canonical(image)
    lab = to_canonical(labels)
    w = to_canonical(weight) if weight is not None else None
    im = Volume(normalise(im.data, normalisation), im.affine)
    sp = tuple(float(s) for s in spacing)
    if not np.allclose(im.spacing, sp, rtol=1e-4, atol=1e-5):
        im = resample_to_spacing(im, sp, mode="linear")
        lab = resample_to_spacing(lab, sp, mode="nearest")
        w = resample_to_spacing(w, sp, mode="nearest") if w is not None else None
    classes = to_classes(lab.data.round().long(), label_ids, f"{what} label map")
    flat = classes.reshape(-1)
    fg = {}
    for c in torch.unique(flat).tolist():
        if c != 0 or label_ids[0] != 0:
            fg[int(c)] = torch.nonzero(flat == c).reshape(-1)
    w_data = w.data.float().contiguous() if w is not None else None
    return Subject(im.data.float().contiguous(), classes.contiguous(), im.affine, fg, w_data)


def check_weight(image: Volume, weight: Volume, what: str) -> None:
    """Refuse a weight map that is not one finite channel in ``[0, 1]`` on the image's grid."""
    if not isinstance(weight, Volume) or weight.data.shape[0] != 1:
        raise InputError(f"{what} confidence map must be a single-channel 3D volume")
    if not same_grid(image, weight):
        raise InputError(f"{what} confidence map does not match its image's grid (shapes {weight.shape} and {image.shape}, "
                         "or different affines)")
    d = weight.data
    if not torch.is_floating_point(d) or not torch.isfinite(d).all() or (d < 0).any() or (d > 1).any():
        raise InputError(f"{what} confidence map must hold finite values in [0, 1]")


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


def draw_weighted_batch(
    subjects: Sequence[Subject], cfg: FinetuneConfig, step: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The augmented batch of step ``step`` from subjects with weight maps: images, classes and weights
    ``(B, 1, *patch)``. The patches are drawn and augmented exactly as :func:`draw_batch` draws them
    (same generator, same calls); each weight map is sampled on its patch's grid by nearest
    neighbour, as the labels are, so every class voxel keeps its own weight (0 outside the volume)."""
    g = step_generator(cfg.seed, step)
    centres = sample_centres(subjects, cfg.batch_size, cfg.foreground_fraction, g)
    xs, ys, ws = [], [], []
    for s, centre in centres:
        sub = subjects[s]
        if sub.weight is None:
            raise ValueError("draw_weighted_batch needs subjects with weight maps")
        aug = sample_patch_augment(g, cfg.augment)
        x, y = extract_patch(sub.image, sub.classes, centre, cfg.patch_size, aug, device)
        grid = patch_grid(sub.image.shape[1:], centre, cfg.patch_size, aug, device)
        w = F.grid_sample(sub.weight[None].to(device), grid, mode="nearest", padding_mode="zeros", align_corners=True)[0]
        xs.append(x)
        ys.append(y)
        ws.append(w)
    return torch.stack(xs), torch.stack(ys), torch.stack(ws)
