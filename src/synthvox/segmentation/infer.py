"""Apply a finetuned segmentation model to a new image: ``synthvox segment``.

The image is brought to the model's frame (closest canonical orientation, the model's spacing, the
model's intensity normalisation), segmented with MONAI's sliding-window inference (Gaussian blending),
optionally averaged over test-time flips, and the softmax probabilities are resampled back onto the
input's own grid (linear on probabilities, then argmax: smoother than nearest neighbour on labels)
before the contiguous class indices are mapped back to the training label ids.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from synthvox.errors import InputError
from synthvox.segmentation.modeldir import SegmentationMeta, SegmentationNet, load_model_dir
from synthvox.volume import Volume, affine_points, grid_to_grid, resample_to_spacing, sample_at, to_canonical

if TYPE_CHECKING:
    from synthvox.segmentation.result import Segmentation


def check_image(image: Volume, what: str = "image") -> None:
    """Refuse anything that is not a single-channel 3D image with finite values."""
    if not isinstance(image, Volume):
        raise InputError(f"{what} must be a synthvox Volume, got {type(image).__name__}")
    if image.data.shape[0] != 1:
        raise InputError(f"{what} must be a single-channel 3D volume, got {image.data.shape[0]} channels")
    if min(image.shape) < 2:
        raise InputError(f"{what} must be a 3D volume, got spatial shape {image.shape}")
    if torch.is_floating_point(image.data) and not torch.isfinite(image.data).all():
        raise InputError(f"{what} contains NaN or infinite values")


def normalise(image: torch.Tensor, normalisation: dict) -> torch.Tensor:
    """Normalise intensities as recorded in a model's description (see ``SegmentationMeta``)."""
    from synthvox.models.extract import normalise_intensity

    method = normalisation.get("method", "percentile")
    if method != "percentile":
        raise InputError(f"unknown intensity normalisation {method!r} in the model description")
    window = normalisation.get("ct_window")
    return normalise_intensity(
        image.float(),
        modality=normalisation.get("modality", "auto"),
        ct_window=tuple(window) if window is not None else None,
        percentiles=tuple(normalisation.get("percentiles", (0.5, 99.5))),
    )


def resolve_normalisation(image: torch.Tensor, modality: str = "auto") -> dict:
    """The normalisation record for a model trained on images like ``image``: ``auto`` is decided
    here (CT when the values look like Hounsfield units), so every later image is treated alike."""
    from synthvox.models.extract import DEFAULT_CT_WINDOW, looks_like_ct

    modality = (modality or "auto").lower()
    if modality == "auto":
        modality = "ct" if looks_like_ct(image) else "mr"
    rec: dict = {"method": "percentile", "modality": modality, "percentiles": [0.5, 99.5]}
    if modality == "ct":
        rec["ct_window"] = list(DEFAULT_CT_WINDOW)
    return rec


def to_model_frame(image: Volume, spacing: Sequence[float], normalisation: dict) -> Volume:
    """Canonical orientation, normalised intensities, the model's spacing (linear interpolation)."""
    vol = to_canonical(image)
    vol = Volume(normalise(vol.data, normalisation), vol.affine)
    if np.allclose(vol.spacing, np.asarray(spacing, np.float64), rtol=1e-4, atol=1e-5):
        return vol
    return resample_to_spacing(vol, tuple(float(s) for s in spacing), mode="linear")


def _flip_sets(tta: bool | Sequence[int]) -> list[tuple[int, ...]]:
    if tta is False or tta is None:
        return [()]
    axes = (0, 1, 2) if tta is True else tuple(int(a) for a in tta)
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


