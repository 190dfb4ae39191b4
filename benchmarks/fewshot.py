"""Few-shot segmentation on nichart_dev: train on 1 and on 3 subjects, score Dice on the others.

Labels: the DLMUSE parcellations of ``t1/`` mapped to the 14 coarse structures of
``dlmuse_groups.json`` (left and right merged), class ids 1..14 in the file's order; background and
every DLMUSE id in no group are 0. Training uses the first N subjects (Subj1, Subj1-3), testing the
others (all of them, or the first ``--test-subjects``), each on its own 2 mm T1 grid.

Variants, all at the same budget (steps, patch, batch, learning rate, seed):

- ``random``: the UNet from random initialisation, every parameter trained;
- ``default``: the pretrained weights (``--weights``, default: the shipped weights), every parameter;
- ``default-decoder``: the pretrained weights with the encoder frozen;
- ``distilled``: atlas accuracy at network speed (``synthvox finetune --atlas-image ... --unlabelled``,
  :func:`synthvox.segmentation.distill.distil`): the training subjects, as atlases, registered onto
  ``--unlabelled-subjects`` further subjects (their images only; their labels are never read by it),
  the pretrained network finetuned on atlases plus fused labels weighted by their confidence, at the
  same budget. Its row also has the pseudo-labels' own Dice on the unlabelled subjects, their atlas
  agreement and the registration seconds per unlabelled scan (outside the training budget).

When ``distilled`` runs, every row is scored on the subjects after the training and the unlabelled
ones (Subj8-11 with 3 training and 4 unlabelled subjects), so that no row has seen a test scan in any
form, and the plain finetuned rows' monitoring check scores the last unlabelled subject.

Without shipped weights and without ``--weights``, the ``default*`` variants are skipped and the
reason is printed and recorded. The random network has the architecture of the weights (or
``--variant``) so the comparison is like for like.

Per variant and training-set size: Dice per structure per test subject and their mean, finetuning
seconds per step (optimisation only, read from the model's ``log.csv``), inference seconds per 2 mm
volume, and the learning curve (training loss every step; Dice on a held-out subject at every
``--val-every`` steps: monitoring only, the final model is the one scored). Writes ``fewshot.json``,
``fewshot.md``, ``fewshot_curves.png`` and ``fewshot_structures.png`` into ``--out``.

Budgets (all overridable): on a GPU 2000 steps of two 96³ patches at the native 2 mm; on the CPU the
defaults of ``synthvox finetune`` there: a 30-minute budget per finetuned variant (``--minutes``; the
steps it gives are in the results) of two 48³ patches at 3 mm (the model frame; the label map comes
back onto the 2 mm grid and is scored there), and 3 test subjects (with ``distilled``: all the subjects
left). The training-free rows register every training subject (the atlases) onto every test subject
with MIND features. Inference runs MONAI's sliding window at ``--overlap`` (default 0.5, as
``synthvox segment``; ``--overlap 0.5,0.1`` scores each network row at both); its seconds per 2 mm
volume are at ``--threads`` torch threads.

    python -m benchmarks.fewshot                               # CPU: 30 min per variant at 3 mm, 48³ patches
    python -m benchmarks.fewshot --train-sizes 3 --variants default,atlas-weighted,ants-majority,finetuned+atlas
    python -m benchmarks.fewshot --device cuda --steps 2000 --patch 96 --test-subjects 0
    python -m benchmarks.fewshot --weights RUN/model --variants default,default-decoder
    python -m benchmarks.fewshot --train-sizes 3 --variants default,atlas-weighted,distilled --threads 1
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import common

#: variant name -> (initialisation, trained parameters); "weights" means the pretrained weights.
VARIANTS: dict[str, tuple[str, str]] = {
    "random": ("random", "all"),
    "default": ("weights", "all"),
    "default-decoder": ("weights", "decoder"),
}
#: Training-free rows (the training subjects are the atlases): synthvox registration (MIND) with
#: majority or locally weighted fusion, ANTs SyN with a majority vote (the anchor), and the ``default``
#: finetuned model's probabilities as one more voter in the weighted fusion.
ATLAS_METHODS = ("atlas-majority", "atlas-weighted", "ants-majority", "finetuned+atlas")
#: The pretrained network finetuned on the atlases plus their fused labels of the unlabelled subjects.
DISTILLED = "distilled"
ALL_METHODS = (*VARIANTS, *ATLAS_METHODS, DISTILLED)

#: Budgets per device (``--quick`` overrides both): steps, patch, batch, test subjects (0: all), val every.
BUDGETS: dict[str, dict[str, Any]] = {
    "cpu": {"steps": 1_000_000, "minutes": 30.0, "lr": 3e-3, "patch": 48, "batch": 2, "test_subjects": 3, "val_every": None,
            "spacing": 3.0, "unlabelled_subjects": 4},
    "cuda": {"steps": 2000, "minutes": None, "lr": 1e-3, "patch": 96, "batch": 2, "test_subjects": 0, "val_every": 200,
             "spacing": None, "unlabelled_subjects": 4},
    "quick": {"steps": 10, "minutes": None, "lr": 1e-3, "patch": 32, "batch": 1, "test_subjects": 1, "val_every": 5,
              "spacing": 4.0, "unlabelled_subjects": 1},
}


def coarse_labels(lab: torch.Tensor, groups: dict[str, list[int]]) -> torch.Tensor:
    """DLMUSE ids -> 1..len(groups) (in ``groups`` order); ids in no group -> 0."""
    lab = lab.round().long()
    lut = torch.zeros(max(int(lab.max()), max(max(v) for v in groups.values())) + 1, dtype=torch.int64)
    for i, ids in enumerate(groups.values(), start=1):
        lut[torch.as_tensor(ids)] = i
    return lut[lab]


def load_subject(subject: str, groups: dict[str, list[int]]) -> tuple[Any, Any]:
    """The T1 and its coarse label map (a :class:`synthvox.volume.Volume` each)."""
    from synthvox import io
    from synthvox.volume import Volume

    p = common.nichart_paths(subject)
    image = io.load(p["t1"])
    lab = io.load_labels(p["dlmuse"])
    return image, Volume(coarse_labels(lab.data, groups), lab.affine)


def weights_architecture(weights: Path) -> tuple[str, dict[str, Any]]:
    """The variant name of a model directory's UNet and any constructor arguments that differ from it."""
    from synthvox.models import VARIANTS as ARCH
    from synthvox.models import build_model, read_model_config

    _, cfg = read_model_config(weights)
    arch = dict(cfg["architecture"])
    for name in ARCH:
        if build_model(name, seed=0).config() == arch:
            return name, {}
    base = build_model("default", seed=0).config()
    return "default", {k: v for k, v in arch.items() if base.get(k) != v}


