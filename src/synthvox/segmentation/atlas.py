"""Training-free segmentation: register labelled atlases onto an image and fuse their labels.

Each atlas (an image with its label map, any contrast, grid and orientation) is registered onto the
target with :func:`synthvox.registration.register`. Its labels are carried through the whole
fixed -> atlas map as soft votes (every label's indicator moved with linear interpolation, which
gives smoother boundaries than nearest-neighbour labels) and the votes are fused voxel by voxel:

- ``"majority"``: every atlas counts the same;
- ``"weighted"``: locally weighted voting (Artaechevarria et al. 2009; Sabuncu et al. 2010): an
  atlas's vote at a voxel is ``exp(-d / (beta * h))``, with ``d`` the squared difference of the
  target's and the moved atlas's features (those the registration used) averaged over a small
  neighbourhood, and ``h`` the mean of ``d`` over the target's foreground and all atlases, so
  ``beta`` does not depend on the feature scale. Atlases that match the target better where it
  matters have more say there.

A finetuned model (``model=``) adds its softmax probabilities as one more voter, with the mean
weight of the atlases at each voxel under ``"weighted"`` (weight one under ``"majority"``).

>>> from synthvox.segmentation.atlas import Atlas, segment_with_atlases
>>> result = segment_with_atlases(image, [Atlas(img1, lab1), Atlas(img2, lab2), Atlas(img3, lab3)])
>>> result.labels      # label map on image's grid, atlas label ids
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from synthvox.errors import InputError
from synthvox.segmentation.result import AGREEMENT, Segmentation
from synthvox.volume import Volume, same_grid, spacing_of

FUSION_METHODS = ("majority", "weighted")
#: Default width of the weighting kernel (in units of the mean feature difference, see module docs).
DEFAULT_BETA = 0.25
#: Working spacing of the atlas registrations when no config is given: 2 mm, finer than registration's
#: default (:data:`synthvox.registration.grids.WORKING_SPACING`, chosen for speed), because labels
#: carried onto a target need the detail; the atlas figures of benchmarks/README.md were measured with it.
ATLAS_SPACING = 2.0
#: Box-filter passes that average the feature difference over a neighbourhood (radius 1 voxel each).
SMOOTH_PASSES = 2
#: Labels moved together (memory: this many float32 maps of the atlas grid at a time).
LABEL_CHUNK = 8


@dataclass
class Atlas:
    """A labelled image to register onto the target.

    Attributes:
        image: single-channel 3D image (any contrast, grid and orientation).
        labels: its label map, on the image's grid.
        name: how reports and progress lines call it.
    """

    image: Volume
    labels: Volume
    name: str = ""


@dataclass
class Fused:
    """What :func:`fuse` returns.

    Attributes:
        labels: ``int64`` ``(X, Y, Z)`` fused label map.
        mean_weights: each atlas's mean weight over the target's foreground.
        agreement: the share of the atlases whose label is the fused one, averaged over the fused
            foreground (the quality figure; 0 when only background was fused).
        probabilities: with ``probabilities=True``, ``(C, X, Y, Z)`` each label's share of the fused
            votes (channel ``k`` for the ``k``-th label id), summing to one, their argmax ``labels``.
    """

    labels: torch.Tensor
    mean_weights: list[float]
    agreement: float
    probabilities: torch.Tensor | None = None


@dataclass
class AtlasSegmentation:
    """What :func:`segment_with_atlases` returns.

    Attributes:
        labels: ``int64`` label map on the target's grid (atlas label ids).
        report: fusion method, label ids, seconds per stage, per atlas its registration summary
            (seconds, initial choice, similarity check, folding) and its mean local weight, and the
            atlases' agreement.
        agreement: the quality figure (see :class:`Fused`).
        probabilities: with ``probabilities=True``, each label's share of the fused votes on the
            target's grid, ``(C, X, Y, Z)`` in the order of ``report["label_ids"]``.
    """

    labels: Volume
    report: dict[str, Any] = field(default_factory=dict)
    agreement: float | None = None
    probabilities: Volume | None = None

    def segmentation(self) -> Segmentation:
        """As the :class:`~synthvox.segmentation.result.Segmentation` a segmenter returns."""
        return Segmentation(self.labels, self.probabilities, tuple(self.report.get("label_ids", ())),
                            self.agreement, AGREEMENT)


def check_atlases(atlases: Sequence[Atlas]) -> list[int]:
    """Refuse atlases that cannot be used; return the sorted union of their label ids."""
    from synthvox.segmentation.infer import check_image

    if len(atlases) == 0:
        raise InputError("atlas segmentation needs at least one atlas (an image with its label map)")
    ids: set[int] = set()
    for i, a in enumerate(atlases):
        what = f"atlas {a.name or i + 1}"
        if not isinstance(a, Atlas):
            raise InputError(f"{what} must be an Atlas(image, labels), got {type(a).__name__}")
        check_image(a.image, f"{what} image")
        lab = a.labels
        if not isinstance(lab, Volume) or lab.data.shape[0] != 1:
            raise InputError(f"{what} label map must be a single-channel 3D volume")
        if not same_grid(a.image, lab):
            raise InputError(f"{what} label map does not match its image's grid (shapes {lab.shape} and {a.image.shape}, or different affines)")
        data = lab.data
        if torch.is_floating_point(data) and not torch.allclose(data, data.round(), atol=1e-3):
            raise InputError(f"{what} label map has non-integer values")
        present = torch.unique(data.round().long()).tolist()
        if len(present) < 2:
            raise InputError(f"{what} label map has only one label (id {present[0]}): it needs background and at least one structure")
        ids.update(int(v) for v in present)
    return sorted(ids)


def check_fusion(fusion: str, beta: float = DEFAULT_BETA) -> None:
    """Refuse an unknown fusion method or a weighting width that is not a positive number."""
    if fusion not in FUSION_METHODS:
        raise InputError(f"--fusion must be one of {', '.join(FUSION_METHODS)}, got {fusion!r}")
    if not (beta > 0 and np.isfinite(beta)):
        raise InputError(f"beta must be a positive number, got {beta}")


def local_weights(target_features: torch.Tensor, moved_features: torch.Tensor) -> torch.Tensor:
    """The squared feature difference ``(X, Y, Z)`` of two ``(C, X, Y, Z)`` feature maps, averaged
    over a small neighbourhood (the ``d`` of the module docs)."""
    from synthvox.registration.convex import box3

    d = (target_features - moved_features).pow(2).mean(0, keepdim=True)
    return box3(d, passes=SMOOTH_PASSES)[0]


def model_probabilities(model: Any, image: Volume, device: torch.device, tta: bool) -> tuple[torch.Tensor, list[int]]:
    """A finetuned model's softmax probabilities on ``image``'s grid and the label id of each channel.

    ``model``: a model directory, or what :func:`~synthvox.segmentation.modeldir.load_model_dir`
    returned for one (loaded once for many images)."""
    from synthvox.segmentation.infer import sliding_window_probabilities, to_model_frame
    from synthvox.segmentation.modeldir import load_model_dir
    from synthvox.volume import resample_to_grid

    net, meta = model if isinstance(model, tuple) else load_model_dir(model, device)
    frame = to_model_frame(image, meta.spacing, meta.normalisation)
    prob = sliding_window_probabilities(net, frame.data.to(device), meta.patch_size, device, overlap=0.5, tta=tta)
    on_image = resample_to_grid(Volume(prob, frame.affine), image.shape, image.affine, padding="border")
    return on_image.data.cpu(), [int(i) for i in meta.label_ids]


@dataclass
class RegisteredAtlas:
    """An atlas after registration onto a target: what fusion needs.

    Attributes:
        atlas: the atlas.
        displacement: ``(3, X, Y, Z)`` RAS map from the target grid into the atlas's world (mm).
        distance: the local squared feature difference to the target (``None`` without weighting).
        entry: its report entry (name, seconds, initial choice, similarity check, folding).
    """

    atlas: Atlas
    displacement: torch.Tensor
    distance: torch.Tensor | None
    entry: dict[str, Any]


@dataclass
class Target:
    """The image to segment, with its foreground and (for weighted fusion) its features."""

    image: Volume
    foreground: torch.Tensor
    features: torch.Tensor | None = None
    scales: dict[str, float] | None = None
    shares: dict[str, float] | None = None


def prepare_target(image: Volume, extractor: Any, device: torch.device,
                   shares: dict[str, float] | None = None) -> Target:
    """The target's foreground and, when ``extractor`` is given, its features on its own grid, each
    feature set with its ``shares`` of the variance (as registration weighs them)."""
    from synthvox.registration.descriptors import combine, feature_scales
    from synthvox.registration.foreground import foreground
    from synthvox.segmentation.infer import check_image

    check_image(image, "target image")
    target = Volume(image.data.float(), image.affine)
    fg = foreground(target.data.to(device))
    if extractor is None:
        return Target(target, fg.cpu())
    raw = extractor.raw(target.data.to(device), "fixed")
    scales = feature_scales(raw, fg)
    return Target(target, fg.cpu(), combine(raw, scales, shares), scales, shares)


def register_atlas(target: Target, atlas: Atlas, *, features: str, weights: Any, extractor: Any,
                   device: torch.device, config: Any, name: str = "") -> RegisteredAtlas:
    """Register one atlas onto the target (a :class:`~synthvox.registration.RegistrationConfig`)
    and measure its local feature difference."""
    from synthvox.registration import register
    from synthvox.registration.descriptors import combine

    t = time.perf_counter()
    r = register(target.image, atlas.image, features=features, weights=weights, device=device, config=config)
    rep = r.report
    distance = None
    if extractor is not None and target.features is not None and target.scales is not None:
        raw = extractor.raw(r.moved.data.float().to(device), "moving")
        distance = local_weights(target.features, combine(raw, target.scales, target.shares)).cpu()
    entry: dict[str, Any] = {
        "name": name or atlas.name, "seconds": round(time.perf_counter() - t, 2),
        "initial_choice": rep.get("initial_choice"), "similarity": rep.get("similarity"),
        "fallback": rep.get("fallback"), "folding_percent": rep.get("folding_percent"),
        "registration_seconds": rep.get("seconds"),
    }
    return RegisteredAtlas(atlas, r.displacement.float().cpu(), distance, entry)


def fuse(
    target: Target,
    registered: Sequence[RegisteredAtlas],
    label_ids: Sequence[int],
    *,
    fusion: str = "weighted",
    beta: float = DEFAULT_BETA,
    model_probabilities: tuple[torch.Tensor, list[int]] | None = None,
    probabilities: bool = False,
) -> Fused:
    """Fuse registered atlases (and a model's probabilities) into an ``int64`` ``(X, Y, Z)`` label map.

    Returns the label map, each atlas's mean weight over the target's foreground, the atlases'
    agreement (the quality figure, see :mod:`synthvox.segmentation.result`) and, with
    ``probabilities``, each label's share of the fused votes.
    """
    from synthvox.registration.warp import apply_displacement

    shape = tuple(target.image.shape)
    fg = target.foreground
    if fusion == "weighted":
        if any(r.distance is None for r in registered):
            raise InputError("weighted fusion needs the atlases' feature differences (register them with weighting on)")
        dists = [r.distance for r in registered]  # type: ignore[misc]
        stack = torch.stack(dists)  # type: ignore[arg-type]
        h = float(stack[:, fg].mean()) if bool(fg.any()) else float(stack.mean())
        h = h if h > 0 else 1.0
        w = [torch.exp(-d / (beta * h)) for d in dists]  # type: ignore[operator]
    else:
        w = [torch.ones(shape) for _ in registered]
    mean_w = [float(wi[fg].mean()) if bool(fg.any()) else float(wi.mean()) for wi in w]
    w_net = torch.stack(w).mean(0) if model_probabilities is not None else None
    ids = list(label_ids)
    best = torch.full(shape, -1.0)
    best_id = torch.zeros(shape, dtype=torch.int64)
    agree = torch.zeros(shape)  # the share of the atlases voting for the fused label
    scores = []
    for c0 in range(0, len(ids), LABEL_CHUNK):
        chunk = ids[c0:c0 + LABEL_CHUNK]
        score = torch.zeros((len(chunk), *shape))
        votes = torch.zeros((len(chunk), *shape))
        for r, wi in zip(registered, w):
            lab = r.atlas.labels.data[0].round().long()
            onehot = torch.stack([(lab == lid).float() for lid in chunk])
            moved = apply_displacement(Volume(onehot, r.atlas.labels.affine), r.displacement, target.image.affine).data
            score += moved * wi
            votes += moved
        if model_probabilities is not None and w_net is not None:
            prob, net_ids = model_probabilities
            for k, lid in enumerate(chunk):
                if lid in net_ids:
                    score[k] += prob[net_ids.index(lid)] * w_net
        top, arg = score.max(0)
        better = top > best
        best = torch.where(better, top, best)
        best_id = torch.where(better, torch.as_tensor(chunk)[arg], best_id)
        agree = torch.where(better, votes.gather(0, arg[None])[0] / max(len(registered), 1), agree)
        if probabilities:
            scores.append(score)
    # voxels no voter reaches get background (0 when it is a label, else the first id)
    background = 0 if 0 in ids else ids[0]
    unreached = best <= 0
    best_id[unreached] = background
    counted = best_id != 0 if 0 in ids else torch.ones(shape, dtype=torch.bool)
    quality = float(agree[counted].mean().clamp(0.0, 1.0)) if bool(counted.any()) else 0.0
    prob = None
    if probabilities:
        prob = torch.cat(scores).clamp_min(0.0)
        prob[ids.index(background)][unreached] = 1.0
        prob /= prob.sum(0, keepdim=True)
    return Fused(best_id, mean_w, quality, prob)


def segment_with_atlases(
    image: Volume,
    atlases: Sequence[Atlas],
    *,
    fusion: str = "weighted",
    beta: float = DEFAULT_BETA,
    features: str = "mind",
    weights: Any = None,
    model: Any = None,
    tta: bool = False,
    device: torch.device | str = "cpu",
    config: Any = None,
    log: Callable[[str], None] | None = None,
    probabilities: bool = False,
) -> AtlasSegmentation:
    """Segment ``image`` by registering every atlas onto it and fusing the carried labels.

    Args:
        image: the target, a single-channel 3D image of any grid and orientation.
        atlases: one or more :class:`Atlas` (image and label map; any contrast).
        fusion: ``"majority"`` or ``"weighted"`` (see the module docs).
        beta: width of the weighting kernel for ``"weighted"`` (smaller: sharper preference).
        features: registration (and weighting) features: ``"mind"``, ``"net"``, ``"both"`` or ``"auto"``
            (the weights' card decides, :func:`synthvox.registration.network.resolve_features`).
        weights: network weights for ``"net"``/``"both"`` (``None``: the shipped default).
        model: an optional finetuned model directory (``synthvox finetune``) whose probabilities are
            one more voter; its label ids join the atlases'.
        tta: test-time flips for ``model``.
        device: where to compute.
        config: a :class:`synthvox.registration.RegistrationConfig` for every registration (default:
            its defaults on a :data:`ATLAS_SPACING` grid).
        log: called with one progress line per atlas and stage (``None``: silent).
        probabilities: also return each label's share of the fused votes.

    Returns:
        An :class:`AtlasSegmentation` whose ``labels`` lie on exactly ``image``'s grid.

    Raises:
        InputError: no atlases, an atlas label map off its image's grid or with one label only, an
            unknown fusion method, or anything :func:`~synthvox.registration.register` refuses.
    """
    from synthvox.registration import RegistrationConfig
    from synthvox.registration.descriptors import FeatureExtractor
    from synthvox.registration.network import resolve_network

    check_fusion(fusion, beta)
    label_ids = check_atlases(atlases)
    dev = torch.device(device)
    say = log or (lambda _line: None)
    t_all = time.perf_counter()
    times: dict[str, float] = {}

    probs = None
    if model is not None:
        t = time.perf_counter()
        probs = model_probabilities(model, image, dev, tta)
        label_ids = sorted(set(label_ids) | set(probs[1]))
        times["model"] = time.perf_counter() - t
        say(f"model      {times['model']:6.1f} s  probabilities of {len(probs[1])} labels")

    config = RegistrationConfig(spacing=ATLAS_SPACING) if config is None else config
    network = resolve_network(features, weights, config, dev)  # once for every atlas
    features = network.kind  # "auto" resolved by the weights' card
    extractor = None
    if fusion == "weighted":  # the network sees the target's own grid at its spacing, as registration does
        net_mm = network.spacing_mm
        zoom = tuple(float(v) / net_mm for v in spacing_of(image.affine)) if net_mm else 1.0
        extractor = FeatureExtractor(kind=features, model=network.model, device=dev, net_zoom=zoom)
    target = prepare_target(image, extractor, dev, network.shares)
    registered = []
    for i, a in enumerate(atlases):
        name = a.name or f"atlas {i + 1}"
        registered.append(register_atlas(target, a, features=features, weights=network.model, extractor=extractor,
                                         device=dev, config=config, name=name))
        say(f"{name:10s} {registered[-1].entry['seconds']:6.1f} s  registered")
    times["registration"] = sum(r.entry["seconds"] for r in registered)

    t = time.perf_counter()
    fused = fuse(target, registered, label_ids, fusion=fusion, beta=beta, model_probabilities=probs,
                 probabilities=probabilities)
    labels, mean_w = fused.labels, fused.mean_weights
    times["fusion"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_all
    say(f"fusion     {times['fusion']:6.1f} s  {fusion} of {len(atlases)} atlas(es)" + (" + model" if model is not None else ""))
    entries = [r.entry for r in registered]
    if fusion == "weighted":
        for e, mw in zip(entries, mean_w):
            e["mean_weight"] = round(mw, 4)
    report = {
        "fusion": fusion,
        "beta": beta if fusion == "weighted" else None,
        "features": features,
        "label_ids": label_ids,
        "atlases": entries,
        "model": None if model is None else ("loaded model" if isinstance(model, tuple) else str(model)),
        "agreement": round(fused.agreement, 4),
        "seconds": {k: round(v, 2) for k, v in times.items()},
    }
    prob = None if fused.probabilities is None else Volume(fused.probabilities, image.affine.copy())
    return AtlasSegmentation(Volume(labels[None], image.affine.copy()), report, fused.agreement, prob)


def atlas_segmenter(
    atlases: Sequence[Atlas],
    *,
    fusion: str = "weighted",
    beta: float = DEFAULT_BETA,
    features: str = "mind",
    weights: Any = None,
    model: Any = None,
    tta: bool = False,
    device: torch.device | str = "cpu",
    config: Any = None,
    log: Callable[[str], None] | None = None,
    probabilities: bool = False,
) -> Callable[[Volume], Segmentation]:
    """A per-image segmenter (:data:`synthvox.segmentation.folder.Segmenter`) that fuses ``atlases``
    (checked now, once for every image) with :func:`segment_with_atlases`: the label map, the atlases'
    agreement as its quality figure and, with ``probabilities``, each label's share of the votes."""
    check_fusion(fusion, beta)
    check_atlases(atlases)
    if model is not None:  # loaded once for every image; a clear error for a non-model directory now
        from synthvox.segmentation.modeldir import load_model_dir

        model = load_model_dir(model, device)

    def segmenter(image: Volume) -> Segmentation:
        return segment_with_atlases(image, atlases, fusion=fusion, beta=beta, features=features, weights=weights,
                                    model=model, tta=tta, device=device, config=config, log=log,
                                    probabilities=probabilities).segmentation()

    return segmenter
