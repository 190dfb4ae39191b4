"""What segmenting one image gives: its label map, optionally per-label probabilities, and a quality figure.

The quality figure lets a study's few failures be found without opening every scan (as nnU-Net users
sort by a confidence): it lies in ``[0, 1]``, higher is more trustworthy, and ``measure`` says what it is:

- a model: ``1 - mean entropy``, the softmax entropy (divided by its maximum, ``log C``) averaged over
  the voxels the model calls anything but background; a scan unlike the training scans (another
  anatomy, a flipped one) gets uncertain probabilities over the structures it finds. A model that
  records its training label maps' volumes multiplies that by the ``volume agreement``: the mean over
  the training structures of ``min(v, V) / max(v, V)``, the volume found ``v`` against the training
  mean ``V`` (0 for a structure not found). A scan cut off by its field of view is segmented
  confidently where it has anatomy, so its entropy looks fine, but the structures it lacks are
  missing (on nichart, a copy of a scan cut to its upper 45 % had an entropy figure above two of
  the intact scans');
- atlas fusion: ``atlas agreement``, the share of the atlases whose label equals the fused label,
  averaged over the fused foreground.

An image where nothing but background is found scores 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from synthvox.volume import Volume

#: ``Segmentation.measure`` of a model's quality figure (models without recorded training volumes).
ENTROPY = "1 - mean entropy"
#: ``Segmentation.measure`` of a model's quality figure when its training volumes are recorded.
ENTROPY_VOLUME = "(1 - mean entropy) x volume agreement"
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


def label_volumes_ml(labels: Volume) -> dict[str, float]:
    """The volume (mL) of every non-zero label id of a label map, keyed by the id as text."""
    ids, counts = torch.unique(labels.data.round().long(), return_counts=True)
    voxel_ml = abs(float(np.linalg.det(np.asarray(labels.affine, np.float64)[:3, :3]))) / 1000.0
    return {str(int(i)): float(c) * voxel_ml for i, c in zip(ids.tolist(), counts.tolist()) if i != 0}


def mean_label_volumes_ml(label_maps: list[Volume]) -> dict[str, float]:
    """The mean of :func:`label_volumes_ml` over label maps (a label absent from a map counts 0 there)."""
    per_map = [label_volumes_ml(m) for m in label_maps]
    keys = sorted({k for v in per_map for k in v}, key=int)
    return {k: sum(v.get(k, 0.0) for v in per_map) / len(per_map) for k in keys}


def volume_agreement(found: dict[str, float], expected: dict[str, float]) -> float:
    """Mean over the ``expected`` labels (volume > 0) of ``min(v, V) / max(v, V)``, ``v`` the volume
    ``found`` (0 when absent); 1 when nothing is expected."""
    ratios = [min(found.get(k, 0.0), v) / max(found.get(k, 0.0), v) for k, v in expected.items() if v > 0]
    return float(sum(ratios) / len(ratios)) if ratios else 1.0


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