def step_seconds(log: Path) -> dict[str, float]:
    """Optimisation seconds per step from a finetune ``log.csv`` (steps after a validation excluded)."""
    with open(log, newline="") as f:
        rows = list(csv.DictReader(f))
    secs = [float(r["seconds"]) for r in rows]
    pure = [secs[i] - secs[i - 1] for i in range(1, len(rows)) if not rows[i - 1]["val_dice"]]
    return {
        "s_per_step": statistics.median(pure) if pure else (secs[0] if secs else float("nan")),
        "train_s_total": secs[-1] if secs else float("nan"),
    }


def read_curve(log: Path) -> dict[str, list[float]]:
    """Loss per step and held-out Dice at the validation steps from a finetune ``log.csv``."""
    with open(log, newline="") as f:
        rows = list(csv.DictReader(f))
    return {
        "step": [int(r["step"]) for r in rows],
        "loss": [float(r["loss"]) for r in rows],
        "val_step": [int(r["step"]) for r in rows if r["val_dice"]],
        "val_dice": [float(r["val_dice"]) for r in rows if r["val_dice"]],
    }


def score(seg: torch.Tensor, ref: torch.Tensor, names: list[str]) -> dict[str, float]:
    """Dice per structure (class ``i + 1`` is ``names[i]``); NaN where absent from both maps."""
    from synthvox.metrics import dice_per_label

    return dice_per_label(seg, ref, {n: [i] for i, n in enumerate(names, start=1)})


