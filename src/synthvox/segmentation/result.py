"""What segmenting one image gives: its label map, optionally per-label probabilities, and a quality figure.

The quality figure lets a study's few failures be found without opening every scan (as nnU-Net users
sort by a confidence): it lies in ``[0, 1]``, higher is more trustworthy, and ``measure`` says what it is:

- a model: ``1 - mean entropy``, the softmax entropy (divided by its maximum, ``log C``) averaged over
  the voxels the model calls anything but background; a scan unlike the training scans (another
  anatomy, a flipped or cut-off one) gets uncertain probabilities over the structures it finds;
- atlas fusion: ``atlas agreement``, the share of the atlases whose label equals the fused label,
  averaged over the fused foreground.

An image where nothing but background is found scores 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from synthvox.volume import Volume

#: ``Segmentation.measure`` of a model's quality figure.
ENTROPY = "1 - mean entropy"
#: ``Segmentation.measure`` of atlas fusion's quality figure.
AGREEMENT = "atlas agreement"


@dataclass
class Segmentation:
    """One image's segmentation.

    Attributes:
        labels: ``(1, X, Y, Z)`` integer label map on the image's grid.
        probabilities: ``(C, X, Y, Z)`` float32 on the same grid, channel ``k`` the probability of
            ``label_ids[k]``, summing to one in every voxel, with ``labels`` their argmax; ``None``
            unless asked for.
        label_ids: the label ids of the probability channels, in order.
        quality: the quality figure in ``[0, 1]`` (higher: more trustworthy), or ``None``.
        measure: what ``quality`` is (:data:`ENTROPY` or :data:`AGREEMENT`).
    """

    labels: Volume
    probabilities: Volume | None = None
    label_ids: tuple[int, ...] = ()
    quality: float | None = None
    measure: str = ""


def as_segmentation(result: Segmentation | Volume) -> Segmentation:
    """A segmenter's result as a :class:`Segmentation` (a bare label map has no quality figure)."""
    return result if isinstance(result, Segmentation) else Segmentation(result)


class EntropyMeter:
    """Accumulates ``1 - mean normalised entropy`` over the non-background voxels, slab by slab.

    Args:
        label_ids: the ids of the probability channels; id 0, when among them, is background.
    """

    def __init__(self, label_ids: list[int] | tuple[int, ...]) -> None:
        self.background = list(label_ids).index(0) if 0 in label_ids else None
        self.log_c = math.log(len(label_ids)) if len(label_ids) > 1 else 1.0
        self.total = 0.0
        self.count = 0

    def add(self, prob: torch.Tensor, arg: torch.Tensor) -> None:
        """One slab: ``(C, ...)`` probabilities and their argmax channel index ``(...)``."""
        fg = arg != self.background if self.background is not None else torch.ones_like(arg, dtype=torch.bool)
        if not bool(fg.any()):
            return
        p = prob[:, fg].clamp_min(1e-12)
        h = -(p * p.log()).sum(0) / self.log_c
        self.total += float(h.sum())
        self.count += int(fg.sum())

    @property
    def quality(self) -> float:
        """``1 - mean normalised entropy``; 0 when no voxel was anything but background."""
        return 0.0 if self.count == 0 else max(0.0, 1.0 - self.total / self.count)


def probabilities_path(labels_path: str | Path) -> Path:
    """Where ``--probabilities`` writes the maps of the label map ``labels_path``: ``NAME_probabilities.EXT``
    beside ``NAME.EXT``, in the label map's format (``.nii.gz`` for a name in none of
    :data:`synthvox.writers.WRITE_FORMATS`), the label ids of its channels in ``NAME_probabilities.json``."""
    from synthvox.writers import suffix_of

    p = Path(labels_path)
    name, ext = p.name, suffix_of(p)
    if ext is None:
        return p.with_name(name + "_probabilities.nii.gz")
    return p.with_name(name[: -len(ext)] + "_probabilities" + name[len(name) - len(ext):])


def probabilities_sidecar(labels_path: str | Path) -> Path:
    """The JSON beside :func:`probabilities_path` that names the label id of each channel."""
    from synthvox.writers import suffix_of

    p = probabilities_path(labels_path)
    return p.with_name(p.name[: -len(suffix_of(p) or "")] + ".json")
