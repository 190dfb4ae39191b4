"""Feature-quality probe: do a network's features find the same structure, and the same place, across contrasts?

Side by side in one run: the given network weights (the shipped ones by default), MIND-SSC (what
registration uses without a network) and the raw normalised intensity, each computed the way
registration computes it (``synthvox.registration.descriptors``, on the 2 mm working grid).

Data (``../shared/data/eval``):

* ``nichart``: T1 and FLAIR of one subject (headers that agree: Subj1, 2, 4, 7, 9-11), the T1 put on
  the FLAIR's working grid through the affines, the 14 coarse DLMUSE structures of ``flair_dlmuse``;
* ``spine``: T1w put on the T2w's grid, the cord and the tissue within 6 mm of it;
* ``ctmr``: the MR and the CT of two people, 7 organs (label transfer only: no voxel correspondence).

Measures, each a number that can go either way:

* ``knn``: cross-contrast k-NN label transfer: ``n`` voxels per structure drawn from the reference
  image (T1, T1w, MR) label the same number drawn from the other image (FLAIR, T2w, CT) by a vote of
  their ``k`` nearest neighbours in feature space; balanced accuracy (chance ``1 / structures``);
* ``boundary`` / ``interior``: local matching: for voxels within one voxel of a structure boundary, and
  for voxels at least 3 voxels inside a structure, the best match (smallest feature distance) of the
  FLAIR feature among the T1 features within +-3 voxels; the share that lands within one voxel of
  the truth (chance 27/343 = 0.08). This is what registration needs;
* ``inter``: inter-subject alignment, what registration between people needs first: the T1 of one
  subject put on the FLAIR of the next (cyclically among the probe's subjects) by synthvox's
  initialisation and affine stage on these features (no deformable stage), mean Dice of the 14
  structures (MIND-SSC and the networks; not intensity). Same-subject matching does not predict it:
  weights that match better within a subject have landed the affine stage tens of Dice points lower;
* ``reg``: registration Dice on inter-subject nichart pairs with ``--features mind``, ``net`` and
  ``both`` (the pairs and solver settings of ``benchmarks/registration.py``; each image's network
  features computed once for ``net`` and ``both``).

``fov`` (issue 22), reported beside the score: how much each feature set changes in the central half of
a nichart T1 when its field of view is padded with 16 edge voxels on every side (and, beside it,
cropped by 16 or shifted by 16 along every axis), over the features' total variance
(:func:`fov_term`): MIND-SSC, each network at its spacing in one forward pass on the image
normalised once (the network alone), the frozen-statistics control (its instance normalisation with
the unchanged image's statistics), and each network normalised after the change (``+percentile``,
``+foreground``: the MR scalings of ``synthvox.models.extract``). ``--fov-cli`` measures it through
``synthvox features`` too (:func:`cli_fov`). 0 = independent of the field of view.

``score`` (what decides which checkpoint is better): the mean of nichart ``knn``, ``boundary``,
``interior`` and ``inter`` (the first three for intensity), the numbers that move with feature
quality on brains; the other figures are reported beside it.

    python -m benchmarks.features [--weights shipped|DIR ...] [--quick] [--reg-pairs 2] [--out DIR]
        [--fov pad,crop,shift|none] [--fov-subjects Subj1,Subj2] [--fov-scalings percentile,foreground] [--fov-cli]

``--quick`` (the accumulating run and the test suite): fewer voxels, two nichart subjects, one quick
registration pair, the ``fov`` term padded only, on the first subject. Writes ``features.json`` and ``features.md`` into ``--out`` (default
benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import common
from benchmarks.registration import group_index

NAME = "features"
#: nichart_dev subjects whose T1 and FLAIR headers agree (see ../shared/data/README.md).
ALIGNED_SUBJECTS = ("Subj1", "Subj2", "Subj4", "Subj7", "Subj9", "Subj10", "Subj11")
DATASETS = ("nichart", "spine", "ctmr")
RADIUS = 3


# ----------------------------------------------------------------------------------------------- data


def _on_grid(vol: Any, shape: tuple[int, int, int], affine: np.ndarray, mode: str = "linear") -> Any:
    from synthvox.volume import Volume, resample_to_grid

    return resample_to_grid(Volume(vol.data.float(), vol.affine), shape, affine, mode=mode)


def load_dataset(name: str, subjects: list[str]) -> list[dict[str, Any]]:
    """Probe cases of one dataset: reference and query images with their structure maps (0 = not scored)."""
    from synthvox import io
    from synthvox.registration.grids import working_grid

    ev = common.eval_dir()
    cases = []
    if name == "nichart":
        groups = common.dlmuse_groups()
        for s in subjects:
            p = common.nichart_paths(s)
            flair, t1 = io.load(p["flair"]), io.load(p["t1"])
            shape, aff = working_grid(flair, 2.0)
            lab = group_index(_on_grid(io.load_labels(p["flair_dlmuse"]), shape, aff, "nearest").data[0].numpy().round(), groups)
            cases.append({"name": s, "ref": _on_grid(t1, shape, aff), "query": _on_grid(flair, shape, aff),
                          "ref_labels": lab, "query_labels": lab, "classes": list(groups), "aligned": True})
    elif name == "spine":
        d = ev / "spine_multicontrast"
        t2w, t1w = io.load(d / "t2w.nii.gz"), io.load(d / "t1w.nii.gz")
        shape, aff = working_grid(t2w, 2.0)
        cord = _on_grid(io.load_labels(d / "t2w_cord.nii.gz"), shape, aff, "linear").data[0].numpy() > 0.5
        from scipy.ndimage import distance_transform_edt

        near = (distance_transform_edt(~cord, sampling=float(np.abs(aff[:3, :3]).max(axis=0).max())) <= 6.0) & ~cord
        lab = np.where(cord, 1, np.where(near, 2, 0)).astype(np.int64)
        cases.append({"name": "t1w/t2w", "ref": _on_grid(t1w, shape, aff), "query": _on_grid(t2w, shape, aff),
                      "ref_labels": lab, "query_labels": lab, "classes": ["cord", "around cord"], "aligned": True})
    elif name == "ctmr":
        d = ev / "totalseg_ct_mr"
        organs = {k: [int(v)] for k, v in json.loads((d / "organs.json").read_text()).items() if not k.startswith("_")}
        out = {}
        for which in ("mr", "ct"):
            img = io.load(d / f"{which}.nii.gz")
            shape, aff = working_grid(img, 2.0)
            lab = group_index(_on_grid(io.load_labels(d / f"{which}_seg.nii.gz"), shape, aff, "nearest").data[0].numpy().round(), organs)
            out[which] = (_on_grid(img, shape, aff), lab)
        cases.append({"name": "mr/ct", "ref": out["mr"][0], "query": out["ct"][0], "ref_labels": out["mr"][1],
                      "query_labels": out["ct"][1], "classes": list(organs), "aligned": False})
    else:
        raise ValueError(f"unknown dataset {name!r}")
    return cases


def inter_subject_affine(subjects: list[str], kinds: list[tuple[str, Any, str]]) -> list[dict[str, Any]]:
    """Mean Dice of the 14 structures after synthvox's initialisation and affine stage on each feature
    set (``mind`` and ``net`` kinds), T1 of the previous subject (cyclically) onto each subject's FLAIR.
    No pairs with fewer than two subjects."""
    from synthvox import io
    from synthvox.metrics import dice_per_label
    from synthvox.registration import register

    groups = common.dlmuse_groups()
    out: list[dict[str, Any]] = []
    for i, b in enumerate(subjects if len(subjects) > 1 else []):
        pa, pb = common.nichart_paths(subjects[i - 1]), common.nichart_paths(b)
        fixed, moving = io.load(pb["flair"]), io.load(pa["t1"])
        labels, ref = io.load_labels(pa["dlmuse"]), io.load_labels(pb["flair_dlmuse"]).data[0]
        row: dict[str, Any] = {"pair": f"{subjects[i - 1]}->{b}"}
        for name, model, kind in kinds:
            if kind in ("mind", "net"):
                res = register(fixed, moving, features=kind, weights=model, deformable=False, moving_labels=labels)
                row[name] = _nanmean(list(dice_per_label(res.moved_labels.data[0], ref, groups).values()))
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------- features


def features_of(kind: str, image: Any, model: Any) -> torch.Tensor:
    """``(C, X, Y, Z)`` features of one image as registration computes them (``intensity``, ``mind`` or
    ``net``; the network sees the image at the spacing its card gives, as in registration)."""
    from synthvox.models.card import network_spacing
    from synthvox.registration.descriptors import FeatureExtractor, robust_unit_range
    from synthvox.volume import spacing_of

    if kind == "intensity":
        return robust_unit_range(image.data[:1].float())
    net_mm = network_spacing(model) if kind == "net" else None
    zoom = float(spacing_of(image.affine)[0]) / net_mm if net_mm else 1.0
    ex = FeatureExtractor(kind=kind, model=model, device=torch.device("cpu"), net_zoom=zoom)
    return ex.raw(image.data[:1].float(), "fixed")[kind]


# -------------------------------------------------------------------------------------- field of view

#: voxels the field of view is padded by (edge voxels), cropped by, or shifted by, on every side or
#: axis (a multiple of the shipped UNet's 2**levels = 16, so its pooling grid stays where it was)
FOV_MARGIN = 16
FOV_CHANGES = ("pad", "crop", "shift")


def fov_variant(x: torch.Tensor, change: str, m: int = FOV_MARGIN) -> tuple[torch.Tensor, int]:
    """``x`` (C, X, Y, Z) with its field of view changed, and the offset of the original voxels in
    it (the same along each axis): ``pad`` adds ``m`` edge voxels on every side (+m), ``crop`` takes
    ``m`` off every side (-m), ``shift`` moves the field of view ``m`` voxels along every axis (``m``
    off the start, ``m`` edge voxels added at the end; -m)."""
    if change == "pad":
        return F.pad(x[None], (m,) * 6, mode="replicate")[0], m
    if change == "crop":
        return x[:, m:-m, m:-m, m:-m], -m
    if change == "shift":
        return F.pad(x[None, :, m:, m:, m:], (0, m) * 3, mode="replicate")[0], -m
    raise ValueError(f"unknown field-of-view change {change!r}: use {', '.join(FOV_CHANGES)}")


def central_half(shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The central half of a grid along each axis (``n // 4`` voxels off each end)."""
    return tuple(slice(n // 4, n - n // 4) for n in shape)


def fov_change(f0: torch.Tensor, fv: torch.Tensor, offset: int, region: tuple[slice, ...] | None = None) -> float:
    """How much ``(C, X, Y, Z)`` features ``f0`` changed in ``fv`` (the same image with its field of
    view changed, the original voxels ``offset`` voxels on along each axis): the summed mean squared
    change of the channels in ``region`` of ``f0`` (default its central half) over their total
    variance (summed over channels, over the whole of ``f0``). 0: unchanged; 1: as large as the
    features' own variation."""
    region = central_half(tuple(f0.shape[1:])) if region is None else region
    a = f0[(slice(None), *region)].double()
    b = fv[(slice(None), *(slice(r.start + offset, r.stop + offset) for r in region))].double()
    var = float(f0.reshape(f0.shape[0], -1).double().var(dim=1, correction=0).sum())
    return float(((a - b) ** 2).reshape(a.shape[0], -1).mean(dim=1).sum()) / max(var, 1e-12)


class FrozenNormStats:
    """The frozen-statistics control: within ``with FrozenNormStats(model) as frozen:``, each instance
    normalisation layer of ``model`` normalises with the per-channel mean and variance it recorded on
    the last pass while ``frozen.recording`` was True (the unchanged image), whatever the input's
    field of view after that. A network that is still field-of-view dependent under it depends on
    something other than its normalisation's statistics."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
        self.stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.recording = True

    def _forward(self, layer: torch.nn.InstanceNorm3d, x: torch.Tensor) -> torch.Tensor:
        if self.recording:
            var, mean = torch.var_mean(x, dim=tuple(range(2, x.dim())), keepdim=True, correction=0)
            self.stats[id(layer)] = (mean, var)
        mean, var = self.stats[id(layer)]
        y = (x - mean) * torch.rsqrt(var + layer.eps)
        if layer.affine:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            y = y * layer.weight.view(shape) + layer.bias.view(shape)
        return y

    def __enter__(self) -> FrozenNormStats:
        for layer in self.layers:
            layer.forward = lambda x, layer=layer: self._forward(layer, x)  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        for layer in self.layers:
            del layer.forward


def _pass(model: Any, x: torch.Tensor) -> torch.Tensor:
    """``(C, X, Y, Z)`` features of a normalised ``(1, X, Y, Z)`` image: one forward pass, no windows."""
    with torch.inference_mode():
        return model(x[None].float())[0].float()


def fov_features(model: Any, raw: torch.Tensor, changes: list[str], scalings: list[str], margin: int = FOV_MARGIN,
                 frozen: bool = True) -> dict[str, dict[str, float]]:
    """The field-of-view term of one network on one image ``raw`` (``(1, X, Y, Z)`` intensities at the
    network's spacing): the central-half change (:func:`fov_change`) of its features after each of
    ``changes`` (:func:`fov_variant`). Rows: ``once`` (the image normalised once, then changed: the
    network alone), ``frozen`` (the same with the normalisation layers' statistics of the unchanged
    image, instance normalisation only, when ``frozen``) and ``+S`` for each scaling ``S``
    (normalised after the change with that MR scaling, as ``synthvox`` normalises an image whose
    field of view is what it is)."""
    from synthvox.models.extract import normalise_intensity

    out: dict[str, dict[str, float]] = {}
    norm = {s: normalise_intensity(raw, scaling=s) for s in dict.fromkeys(["percentile", *scalings])}
    base = {"percentile": _pass(model, norm["percentile"])}
    out["once"] = {c: fov_change(base["percentile"], _pass(model, v), off)
                   for c in changes for v, off in [fov_variant(norm["percentile"], c, margin)]}
    if frozen and any(isinstance(m, torch.nn.InstanceNorm3d) for m in model.modules()):
        with FrozenNormStats(model) as stats:
            f0 = _pass(model, norm["percentile"])
            stats.recording = False
            out["frozen"] = {c: fov_change(f0, _pass(model, v), off)
                             for c in changes for v, off in [fov_variant(norm["percentile"], c, margin)]}
    for s in scalings:
        if s not in base:
            base[s] = _pass(model, norm[s])
        row = {}
        for c in changes:
            v, off = fov_variant(raw, c, margin)
            row[c] = fov_change(base[s], _pass(model, normalise_intensity(v, scaling=s)), off)
        out[f"+{s}"] = row
    return out


def fov_term(subjects: list[str], models: list[tuple[str, Any]], changes: list[str], scalings: list[str] | None = None,
             margin: int = FOV_MARGIN) -> dict[str, Any]:
    """The field-of-view term (issue 22): how much each feature set changes in the central half of a
    nichart T1 when its field of view is padded, cropped or shifted by ``margin`` voxels (see
    :func:`fov_features`), for MIND-SSC (2 mm working grid, normalised once) and each network (at its
    network spacing, one forward pass; ``scalings``: the scalings of the rows normalised after the
    change, default the one each network's card names). Returns ``{"rows": {row: {subject: {change:
    value}}}, "mean": {row: {change: mean}}}``."""
    from synthvox import io
    from synthvox.models.card import network_spacing
    from synthvox.models.extract import card_scaling
    from synthvox.registration.descriptors import robust_unit_range
    from synthvox.registration.mind import mind_ssc
    from synthvox.volume import grid_for_spacing

    rows: dict[str, dict[str, dict[str, float]]] = {}
    for s in subjects:
        t1 = io.load(common.nichart_paths(s)["t1"])
        shape, aff = grid_for_spacing(t1.shape, t1.affine, 2.0)
        x = robust_unit_range(_on_grid(t1, shape, aff).data[:1])
        f0 = mind_ssc(x)
        rows.setdefault("mind", {})[s] = {c: fov_change(f0, mind_ssc(v), off)
                                         for c in changes for v, off in [fov_variant(x, c, margin)]}
        for label, model in models:
            shape, aff = grid_for_spacing(t1.shape, t1.affine, network_spacing(model) or 2.0)
            raw = _on_grid(t1, shape, aff).data[:1].float()
            res = fov_features(model, raw, changes, scalings or [card_scaling(model)], margin)
            for name, row in res.items():
                rows.setdefault(label if name == "once" else f"{label} {name}", {})[s] = row
    mean = {r: {c: _nanmean([v[c] for v in per.values()]) for c in changes} for r, per in rows.items()}
    return {"margin": margin, "subjects": subjects, "changes": changes, "rows": rows, "mean": mean}


def cli_fov(subjects: list[str], models: list[tuple[str, Any]], scalings: list[str | None],
            margin: int = FOV_MARGIN) -> dict[str, Any]:
    """The field-of-view term through ``synthvox features`` (its extractor,
    :func:`synthvox.models.extract.image_features`: its intensity normalisation after the change, the
    image's own 2 mm grid, 128-voxel windows): each nichart T1 padded with ``margin`` edge voxels on
    every side, the change of its features in the central half and in the whole image (as
    :func:`fov_change`), per network and MR scaling (``None``: the card's)."""
    from synthvox import io
    from synthvox.models.extract import card_scaling, image_features
    from synthvox.volume import Volume

    rows: dict[str, dict[str, dict[str, float]]] = {}
    for s in subjects:
        t1 = io.load(common.nichart_paths(s)["t1"])
        padded, off = fov_variant(t1.data[:1].float(), "pad", margin)
        affine = np.array(t1.affine, dtype=np.float64)
        affine[:3, 3] -= affine[:3, :3] @ np.full(3, float(margin))  # the same world position of every voxel
        for label, model in models:
            for sc in dict.fromkeys(sc or card_scaling(model) for sc in scalings):
                f0 = image_features(t1, model, scaling=sc).data
                fv = image_features(Volume(padded, affine), model, scaling=sc).data
                whole = tuple(slice(0, n) for n in f0.shape[1:])
                rows.setdefault(f"{label} +{sc}", {})[s] = {"central": fov_change(f0, fv, off),
                                                           "whole": fov_change(f0, fv, off, whole)}
    mean = {r: {k: _nanmean([v[k] for v in per.values()]) for k in ("central", "whole")} for r, per in rows.items()}
    return {"margin": margin, "subjects": subjects, "rows": rows, "mean": mean}


# -------------------------------------------------------------------------------------------- metrics


def _draw(mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return idx
    return rng.choice(idx, size=min(n, idx.size), replace=False)


def knn_transfer(fr: torch.Tensor, lr: np.ndarray, fq: torch.Tensor, lq: np.ndarray, n: int, k: int,
                 rng: np.random.Generator) -> float:
    """Balanced accuracy of labelling query voxels by their ``k`` nearest reference voxels in feature space."""
    classes = [c for c in np.unique(lr) if c > 0 and (lq == c).any()]
    ri = np.concatenate([_draw(lr == c, n, rng) for c in classes])
    qi = np.concatenate([_draw(lq == c, n, rng) for c in classes])
    xr = fr.reshape(fr.shape[0], -1)[:, ri].T.double()
    xq = fq.reshape(fq.shape[0], -1)[:, qi].T.double()
    yr, yq = torch.as_tensor(lr.reshape(-1)[ri]), lq.reshape(-1)[qi]
    d = torch.cdist(xq, xr)
    nn = d.topk(min(k, len(ri)), largest=False).indices
    votes = yr[nn]  # (Nq, k)
    counts = torch.stack([(votes == c).sum(1) for c in classes], 1)  # ties: the first class listed
    pred = np.asarray(classes)[counts.argmax(1).numpy()]
    return float(np.mean([(pred[yq == c] == c).mean() for c in classes]))


def _regions(lab: np.ndarray) -> dict[str, np.ndarray]:
    """Voxels within one voxel of a structure boundary, and voxels >= 3 voxels inside a structure."""
    from scipy.ndimage import binary_erosion, maximum_filter, minimum_filter

    inner = np.zeros(lab.shape, bool)
    inner[RADIUS + 1: -RADIUS - 1, RADIUS + 1: -RADIUS - 1, RADIUS + 1: -RADIUS - 1] = True
    boundary = (maximum_filter(lab, size=3) != minimum_filter(lab, size=3)) & inner
    interior = np.zeros(lab.shape, bool)
    for c in np.unique(lab):
        if c > 0:
            interior |= binary_erosion(lab == c, iterations=3)
    return {"boundary": boundary & (maximum_filter(lab, size=3) > 0), "interior": interior & inner & (lab > 0)}


def local_match(fr: torch.Tensor, fq: torch.Tensor, mask: np.ndarray, n: int, rng: np.random.Generator) -> float:
    """Share of query voxels whose best match among reference voxels within +-3 lands within one voxel of it."""
    idx = _draw(mask, n, rng)
    if idx.size == 0:
        return float("nan")
    shape = mask.shape
    pts = np.stack(np.unravel_index(idx, shape), 1)  # (N, 3)
    r = np.arange(-RADIUS, RADIUS + 1)
    off = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)  # (343, 3)
    cand = pts[:, None, :] + off[None]  # (N, 343, 3)
    flat = np.ravel_multi_index(tuple(cand.reshape(-1, 3).T), shape)
    c = fr.shape[0]
    ref = fr.reshape(c, -1)[:, torch.as_tensor(flat)].T.reshape(len(idx), len(off), c)
    q = fq.reshape(c, -1)[:, torch.as_tensor(idx)].T[:, None, :]
    d = ((ref - q) ** 2).sum(-1)  # (N, 343)
    best = off[d.argmin(1).numpy()]
    return float((np.abs(best).max(1) <= 1).mean())


def probe_case(case: dict[str, Any], feats: dict[str, tuple[torch.Tensor, torch.Tensor]], n_knn: int, n_local: int,
               seed: int) -> dict[str, dict[str, float]]:
    """Every measure for every feature set on one case (same voxels for every feature set)."""
    regions = _regions(case["query_labels"]) if case["aligned"] else {}
    out: dict[str, dict[str, float]] = {}
    for name, (fr, fq) in feats.items():
        row = {"knn": knn_transfer(fr, case["ref_labels"], fq, case["query_labels"], n_knn, 10, np.random.default_rng(seed))}
        for region, mask in regions.items():
            row[region] = local_match(fr, fq, mask, n_local, np.random.default_rng(seed + 1))
        out[name] = row
    return out


# ------------------------------------------------------------------------------------------------ run


def load_weights(spec: str) -> tuple[str, Any, dict[str, Any]]:
    """``shipped`` or a model directory -> (label, model, model card)."""
    from synthvox.models import default_weights_path, load_model

    path = default_weights_path() if spec == "shipped" else Path(spec)
    if path is None:
        raise SystemExit("error: no shipped weights")
    cfg = json.loads((Path(path) / "config.json").read_text())
    card = cfg.get("extra", {}).get("model_card", cfg.get("extra", {}))
    steps = card.get("training_steps", card.get("steps"))
    label = f"net[{'shipped' if spec == 'shipped' else Path(spec).name}@{steps}]"
    return label, load_model(path, "cpu").eval(), {"path": str(path), "steps": steps}


def registration_dice(models: list[tuple[str, Any]], pairs: int, quick: bool,
                      datasets: tuple[str, ...] = ("nichart",)) -> dict[str, Any]:
    """Mean Dice of mind, and of net and both per network, on the registration benchmark's first
    ``pairs`` nichart pairs and every pair of the other ``datasets`` (spine, ctmr: these features are
    meant for any anatomy), with its solver settings (``benchmarks/registration.py``'s registrations,
    in this process: each image's network features are computed once for ``net`` and ``both``). Keys:
    ``mind``, ``net:LABEL``, ``both:LABEL`` for nichart, with ``@DATASET`` after them for the others."""
    from benchmarks.registration import QUICK_CONFIG, dataset_pairs, load_pair
    from synthvox.metrics import dice_per_label
    from synthvox.registration import RegistrationConfig, register

    cfg = RegistrationConfig(**QUICK_CONFIG) if quick else RegistrationConfig()
    runs = [("mind", None, "mind")] + [(f"{kind}:{label}", model, kind) for label, model in models for kind in ("net", "both")]
    per: dict[str, list[float]] = {}
    for ds in datasets:
        suffix = "" if ds == "nichart" else f"@{ds}"
        for pair in dataset_pairs(ds, pairs):
            data = load_pair(pair)
            ref = data["fixed_labels"].data[0].numpy()
            with common.FeatureCache():
                for name, model, kind in runs:
                    t = time.perf_counter()
                    res = register(data["fixed"], data["moving"], features=kind, weights=model,
                                   moving_labels=data["moving_labels"], config=cfg)
                    dice = _nanmean(list(dice_per_label(res.moved_labels.data[0].numpy(), ref, pair["groups"]).values()))
                    per.setdefault(name + suffix, []).append(dice)
                    print(f"[{name}{suffix}] {pair['name']}: Dice {dice:.3f}  {time.perf_counter() - t:.1f} s", flush=True)
    return {name: {"mean_dice": _nanmean(v), "pairs": v} for name, v in per.items()}


def _nanmean(vals: list[float]) -> float:
    v = [x for x in vals if x == x]
    return float(np.mean(v)) if v else float("nan")


#: the nichart figures whose mean is the probe's ``score``
SCORE_KEYS = ("knn", "boundary", "interior", "inter")


def score(rows: dict[str, dict[str, float]]) -> float:
    vals = [rows[k] for k in SCORE_KEYS if k in rows and rows[k] == rows[k]]
    return float(np.mean(vals)) if vals else float("nan")


def run(weights: list[str], datasets: list[str], subjects: list[str], n_knn: int, n_local: int, reg_pairs: int,
        quick: bool, threads: int, seed: int = 0, fov: list[str] | None = None, fov_subjects: list[str] | None = None,
        fov_scalings: list[str] | None = None, cli_scalings: list[str | None] | None = None,
        reg_datasets: tuple[str, ...] = ("nichart",)) -> dict[str, Any]:
    """The probe; ``fov``: the field-of-view changes of its term (:func:`fov_term`) on ``fov_subjects``
    with ``fov_scalings`` (None: each card's), ``cli_scalings``: the term through ``synthvox features``
    (:func:`cli_fov`) with these scalings (None in it: the card's; None: not measured)."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    models = []
    for w in weights:
        lab, m, card = load_weights(w)
        while lab in {x[0] for x in models}:
            lab += "'"
        models.append((lab, m, card))
    payload: dict[str, Any] = {**common.header(NAME), "weights": {lab: card for lab, _, card in models},
                               "subjects": subjects, "n_knn": n_knn, "n_local": n_local, "results": {}, "seconds": {}}
    payload["machine"]["torch_threads"] = threads
    kinds = [("intensity", None, "intensity"), ("mind", None, "mind")] + [(lab, m, "net") for lab, m, _ in models]
    for ds in datasets:
        t = time.perf_counter()
        per_case = []
        for case in load_dataset(ds, subjects):
            feats = {name: (features_of(kind, case["ref"], m), features_of(kind, case["query"], m)) for name, m, kind in kinds}
            per_case.append(probe_case(case, feats, n_knn, n_local, seed))
        mean = {name: {k: _nanmean([c[name][k] for c in per_case]) for k in per_case[0][name]} for name, _, _ in kinds}
        payload["results"][ds] = {"mean": mean, "cases": per_case}
        if ds == "nichart":
            pairs = inter_subject_affine(subjects, kinds)
            for name, _, _ in kinds:
                if pairs and name in pairs[0]:
                    mean[name]["inter"] = _nanmean([p[name] for p in pairs])
            payload["results"][ds]["pairs"] = pairs
        payload["seconds"][ds] = time.perf_counter() - t
    if "nichart" in datasets:
        payload["score"] = {name: score(payload["results"]["nichart"]["mean"][name]) for name, _, _ in kinds}
    if fov:
        t = time.perf_counter()
        payload["fov"] = fov_term(fov_subjects or subjects[:2], [(lab, m) for lab, m, _ in models], fov, fov_scalings)
        payload["seconds"]["fov"] = time.perf_counter() - t
    if cli_scalings:
        t = time.perf_counter()
        payload["fov_cli"] = cli_fov(fov_subjects or subjects[:2], [(lab, m) for lab, m, _ in models], cli_scalings)
        payload["seconds"]["fov_cli"] = time.perf_counter() - t
    if reg_pairs > 0:
        t = time.perf_counter()
        payload["registration"] = registration_dice([(lab, m) for lab, m, _ in models], reg_pairs, quick, reg_datasets)
        payload["seconds"]["registration"] = time.perf_counter() - t
    payload["seconds"]["total"] = time.perf_counter() - t0
    return payload


def markdown(p: dict[str, Any]) -> str:
    lines = [f"Feature probe ({p['date']}, commit {p['commit']}; {common.machine_line(p['machine'])}; "
             f"nichart subjects {', '.join(p['subjects'])}; {p['n_knn']} voxels per structure for k-NN, "
             f"{p['n_local']} per region for local matching; {p['seconds']['total']:.0f} s)", ""]
    names = list(next(iter(p["results"].values()))["mean"]) if p["results"] else []
    # every measure of a dataset, in order of first appearance (``inter`` has no intensity row)
    keys = {ds: list(dict.fromkeys(k for row in r["mean"].values() for k in row)) for ds, r in p["results"].items()}
    cols = ["features"]
    for ds in p["results"]:
        cols += [f"{ds} {k}" for k in keys[ds]]
    if "score" in p:
        cols.append("score")
    fov = p.get("fov") or {}
    if fov:
        cols.append(f"fov {fov['changes'][0]}")
    rows = []
    for n in names:
        row: list[Any] = [n]
        for ds, r in p["results"].items():
            row += [r["mean"][n].get(k) for k in keys[ds]]
        if "score" in p:
            row.append(p["score"][n])
        if fov:
            row.append(fov["mean"].get(n, {}).get(fov["changes"][0]))
        rows.append(row)
    if rows:
        lines.append(common.md_table(cols, rows))
    if fov:
        subs, ch = fov["subjects"], fov["changes"]
        lines += ["", f"Field of view: change of the features in the central half of each nichart T1 when its field of view "
                  f"is padded ({fov['margin']} edge voxels on every side), cropped or shifted ({fov['margin']} voxels along "
                  "every axis), over the features' total variance; each network at its spacing, one pass (the image "
                  "normalised once: the network alone; `frozen`: its instance normalisation with the unchanged image's "
                  "statistics; `+S`: normalised after the change with MR scaling S); "
                  f"{p['seconds'].get('fov', 0):.0f} s:", ""]
        lines.append(common.md_table(["features"] + [f"{c} {s}" for c in ch for s in subs] + [f"{c} mean" for c in ch],
                                     [[r] + [per[s][c] for c in ch for s in subs] + [fov["mean"][r][c] for c in ch]
                                      for r, per in fov["rows"].items()]))
    cli = p.get("fov_cli") or {}
    if cli:
        subs = cli["subjects"]
        lines += ["", f"Field of view through `synthvox features` (its normalisation after padding {cli['margin']} edge "
                  "voxels, the image's 2 mm grid, 128-voxel windows): change in the central half and in the whole image; "
                  f"{p['seconds'].get('fov_cli', 0):.0f} s:", ""]
        lines.append(common.md_table(["features"] + [f"{k} {s}" for k in ("central", "whole") for s in subs],
                                     [[r] + [per[s][k] for k in ("central", "whole") for s in subs]
                                      for r, per in cli["rows"].items()]))
    if p.get("registration"):
        lines += ["", "Registration, nichart T1 -> FLAIR (inter-subject), mean Dice over 14 structures:", ""]
        lines.append(common.md_table(["features", "mean Dice", "per pair"],
                                     [[k, v["mean_dice"], ", ".join(f"{x:.3f}" for x in v["pairs"] if x is not None)]
                                      for k, v in p["registration"].items()]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", action="append", default=None, help="'shipped' or a model directory (repeatable; default shipped)")
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--subjects", default=None, help="comma list of nichart subjects (default Subj1,Subj2,Subj4; --quick Subj1,Subj2)")
    ap.add_argument("--reg-pairs", type=int, default=None, help="nichart registration pairs (default 2; --quick 1; 0 skips)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="fewer voxels, two subjects, one quick registration pair")
    ap.add_argument("--fov", default=None, help="field-of-view changes of the fov term, a comma list of pad, crop, "
                    "shift, or none (default pad,crop,shift; --quick pad)")
    ap.add_argument("--fov-subjects", default=None, help="nichart subjects of the fov term (default the first two "
                    "probe subjects; --quick the first)")
    ap.add_argument("--fov-scalings", default=None, help="MR scalings normalised after the change in the fov term, "
                    "a comma list of percentile, foreground (default each network's card)")
    ap.add_argument("--fov-cli", action="store_true", help="the fov term through synthvox features too (its "
                    "windows at 2 mm: minutes per network and subject), with the card's scaling and --fov-scalings")
    ap.add_argument("--reg-datasets", default="nichart", help="registration rows on these datasets too, a comma list "
                    "of nichart, spine, ctmr (--reg-pairs counts the nichart pairs; the others run all their pairs)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not common.require_shared_data():
        return 2
    subjects = (args.subjects.split(",") if args.subjects else
                (["Subj1", "Subj2"] if args.quick else ["Subj1", "Subj2", "Subj4"]))
    bad = [s for s in subjects if s not in ALIGNED_SUBJECTS]
    if bad:
        ap.error(f"subjects {bad} have T1/FLAIR headers that disagree; use some of {', '.join(ALIGNED_SUBJECTS)}")
    datasets = [d for d in args.datasets.split(",") if d]
    for d in datasets:
        if d not in DATASETS:
            ap.error(f"unknown dataset {d!r}: use {', '.join(DATASETS)}")
    reg_pairs = args.reg_pairs if args.reg_pairs is not None else (1 if args.quick else 2)
    reg_datasets = tuple(d for d in args.reg_datasets.split(",") if d)
    for d in reg_datasets:
        if d not in ("nichart", "spine", "ctmr"):
            ap.error(f"unknown registration dataset {d!r}: use nichart, spine, ctmr")
    fov = [c for c in (args.fov or ("pad" if args.quick else ",".join(FOV_CHANGES))).split(",") if c and c != "none"]
    scalings = [c for c in (args.fov_scalings or "").split(",") if c] or None
    from synthvox.models.extract import SCALINGS

    for c in fov:
        if c not in FOV_CHANGES:
            ap.error(f"unknown field-of-view change {c!r}: use {', '.join(FOV_CHANGES)} or none")
    for c in scalings or []:
        if c not in SCALINGS:
            ap.error(f"unknown scaling {c!r}: use {', '.join(SCALINGS)}")
    fov_subjects = args.fov_subjects.split(",") if args.fov_subjects else subjects[: 1 if args.quick else 2]
    missing = [s for s in fov_subjects if fov and not common.nichart_paths(s)["t1"].exists()]
    if missing:
        ap.error(f"--fov-subjects: no nichart T1 for {missing}")
    cli = [None, *(scalings or [])] if args.fov_cli else None
    payload = run(args.weights or ["shipped"], datasets, subjects, 150 if args.quick else 300,
                  300 if args.quick else 600, reg_pairs, args.quick, args.threads, fov=fov, fov_subjects=fov_subjects,
                  fov_scalings=scalings, cli_scalings=cli, reg_datasets=reg_datasets)
    js, md = common.write_results(NAME, payload, markdown(payload), args.out)
    print(markdown(payload))
    print(f"\nwrote {js}, {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
