"""Dense feature maps of a volume: intensity normalisation and (sliding-window) network inference."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from synthvox.errors import InputError

#: CT window used when none is given: air to dense bone, in Hounsfield units.
DEFAULT_CT_WINDOW = (-1000.0, 2000.0)
#: How MR intensities are scaled to [0, 1] (:func:`normalise_intensity`): ``percentile`` (between two
#: percentiles of the whole volume, what every network so far was used with) or ``foreground``
#: (from the foreground's median, see :func:`foreground_range`).
SCALINGS = ("percentile", "foreground")
#: The key of a model card (``config.json`` -> ``extra.model_card``) that names the scaling its network
#: is used with; ``percentile`` when absent.
CARD_SCALING_KEY = "intensity_scaling"
#: :func:`foreground_range`: the foreground is brighter than this fraction of the way from the
#: background level to its own 98th percentile (FSL's robust-range threshold) ...
FOREGROUND_FRACTION = 0.1
#: ... and its median is mapped to 1 / FOREGROUND_SPAN: the whole volume's 99.5th percentile lies
#: 2.5-3.6 foreground medians above the background in nichart's T1 and FLAIR, so the images come out
#: about as bright as with ``percentile``.
FOREGROUND_SPAN = 3.0


def _percentile(x: torch.Tensor, q: float) -> torch.Tensor:
    """``q``-th percentile (0-100) of all values (works on tensors of any size, unlike ``quantile``)."""
    flat = x.reshape(-1)
    k = int(round(q / 100.0 * (flat.numel() - 1))) + 1
    return flat.float().kthvalue(min(max(k, 1), flat.numel())).values


def foreground_range(x: torch.Tensor, low: float = 0.5, iterations: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """An MR image's intensity range from its foreground, which more background leaves where it is.

    The lower end is the ``low`` percentile of the whole image: the background level (air; more
    background keeps it inside the background). The foreground is the voxels brighter than
    :data:`FOREGROUND_FRACTION` of the way from there to the foreground's own 98th percentile (iterated
    to its fixed point from the voxels above the background level, a few iterations), and the upper
    end lies :data:`FOREGROUND_SPAN` times its median above the lower end. Padding the image with air
    changes neither end (the whole volume's percentiles move as the share of air changes); tissue
    that comes into or leaves the field of view moves the median little (nichart T1 and FLAIR at
    2.25 mm, 16 voxels padded, cropped or shifted on every side: by at most 8 %, the whole volume's
    99.5th percentile by up to 24 %).

    Returns:
        ``(low, high)`` as float64 scalars; the whole image's 0.5th and 99.5th percentiles when fewer
        than 100 voxels are brighter than the background level.
    """
    flat = x.reshape(-1).double()
    lo = _percentile(flat, low).double()
    fg = flat[flat > lo]
    if fg.numel() < 100:
        return lo, _percentile(flat, 99.5).double()
    top = _percentile(fg, 98.0).double()
    for _ in range(iterations):
        sel = flat[flat > lo + FOREGROUND_FRACTION * (top - lo)]
        if sel.numel() < 100:
            break
        fg, new = sel, _percentile(sel, 98.0).double()
        if float(abs(new - top)) <= 1e-6 * float(top - lo):
            break
        top = new
    return lo, lo + FOREGROUND_SPAN * (fg.median() - lo)


def card_scaling(model: Any) -> str:
    """The MR intensity scaling a network is used with: its card's :data:`CARD_SCALING_KEY` (the
    ``model_card`` attribute :func:`synthvox.models.load_model` sets); else ``foreground`` for a
    network with batch normalisation (its features move with nothing else in the volume, so neither
    should its input: the whole-volume percentiles move when air is added), ``percentile`` otherwise
    (instance normalisation absorbs the global scaling; the weights shipped before 2026-12-07)."""
    card = getattr(model, "model_card", None)
    choice = card.get(CARD_SCALING_KEY) if isinstance(card, dict) else None
    if choice in SCALINGS:
        return choice
    from synthvox.models.blocks import has_batchnorm

    return "foreground" if isinstance(model, torch.nn.Module) and has_batchnorm(model) else "percentile"


def looks_like_ct(image: torch.Tensor) -> bool:
    """Heuristic: Hounsfield units have air near -1000 (a low percentile below -500)."""
    return bool(_percentile(image, 1.0) < -500.0)


def normalise_intensity(
    image: torch.Tensor,
    modality: str = "auto",
    ct_window: Sequence[float] | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
    scaling: str = "percentile",
) -> torch.Tensor:
    """Map intensities to [0, 1] the way the network saw them in training.

    Args:
        image: a tensor of any shape (usually ``(1, X, Y, Z)``).
        modality: ``mr`` (robust min-max between two percentiles), ``ct`` (clip to a Hounsfield window
            then scale) or ``auto`` (``ct`` when ``ct_window`` is given or the values look like
            Hounsfield units, else ``mr``).
        ct_window: ``(low, high)`` in HU for CT; :data:`DEFAULT_CT_WINDOW` when not given.
        percentiles: lower and upper percentiles for ``mr``.
        scaling: for ``mr`` (:data:`SCALINGS`): ``percentile``, between the two percentiles of the
            whole volume (so more air in the field of view lowers the upper one and brightens the
            image), or ``foreground``, from the lower percentile to :data:`FOREGROUND_SPAN` times the
            foreground's median above it (:func:`foreground_range`, which air does not move). CT's
            window depends on nothing.

    Returns:
        A float32 tensor of the same shape with values in [0, 1].

    Raises:
        InputError: unknown modality or scaling, bad window, or non-finite values.
    """
    modality = (modality or "auto").lower()
    if modality not in ("auto", "mr", "ct"):
        raise InputError(f"unknown modality {modality!r}: use auto, mr or ct")
    if scaling not in SCALINGS:
        raise InputError(f"unknown intensity scaling {scaling!r}: use {' or '.join(SCALINGS)}")
    x = image.float()
    if not torch.isfinite(x).all():
        raise InputError("the image contains NaN or infinite values")
    if ct_window is not None:
        w = [float(v) for v in ct_window]
        if len(w) != 2 or not all(math.isfinite(v) for v in w) or not w[0] < w[1]:
            raise InputError(f"a CT window needs two finite values, low < high; got {tuple(ct_window)}")
    if modality == "auto":
        modality = "ct" if ct_window is not None or looks_like_ct(x) else "mr"
    # differences of float32 values can overflow (3e38 - -3e38): scale in float64, return float32
    x64 = x.double()
    if modality == "ct":
        lo, hi = (float(v) for v in (ct_window or DEFAULT_CT_WINDOW))
        return ((x64.clamp(lo, hi) - lo) / (hi - lo)).clamp(0.0, 1.0).float()
    if scaling == "foreground":
        lo_t, hi_t = foreground_range(x, percentiles[0])
    else:
        lo_t, hi_t = _percentile(x, percentiles[0]).double(), _percentile(x, percentiles[1]).double()
    if float(hi_t - lo_t) <= 1e-12:
        lo_t, hi_t = x64.min(), x64.max()
    if float(hi_t - lo_t) <= 1e-12:
        return torch.zeros_like(x)
    return ((x64 - lo_t) / (hi_t - lo_t)).clamp(0.0, 1.0).float()


def extract_features(
    model: nn.Module,
    image: torch.Tensor,
    device: torch.device | str,
    patch: int | Sequence[int] = 128,
    overlap: float = 0.25,
    amp: bool | None = None,
    sw_batch_size: int = 1,
) -> torch.Tensor:
    """Feature maps of a normalised image.

    Volumes larger than ``patch`` along any axis go through MONAI's sliding-window inference with
    Gaussian blending; smaller ones through one forward pass (the UNet pads internally).

    Args:
        model: the feature network (e.g. from :func:`synthvox.models.load_model`).
        image: ``(1, X, Y, Z)`` intensities, already normalised (see :func:`normalise_intensity`).
        device: where to run the network; the result is on this device.
        patch: window size (one int or three).
        overlap: window overlap fraction in [0, 1).
        amp: bfloat16 autocast; ``None`` means on for CUDA, off otherwise (never used on the CPU).
        sw_batch_size: windows per forward pass.

    Returns:
        ``(C, X, Y, Z)`` float32 features on ``device``.
    """
    if image.ndim != 4 or image.shape[0] != 1:
        raise InputError(f"extract_features expects a (1, X, Y, Z) image, got shape {tuple(image.shape)}")
    if not 0.0 <= overlap < 1.0:
        raise InputError(f"overlap must be in [0, 1), got {overlap}")
    device = torch.device(device)
    roi = (int(patch),) * 3 if isinstance(patch, int) else tuple(int(p) for p in patch)
    if len(roi) != 3 or min(roi) < 8:
        raise InputError(f"patch must be one or three sizes of at least 8 voxels, got {patch}")
    use_amp = (device.type == "cuda") if amp is None else (bool(amp) and device.type == "cuda")
    was_training = model.training
    model.eval()
    x = image[None].to(device=device, dtype=torch.float32)
    try:
        with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
            out = sliding_window(lambda t: model(t).float(), x, roi, device, overlap=overlap,
                                 sw_batch_size=sw_batch_size)
    finally:
        model.train(was_training)
    return out[0].float()


def sliding_window(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    roi: Sequence[int],
    device: torch.device,
    *,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    whole_if_fits: bool = True,
) -> torch.Tensor:
    """The one sliding-window inference of synthvox (features, segmentation, its validation).

    MONAI's sliding window with Gaussian blending, windows and result on ``device``. With
    ``whole_if_fits``, a volume no larger than ``roi`` along every axis goes through ``predictor`` in
    one pass instead (the UNet pads internally); without it, MONAI pads it to one window, as a model
    trained on windows of that size (segmentation) expects.

    Args:
        predictor: maps ``(B, C, ...)`` windows to ``(B, C', ...)`` outputs.
        x: ``(1, C, X, Y, Z)`` input (any device).
        roi: window size, three ints.
        device: where windows are computed and the result is gathered.
        overlap: window overlap fraction in [0, 1).
        sw_batch_size: windows per call of ``predictor``.
        whole_if_fits: one pass without padding for a volume that fits one window.

    Returns:
        ``(1, C', X, Y, Z)`` on ``device``.
    """
    roi = [int(r) for r in roi]
    if whole_if_fits and all(s <= r for s, r in zip(x.shape[2:], roi)):
        return predictor(x.to(device))
    from monai.inferers import sliding_window_inference

    out = sliding_window_inference(
        x, roi_size=roi, sw_batch_size=sw_batch_size, predictor=predictor, overlap=overlap, mode="gaussian",
        sw_device=device, device=device,
    )
    return torch.as_tensor(out)


def image_features(
    image: Any,
    weights: Any = None,
    device: torch.device | str = "cpu",
    modality: str = "auto",
    ct_window: tuple[float, float] | None = None,
    patch: int | Sequence[int] = 128,
    scaling: str | None = None,
) -> Any:
    """Dense features of a :class:`synthvox.volume.Volume` on its own grid (``synthvox features``).

    Args:
        image: single-channel volume.
        weights: a model directory, a loaded network, or ``None`` for the shipped default weights.
        device: where to run the network.
        modality: intensity normalisation, ``"auto"``, ``"mr"`` or ``"ct"``.
        ct_window: optional CT window ``(low, high)`` in HU.
        patch: sliding-window size for large volumes.
        scaling: MR intensity scaling (:data:`SCALINGS`); ``None``: what the weights' card names
            (:func:`card_scaling`).

    Returns:
        A ``(C, X, Y, Z)`` volume with the image's affine (features on the CPU).
    """
    from synthvox.models.weightsdir import load_default_model, load_model
    from synthvox.volume import Volume

    if image.data.shape[0] != 1:
        raise InputError(f"features need a single-channel image, got {image.data.shape[0]} channels")
    if weights is None:
        model = load_default_model(device)
    elif isinstance(weights, nn.Module):
        model = weights.to(device)
    else:
        model = load_model(weights, device)
    x = normalise_intensity(image.data, modality=modality, ct_window=ct_window,
                            scaling=scaling or card_scaling(model))
    return Volume(extract_features(model, x, device, patch=patch).cpu(), image.affine)