def run_one(
    variant: str,
    train: list[str],
    test: list[str],
    val_subject: str,
    data: dict[str, tuple[Any, Any]],
    names: list[str],
    args: argparse.Namespace,
    workdir: Path,
) -> dict[str, Any]:
    """Finetune one variant on ``train``, then segment and score every ``test`` subject."""
    from synthvox.segmentation import finetune

    init, trained = VARIANTS[variant]
    init_arg = str(args.weights) if init == "weights" else "random"
    overrides = args.overrides if init == "random" else None
    device = torch.device(args.device)
    out = workdir / f"{variant}_{len(train)}"
    t0 = time.perf_counter()
    finetune(
        [data[s][0] for s in train], [data[s][1] for s in train], out_dir=out, init=init_arg,
        variant=args.variant, steps=args.steps, patch_size=args.patch, batch_size=args.batch, lr=args.lr,
        train=trained, val=data[val_subject], device=device, seed=args.seed, spacing=args.spacing,
        val_every=args.val_every, checkpoint_every=None if args.minutes else args.steps, model_overrides=overrides,
        progress=False, minutes=args.minutes,
    )
    wall = time.perf_counter() - t0
    res = model_row(variant, out, len(train), test, data, names, args, wall)
    res.update({"init": "random" if init == "random" else str(args.weights), "trained": trained})
    return res


def model_row(variant: str, model: Path, n_train: int, test: list[str], data: dict[str, tuple[Any, Any]],
              names: list[str], args: argparse.Namespace, wall: float) -> dict[str, Any]:
    """Segment and score every ``test`` subject with a finetuned model directory, with the sliding window
    at each of ``args.overlap`` (the row's Dice and seconds at the first; every one's in
    ``at_overlap``); the row with its training log's figures."""
    from synthvox.segmentation import load_model_dir, segment_with

    device = torch.device(args.device)
    timing = step_seconds(model / "log.csv")
    curve = read_curve(model / "log.csv")
    net, meta = load_model_dir(model, device)
    at_overlap = {}
    for overlap in args.overlap:
        per_subject, inf_s = {}, []
        for s in test:
            image, ref = data[s]
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            seg = segment_with(net, meta, image, device=device, overlap=overlap)
            if device.type == "cuda":
                torch.cuda.synchronize()
            inf_s.append(time.perf_counter() - t)
            per_subject[s] = score(seg.data, ref.data, names)
        at_overlap[str(overlap)] = {**dice_summary(per_subject, names), "inference_s_per_volume": float(np.mean(inf_s))}
    first = at_overlap[str(args.overlap[0])]
    res = {
        "variant": variant,
        "n_train": n_train,
        **{k: v for k, v in first.items() if k != "inference_s_per_volume"},
        "s_per_step": timing["s_per_step"],
        "steps_per_s": 1.0 / timing["s_per_step"] if timing["s_per_step"] > 0 else float("nan"),
        "train_s_total": wall,
        "inference_s_per_volume": first["inference_s_per_volume"],
        "inference_overlap": args.overlap[0],
        "at_overlap": {k: {"mean_dice": v["mean_dice"], "inference_s_per_volume": v["inference_s_per_volume"]}
                       for k, v in at_overlap.items()},
        "final_loss": curve["loss"][-1],
        "steps": curve["step"][-1],
        "curve": curve,
    }
    others = "".join(f"; at overlap {k}: Dice {v['mean_dice']:.3f}, {v['inference_s_per_volume']:.1f} s/volume"
                     for k, v in list(res["at_overlap"].items())[1:])
    print(f"  {variant:16s} {n_train} train: mean Dice {res['mean_dice']:.3f}  {res['s_per_step']:.2f} s/step  "
          f"inference {res['inference_s_per_volume']:.1f} s/volume  (total {wall:.0f} s){others}", flush=True)
    return res


def registration_config(args: argparse.Namespace) -> Any:
    """The atlas registrations' settings: atlas segmentation's default, or with ``--quick`` the
    registration benchmark's quick solver settings."""
    from synthvox.registration import RegistrationConfig
    from synthvox.segmentation.atlas import ATLAS_SPACING

    if args.quick:
        from benchmarks.registration import QUICK_CONFIG

        return RegistrationConfig(**QUICK_CONFIG)
    return RegistrationConfig(spacing=ATLAS_SPACING)