@torch.no_grad()
def sliding_window_probabilities(
    net: nn.Module,
    image: torch.Tensor,
    patch_size: Sequence[int],
    device: torch.device,
    *,
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    tta: bool | Sequence[int] = False,
) -> torch.Tensor:
    """Softmax probabilities of ``net`` on a ``(1, X, Y, Z)`` normalised image, shape ``(C, X, Y, Z)``.

    Args:
        net: maps ``(B, 1, ...)`` to ``(B, C, ...)`` logits.
        image: the image in the model's frame (on any device; computed window by window on ``device``).
        patch_size: the sliding-window size.
        device: where the network runs; bf16 autocast is used on CUDA only.
        overlap: window overlap for MONAI's Gaussian blending.
        sw_batch_size: windows per forward pass.
        tta: ``True`` averages over all 8 combinations of flips of the three axes; a tuple of axes
            flips only those; ``False`` does no test-time augmentation.
    """
    from synthvox.models.extract import sliding_window

    was_training = net.training
    net.eval()
    use_amp = device.type == "cuda"

    def predictor(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
            logits = net(x.to(device))
        return torch.softmax(logits.float(), dim=1)

    x = image[None].float()
    total = None
    flips = _flip_sets(tta)
    for axes in flips:
        dims = [a + 2 for a in axes]
        xi = x.flip(dims) if dims else x
        prob = sliding_window(predictor, xi, patch_size, device, overlap=overlap, sw_batch_size=sw_batch_size,
                              whole_if_fits=False)
        if dims:
            prob = prob.flip(dims)
        total = prob if total is None else total + prob
    if was_training:
        net.train()
    return (total / len(flips))[0]


def probabilities_on_grid(
    prob: torch.Tensor,
    prob_affine: np.ndarray,
    shape: tuple[int, int, int],
    affine: np.ndarray,
    label_ids: Sequence[int],
    *,
    keep: bool = False,
    slab_voxels: int = 2**21,
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Resample ``(C, ...)`` probabilities onto (``shape``, ``affine``) linearly and take the argmax.

    Works slab by slab along the last axis, so memory stays ``O(C * slab)`` however large the output
    (unless ``keep``).

    Returns:
        ``(labels, probabilities, quality)``: an ``int64`` ``(1, X, Y, Z)`` tensor of label ids; with
        ``keep`` the resampled ``(C, X, Y, Z)`` float32 probabilities (still summing to one, their
        argmax the labels), else ``None``; and ``1 - mean entropy`` over the non-background voxels
        (:class:`~synthvox.segmentation.result.EntropyMeter`).
    """
    from synthvox.segmentation.result import EntropyMeter

    m = grid_to_grid(prob_affine, affine)
    ids = torch.as_tensor(list(label_ids), dtype=torch.int64)
    meter = EntropyMeter(list(label_ids))
    same = tuple(prob.shape[1:]) == tuple(shape) and np.allclose(m, np.eye(4), atol=1e-6)
    if same:
        arg = prob.argmax(0)
        meter.add(prob, arg)
        kept = prob.float().cpu() if keep else None
        return ids.to(prob.device)[arg][None].cpu(), kept, meter.quality
    out = torch.empty((1, *shape), dtype=torch.int64)
    kept = torch.empty((prob.shape[0], *shape), dtype=torch.float32) if keep else None
    nz = max(1, slab_voxels // max(1, shape[0] * shape[1]))
    dev = prob.device
    for z0 in range(0, shape[2], nz):
        z1 = min(shape[2], z0 + nz)
        slab = np.eye(4)
        slab[2, 3] = z0
        vox = affine_points((shape[0], shape[1], z1 - z0), m @ slab, device=dev)
        p = sample_at(prob, vox, mode="linear", padding="border")
        arg = p.argmax(0)
        meter.add(p, arg)
        out[0, :, :, z0:z1] = ids.to(dev)[arg].cpu()
        if kept is not None:
            kept[:, :, :, z0:z1] = p.float().cpu()
    return out, kept, meter.quality


def probabilities_to_labels_on_grid(
    prob: torch.Tensor,
    prob_affine: np.ndarray,
    shape: tuple[int, int, int],
    affine: np.ndarray,
    label_ids: Sequence[int],
    slab_voxels: int = 2**21,
) -> torch.Tensor:
    """The label map of :func:`probabilities_on_grid`: ``int64`` ``(1, X, Y, Z)`` label ids."""
    return probabilities_on_grid(prob, prob_affine, shape, affine, label_ids, slab_voxels=slab_voxels)[0]


def predict(
    net: SegmentationNet,
    meta: SegmentationMeta,
    image: Volume,
    *,
    device: torch.device | str = "cpu",
    tta: bool | Sequence[int] = False,
    patch: Sequence[int] | int | None = None,
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    probabilities: bool = False,
) -> Segmentation:
    """Segment ``image`` with an already loaded network: its label map, the quality figure
    (``1 - mean entropy``, times the volume agreement when the model records its training volumes:
    :mod:`synthvox.segmentation.result`) and, with ``probabilities``, the per-label probability maps on its grid."""
    from synthvox.segmentation.result import (
        ENTROPY,
        ENTROPY_VOLUME,
        Segmentation,
        label_volumes_ml,
        volume_agreement,
    )

    device = torch.device(device)
    check_image(image)
    patch_size = _patch(patch, meta.patch_size)
    frame = to_model_frame(image, meta.spacing, meta.normalisation)
    prob = sliding_window_probabilities(
        net, frame.data.to(device), patch_size, device, overlap=overlap, sw_batch_size=sw_batch_size, tta=tta
    )
    labels, kept, quality = probabilities_on_grid(
        prob, frame.affine, image.shape, image.affine, meta.label_ids, keep=probabilities
    )
    seg = Volume(labels, image.affine.copy())
    measure = ENTROPY
    if meta.label_volumes_ml:  # a scan cut off by its field of view is confident but lacks structures
        quality *= volume_agreement(label_volumes_ml(seg), meta.label_volumes_ml)
        measure = ENTROPY_VOLUME
    return Segmentation(
        labels=seg,
        probabilities=None if kept is None else Volume(kept, image.affine.copy()),
        label_ids=tuple(int(i) for i in meta.label_ids),
        quality=quality,
        measure=measure,
    )


def segment_with(net: SegmentationNet, meta: SegmentationMeta, image: Volume, **options: Any) -> Volume:
    """Segment ``image`` with an already loaded network (see :func:`segment`): the label map of
    :func:`predict`, which takes the same keywords (``device``, ``tta``, ``patch``, ``overlap``, ``sw_batch_size``)."""
    return predict(net, meta, image, **options).labels


def segment(
    model: str | os.PathLike,
    image: Volume,
    *,
    device: torch.device | str = "cpu",
    tta: bool | Sequence[int] = False,
    patch: Sequence[int] | int | None = None,
    overlap: float = 0.5,
    sw_batch_size: int = 2,
) -> Volume:
    """Segment ``image`` with a finetuned model directory.

    Args:
        model: a directory written by :func:`synthvox.segmentation.finetune`.
        image: a single-channel 3D image of any grid, spacing and orientation.
        device: where the network runs.
        tta: test-time flips (``True``: all three axes; or a tuple of axes of the canonical array).
            Left-right flips assume the labels do not distinguish left from right.
        patch: sliding-window size (default: the model's training patch size).
        overlap: window overlap (Gaussian blending).
        sw_batch_size: windows per forward pass.

    Returns:
        An ``int64`` label map with the training label ids, on exactly the input's grid
        (same shape and affine).

    Raises:
        InputError: ``model`` is not a model directory, or ``image`` is not a single-channel 3D volume.
    """
    check_image(image)
    net, meta = load_model_dir(model, device)
    return segment_with(net, meta, image, device=device, tta=tta, patch=patch, overlap=overlap, sw_batch_size=sw_batch_size)


def _patch(patch: Sequence[int] | int | None, default: Sequence[int]) -> list[int]:
    if patch is None:
        return [int(p) for p in default]
    if isinstance(patch, int):
        out = [patch] * 3
    else:
        out = [int(p) for p in patch]
    if len(out) != 3 or min(out) < 8:
        raise InputError(f"patch size must be three sizes of at least 8 voxels, got {patch}")
    return out