def run_distilled(train: list[str], unlabelled: list[str], test: list[str], data: dict[str, tuple[Any, Any]],
                  names: list[str], args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The ``distilled`` row: the training subjects registered as atlases onto the ``unlabelled`` ones,
    the pretrained network finetuned on both (:func:`synthvox.segmentation.distill.distil`, the
    budget of the other finetuned rows), scored on ``test``. The unlabelled subjects' labels only
    score the pseudo-labels afterwards."""
    from synthvox import io
    from synthvox.segmentation import read_meta
    from synthvox.segmentation.atlas import Atlas
    from synthvox.segmentation.distill import distil, labels_path

    out = workdir / f"{DISTILLED}_{len(train)}"
    t0 = time.perf_counter()
    distil([Atlas(*data[s], name=s) for s in train], {s: data[s][0] for s in unlabelled}, out_dir=out,
           registration=registration_config(args), init=str(args.weights), variant=args.variant, steps=args.steps,
           patch_size=args.patch, batch_size=args.batch, lr=args.lr, device=args.device, seed=args.seed,
           spacing=args.spacing, val_every=args.val_every, checkpoint_every=None if args.minutes else args.steps,
           progress=False, minutes=args.minutes)
    wall = time.perf_counter() - t0
    record = read_meta(out).train["pseudo_labels"]
    pseudo = {s: score(io.load_labels(labels_path(out / record["pseudo_dir"], s)).data, data[s][1].data, names)
              for s in unlabelled}
    res = model_row(DISTILLED, out, len(train), test, data, names, args, wall)
    res.update({
        "init": str(args.weights), "trained": "all", "unlabelled": unlabelled,
        "pseudo_label_dice": dice_summary(pseudo, names)["mean_dice"],
        "pseudo_label_agreement": record["mean_agreement"],
        "pseudo_label_s_per_scan": record["seconds_this_run"] / max(1, record["made"]),
        "pseudo_min_confidence": record["min_confidence"], "labelled_every": record["labelled_every"],
        "train_s_total": wall - record["seconds_this_run"],
    })
    print(f"  {'':16s} pseudo-labels of {len(unlabelled)} unlabelled subjects: Dice {res['pseudo_label_dice']:.3f}, "
          f"{res['pseudo_label_s_per_scan']:.1f} s per scan", flush=True)
    return res


def dice_summary(per_subject: dict[str, dict[str, float]], names: list[str]) -> dict[str, Any]:
    """Mean Dice overall, per test subject and per structure, from Dice per structure per subject."""
    mat = np.array([[per_subject[s][n] for n in names] for s in per_subject], dtype=float)
    return {
        "mean_dice": float(np.nanmean(mat)),
        "mean_dice_per_subject": {s: float(np.nanmean(list(per_subject[s].values()))) for s in per_subject},
        "per_structure": dict(zip(names, np.nanmean(mat, axis=0).tolist())),
        "per_subject": per_subject,
    }


def _scored(method: str, n_train: int, per_subject: dict[str, dict[str, float]], names: list[str],
            seconds: list[float], extra: dict[str, Any]) -> dict[str, Any]:
    """A result row of a training-free method (same keys as :func:`run_one`'s where they apply)."""
    res = {
        "variant": method, "n_train": n_train, **dice_summary(per_subject, names),
        "s_per_step": float("nan"), "train_s_total": 0.0, "inference_s_per_volume": float(np.mean(seconds)),
        **extra,
    }
    print(f"  {method:16s} {n_train} atlas(es): mean Dice {res['mean_dice']:.3f}  {res['inference_s_per_volume']:.1f} s/target",
          flush=True)
    return res


def run_atlas(methods: list[str], train: list[str], test: list[str], data: dict[str, tuple[Any, Any]],
              names: list[str], args: argparse.Namespace, models: dict[int, Path]) -> list[dict[str, Any]]:
    """The synthvox atlas rows: each training subject registered once onto each test subject (MIND),
    then fused by majority and by local weights (and with the finetuned model's probabilities).
    Seconds per target: the registrations plus that fusion (plus the model's inference)."""
    from synthvox.registration.descriptors import FeatureExtractor
    from synthvox.segmentation import atlas as A

    device = torch.device(args.device)
    atlases = [A.Atlas(*data[s], name=s) for s in train]
    ids = A.check_atlases(atlases)
    extractor = FeatureExtractor(kind="mind", device=device)
    config = registration_config(args)
    per: dict[str, dict[str, dict[str, float]]] = {m: {} for m in methods}
    secs: dict[str, list[float]] = {m: [] for m in methods}
    reg_s: list[float] = []
    for s in test:
        image, ref = data[s]
        t = time.perf_counter()
        target = A.prepare_target(image, extractor, device)
        registered = [A.register_atlas(target, a, features="mind", weights=None, extractor=extractor, device=device,
                                       config=config) for a in atlases]
        t_reg = time.perf_counter() - t
        reg_s.append(t_reg)
        for m in methods:
            t = time.perf_counter()
            probs = None
            if m == "finetuned+atlas":
                probs = A.model_probabilities(models[len(train)], image, device, False)
            fusion = "majority" if m == "atlas-majority" else "weighted"
            seg = A.fuse(target, registered, sorted(set(ids) | set(probs[1] if probs else [])), fusion=fusion,
                         model_probabilities=probs).labels
            secs[m].append(t_reg + time.perf_counter() - t)
            per[m][s] = score(seg[None], ref.data, names)
    return [_scored(m, len(train), per[m], names, secs[m], {"registration_s_per_target": float(np.mean(reg_s))})
            for m in methods]


def run_ants_majority(train: list[str], test: list[str], data: dict[str, tuple[Any, Any]], names: list[str],
                      args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The anchor: ANTs SyN (the registration benchmark's preset) of each atlas T1 onto each test T1,
    the coarse labels moved with ``genericLabel`` and fused by a per-voxel majority vote (ties: the
    first atlas's label)."""
    import ants

    from benchmarks.registration import (  # the same preset as the registration benchmark
        ANTS_PARAMS,
        ANTS_QUICK,
    )
    from synthvox import io

    if args.threads:
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    params = {**ANTS_PARAMS, **(ANTS_QUICK if args.quick else {})}
    atlas_files = {}
    for a in train:
        path = workdir / f"{a}_coarse.nii.gz"
        io.save(data[a][1], path, labels=True, force=True)
        atlas_files[a] = (ants.image_read(str(common.nichart_paths(a)["t1"])), ants.image_read(str(path)))
    per, secs = {}, []
    for s in test:
        fx = ants.image_read(str(common.nichart_paths(s)["t1"]))
        t = time.perf_counter()
        votes = []
        for a in train:
            mv, ml = atlas_files[a]
            reg = ants.registration(fx, mv, outprefix=str(workdir / f"{a}_to_{s}_"), **params)
            votes.append(np.rint(ants.apply_transforms(fx, ml, reg["fwdtransforms"], interpolator="genericLabel").numpy()).astype(np.int64))
        stack = np.stack(votes)
        counts = np.stack([(stack == c).sum(0) for c in range(len(names) + 1)])
        fused = counts.argmax(0)
        tie = counts.max(0) == 1
        fused[tie] = stack[0][tie]
        secs.append(time.perf_counter() - t)
        per[s] = score(torch.from_numpy(fused)[None], data[s][1].data, names)
    return _scored("ants-majority", len(train), per, names, secs, {"ants": {"antspyx": ants.__version__, **params}})


def plot_curves(results: list[dict[str, Any]], path: Path, val_subject: str) -> None:
    """Training loss (smoothed) and held-out Dice against step, one line per variant and size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"random": "tab:gray", "default": "tab:blue", "default-decoder": "tab:orange", DISTILLED: "tab:green"}
    for r in results:
        if "curve" not in r:  # the training-free rows
            continue
        c = r["curve"]
        style = "-" if r["n_train"] > 1 else "--"
        label = f"{r['variant']}, {r['n_train']} train"
        loss = np.asarray(c["loss"])
        k = max(1, len(loss) // 20)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax1.plot(c["step"][k - 1:], smooth, style, color=colours.get(r["variant"]), label=label)
        ax2.plot(c["val_step"], c["val_dice"], style, marker="o", color=colours.get(r["variant"]), label=label)
    ax1.set(xlabel="step", ylabel="Dice + CE loss (running mean)", title="training loss")
    ax2.set(xlabel="step", ylabel="mean Dice", title=f"held-out Dice ({val_subject})", ylim=(0, 1))
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_structures(results: list[dict[str, Any]], names: list[str], path: Path) -> None:
    """Mean Dice per structure, grouped bars per variant, one panel per training-set size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["n_train"] for r in results})
    fig, axes = plt.subplots(len(sizes), 1, figsize=(12, 3.2 * len(sizes)), squeeze=False)
    for ax, n in zip(axes[:, 0], sizes):
        rows = [r for r in results if r["n_train"] == n]
        w = 0.8 / max(1, len(rows))
        x = np.arange(len(names))
        for j, r in enumerate(rows):
            ax.bar(x + (j - (len(rows) - 1) / 2) * w, [r["per_structure"][k] for k in names], w, label=r["variant"])
        ax.set_xticks(x, [k.replace("_", " ") for k in names], rotation=30, ha="right", fontsize=8)
        ax.set(ylabel="Dice", ylim=(0, 1), title=f"{n} training subject(s)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(payload: dict[str, Any]) -> str:
    """The README table: mean and per-structure Dice side by side, speed underneath."""
    results, names = payload["results"], payload["structures"]
    s = payload["settings"]
    lines = [
        f"{payload['date']} · commit {payload['commit']} · {common.machine_line(payload['machine'])} · "
        f"device {s['device']}",
        "",
        f"Budget per variant: {str(s['minutes']) + ' min' if s.get('minutes') else str(s['steps']) + ' steps'}, patch {s['patch']}³, batch {s['batch']}, lr {s['lr']}, "
        f"spacing {s['spacing'] or 'native (2 mm)'}; pretrained weights: {payload['weights'] or '–'}"
        + (f" ({payload['weights_note']})" if payload.get("weights_note") else "")
        + "." + (f" {payload['skipped']}." if payload.get("skipped") else ""),
        "",
    ]
    for n in sorted({r["n_train"] for r in results}):
        rows = [r for r in results if r["n_train"] == n]
        test = list(rows[0]["per_subject"])
        unl = payload.get("unlabelled_subjects")
        lines.append(f"**{n} training subject(s)** ({', '.join(payload['train_subjects'][str(n)])}); "
                     + (f"unlabelled, for distilled: {', '.join(unl)}; " if unl else "")
                     + f"{len(test)} test subjects ({', '.join(test)}); inference overlap {(s.get('overlap') or [0.5])[0]}, "
                     f"{s.get('threads') or 'default'} thread(s)")
        lines.append("")
        table = [["**mean Dice**", *[r["mean_dice"] for r in rows]]]
        table += [[k.replace("_", " "), *[r["per_structure"][k] for r in rows]] for k in names]
        table += [["structures found (Dice > 0.1)", *[sum(v > 0.1 for v in r["per_structure"].values()) for r in rows]],
                  ["finetune steps", *[r.get("steps", float("nan")) for r in rows]],
                  ["finetune s/step", *[r["s_per_step"] for r in rows]],
                  ["training s", *[r["train_s_total"] for r in rows]],
                  ["s/target (registrations + fusion, or inference)", *[r["inference_s_per_volume"] for r in rows]]]
        for k in list(next((r["at_overlap"] for r in rows if "at_overlap" in r), {}))[1:]:
            table += [[f"mean Dice at overlap {k}", *[r.get("at_overlap", {}).get(k, {}).get("mean_dice", float("nan")) for r in rows]],
                      [f"s/volume at overlap {k}",
                       *[r.get("at_overlap", {}).get(k, {}).get("inference_s_per_volume", float("nan")) for r in rows]]]
        if any(r["variant"] == DISTILLED for r in rows):
            table += [["pseudo-labels: Dice on the unlabelled subjects", *[r.get("pseudo_label_dice", float("nan")) for r in rows]],
                      ["pseudo-labelling s per unlabelled scan", *[r.get("pseudo_label_s_per_scan", float("nan")) for r in rows]]]
        lines.append(common.md_table(["structure", *[r["variant"] for r in rows]], table))
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-sizes", default="1,3", help="training-set sizes, comma-separated (first N subjects)")
    ap.add_argument("--variants", default=",".join(ALL_METHODS), help=f"comma list of {', '.join(ALL_METHODS)}")
    ap.add_argument("--weights", type=Path, default=None, help="pretrained model directory (default: the shipped weights)")
    ap.add_argument("--variant", default="default", help="architecture of the random network when there are no weights")
    ap.add_argument("--steps", type=int, default=None, help="finetuning steps per variant (GPU default 2000; on the CPU a --minutes budget)")
    ap.add_argument("--minutes", type=float, default=None, help="wall-clock budget per finetuned variant (CPU default 30, as synthvox finetune)")
    ap.add_argument("--patch", type=int, default=None, help="training patch and inference window (CPU 48, GPU 96)")
    ap.add_argument("--batch", type=int, default=None, help="patches per step (2)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: synthvox finetune's for the device)")
    ap.add_argument("--spacing", type=float, default=None, help="training spacing in mm (CPU default 4, GPU native 2 mm); Dice is always scored on the 2 mm T1 grid")
    ap.add_argument("--val-every", type=int, default=None, help="steps between held-out Dice checks")
    ap.add_argument("--test-subjects", type=int, default=None,
                    help="score only the first N test subjects (0: all; default 3 on the CPU, all with distilled)")
    ap.add_argument("--unlabelled-subjects", type=int, default=None,
                    help="with distilled: the N subjects after the largest training set are its unlabelled scans (default 4)")
    ap.add_argument("--overlap", default="0.5",
                    help="sliding-window overlap of the network rows' inference (segment's 0.5); a comma list scores "
                         "each (the rows' Dice at the first, the others in extra table rows)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: unchanged)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=common.RESULTS, help="results folder (default benchmarks/results)")
    ap.add_argument("--quick", action="store_true", help="1 train and 1 test subject, 10 steps, 32³ patches at 4 mm")
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    budget = BUDGETS["quick" if args.quick else ("cuda" if args.device.startswith("cuda") else "cpu")]
    budget = dict(budget)
    if args.steps is not None and args.minutes is None:
        budget["minutes"] = None  # a step count replaces the CPU's minutes budget
    if DISTILLED in args.variants.split(",") and not args.quick:
        budget["test_subjects"] = 0  # every subject outside the training and unlabelled ones
    for k, v in budget.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.quick and args.train_sizes == "1,3":
        args.train_sizes = "1"
    try:
        args.overlap = [float(v) for v in str(args.overlap).split(",") if v.strip()]
    except ValueError:
        ap.error(f"--overlap takes numbers in [0, 1), comma-separated, got {args.overlap!r}")
    if not args.overlap or not all(0.0 <= v < 1.0 for v in args.overlap):
        ap.error(f"--overlap takes numbers in [0, 1), comma-separated, got {args.overlap}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not common.has_shared_data():
        raise SystemExit(f"nichart_dev not found under {common.eval_dir()} (set SYNTHVOX_SHARED)")
    if args.threads:
        torch.set_num_threads(args.threads)
    from synthvox.models import default_weights_path

    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in ALL_METHODS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}: use {', '.join(ALL_METHODS)}")
    if "finetuned+atlas" in variants and "default" not in variants:
        raise SystemExit("finetuned+atlas uses the default variant's finetuned model: add default to --variants")
    if "ants-majority" in variants and importlib.util.find_spec("ants") is None:
        variants.remove("ants-majority")
        print("skipped ants-majority: antspyx is not installed (pip install antspyx)", flush=True)
    sizes = [int(v) for v in args.train_sizes.split(",") if v]
    if not sizes or min(sizes) < 1 or max(sizes) > len(common.SUBJECTS) - 2:
        raise SystemExit(f"--train-sizes must be between 1 and {len(common.SUBJECTS) - 2}")

    skipped, weights_note = "", ""
    if args.weights is None:
        args.weights = default_weights_path()
        if args.weights is None and any((v in VARIANTS and VARIANTS[v][0] == "weights") or v == DISTILLED for v in variants):
            dropped = [v for v in variants if v in ("default", "default-decoder", "finetuned+atlas", DISTILLED)]
            variants = [v for v in variants if v not in dropped]
            skipped = f"skipped {', '.join(dropped)}: no default weights ship yet and no --weights given"
            print(skipped, flush=True)
        elif args.weights is not None:
            weights_note = "the shipped default weights"
    else:
        weights_note = "given with --weights, not the shipped default"
    if not variants:
        raise SystemExit("nothing to run: " + skipped)
    args.overrides = None
    if args.weights is not None:
        args.variant, args.overrides = weights_architecture(args.weights)
        args.overrides = args.overrides or None

    groups = common.dlmuse_groups()
    names = list(groups)
    subjects = common.SUBJECTS
    val_subject = subjects[-1]
    unlabelled: list[str] = []
    if DISTILLED in variants:  # the same test subjects for every row: outside the training and unlabelled ones
        first = max(sizes)
        unlabelled = subjects[first:first + args.unlabelled_subjects]
        if args.unlabelled_subjects < 1 or first + args.unlabelled_subjects >= len(subjects):
            raise SystemExit(f"--unlabelled-subjects must leave a test subject: 1 to {len(subjects) - first - 1} "
                             f"after {first} training subjects")
        val_subject = unlabelled[-1]  # the plain rows' monitoring check: never a test subject
    needed: set[str] = {val_subject, *unlabelled}
    plan = []
    for n in sizes:
        train = subjects[:n]
        rest = subjects[max(sizes) + len(unlabelled):] if unlabelled else subjects[n:]
        test = rest[: args.test_subjects] if args.test_subjects else rest
        plan.append((train, test))
        needed.update(train, test)
    data = {s: load_subject(s, groups) for s in sorted(needed, key=subjects.index)}
    header = common.header("fewshot", args.device)
    print(f"{common.machine_line(header['machine'])}; device {args.device}; budget {args.steps} steps, patch "
          f"{args.patch}, batch {args.batch}; architecture {args.variant}"
          f"{' + ' + str(args.overrides) if args.overrides else ''}; weights {args.weights or '-'}", flush=True)

    results = []
    with tempfile.TemporaryDirectory(prefix="fewshot_") as tmp:
        for train, test in plan:
            print(f"{len(train)} training subject(s) {train}; {len(test)} test subjects", flush=True)
            models: dict[int, Path] = {}
            for v in [v for v in variants if v in VARIANTS]:
                results.append(run_one(v, train, test, val_subject, data, names, args, Path(tmp)))
                if v == "default":
                    models[len(train)] = Path(tmp) / f"default_{len(train)}"
            atlas_rows = [m for m in ATLAS_METHODS if m in variants and m != "ants-majority"]
            if atlas_rows:
                results.extend(run_atlas(atlas_rows, train, test, data, names, args, models))
            if "ants-majority" in variants:
                results.append(run_ants_majority(train, test, data, names, args, Path(tmp)))
            if DISTILLED in variants:
                results.append(run_distilled(train, unlabelled, test, data, names, args, Path(tmp)))

    payload: dict[str, Any] = {
        **header,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "architecture": args.variant,
        "weights": None if args.weights is None else str(args.weights),
        "weights_note": weights_note,
        "skipped": skipped,
        "structures": names,
        "label_mapping": "DLMUSE ids -> 14 coarse groups of dlmuse_groups.json (ids 1..14 in file order); other ids -> 0",
        "val_subject": val_subject,
        "train_subjects": {str(len(t)): t for t, _ in plan},
        "unlabelled_subjects": unlabelled,
        "results": results,
        "peak_rss_mb": common.peak_rss_mb(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    plot_curves(results, args.out / "fewshot_curves.png", val_subject)
    plot_structures(results, names, args.out / "fewshot_structures.png")
    md = markdown(payload)
    js, mdp = common.write_results("fewshot", payload, md, args.out)
    print("\n" + md)
    print(f"wrote {js}, {mdp}, {args.out / 'fewshot_curves.png'}, {args.out / 'fewshot_structures.png'}")
    return payload


if __name__ == "__main__":
    main()
