"""Registration accuracy, speed and memory: synthvox (MIND, network, both) against ANTs SyN and the affines.

Datasets (``--datasets``, all from ``../shared/data/eval``):

- ``nichart``: T1 of subject A (moving, with its DLMUSE labels) onto the FLAIR of subject B (fixed),
  scored against B's ``flair_dlmuse/`` on the 14 coarse structures of ``dlmuse_groups.json``. Pairs
  are (Subj i, Subj i+3 mod 11), i = 1.., the first ``--pairs`` of them (or ``--pair A:B`` ...;
  ``--consecutive``: the 11 pairs Subj i -> Subj i+1, the last onto the first).
- ``spine``: the spinal-cord subject, T1w -> T2w, T2* -> T2w and T2* -> T1w (the 7.5 mm-thick T2*
  always moving, so scoring happens on an isotropic 1 mm grid), scored on the cord masks.
- ``ctmr``: the abdominal MR (moving) onto the CT (fixed), scored on the 7 organs of ``organs.json``.

Methods (``--methods``):

- ``headers``: the moving labels carried through the image headers alone (nearest neighbour);
- ``affine``: synthvox initialisation + affine stage on MIND features, no deformable stage;
- ``ants``: ANTs SyN through antspyx, the standard multimodal preset (``type_of_transform="SyN"``:
  centre-of-mass initialisation, affine then SyN, Mattes mutual information in both stages),
  labels moved with ``genericLabel`` (the ``bench`` extra; skipped with a reason when not installed);
- ``mind``, ``net``, ``both``: ``synthvox.registration.register`` with those features (``net`` and
  ``both`` need ``--weights`` or shipped default weights; skipped with a reason otherwise);
- ``METHOD@MM`` for any synthvox method (``affine``, ``mind``, ``net``, ``both``): the same on a working
  grid of MM mm instead of the default (``mind@2.5``), to measure the speed/accuracy trade-off side by side.

Every (method, dataset) runs in its own child process (this script with ``--worker``), so the peak
resident memory reported is that process's own ``ru_maxrss`` (imports, data and the method
together; nothing subtracted). Seconds per pair are the wall time of the registration call plus
moving the labels (loading files and scoring excluded); synthvox's per-stage split is the one of its
report, ANTs's is registration / label transform. Folding is the percentage of voxels of the fixed
grid where the Jacobian determinant of the whole fixed -> moving map (affine and deformable
composed, ``synthvox.metrics.folding_percent``) is <= 0, computed the same way for ANTs from its
composed displacement field. HD95 is MONAI's, in mm on the fixed grid. torch and ITK use
``--threads`` threads each (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``).

Writes ``registration.json``, ``registration.md``, ``registration_dice.png`` (Dice per method) and
``registration_qc.png`` (one nichart pair per method) into ``--out`` (default benchmarks/results).

    python -m benchmarks.registration --threads 1                 # CPU: 6 nichart pairs + spine + CT/MR
    python -m benchmarks.registration --weights RUN/model --methods net,both,ants
    python -m benchmarks.registration --quick --out /tmp/reg       # one nichart pair, few iterations
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common

NAME = "registration"
METHODS = ("headers", "affine", "ants", "mind", "net", "both")
#: the methods that run synthvox; each also as ``METHOD@MM``, on that working spacing instead of the default
SYNTHVOX_METHODS = ("affine", "mind", "net", "both")
DATASETS = ("nichart", "spine", "ctmr")
DATASET_TITLES = {
    "nichart": "nichart_dev: T1 -> FLAIR, inter-subject (14 coarse DLMUSE structures)",
    "spine": "spine_multicontrast: cross-contrast, one subject (cord mask)",
    "ctmr": "totalseg_ct_mr: MR -> CT, two people (7 organs)",
}
#: synthvox solver settings of ``--quick`` (the test suite); the full run uses the defaults.
QUICK_CONFIG = {"spacing": 3.0, "affine_iters": (20, 10), "convex_grid_mm": 9.0, "convex_range_mm": 18.0, "adam_iters": 10}
#: ANTs settings: the SyN preset as antspyx defines it; ``--quick`` only shortens the SyN iterations.
ANTS_PARAMS = {"type_of_transform": "SyN", "aff_metric": "mattes", "syn_metric": "mattes",
               "aff_sampling": 32, "syn_sampling": 32, "reg_iterations": (40, 20, 0)}
ANTS_QUICK = {"reg_iterations": (5, 0, 0)}
ANTS_PRESET_NOTE = ("initial transform: centres of mass ([fixed,moving,1]); Affine[0.25], MattesMI 32 bins "
                    "(20% regular sampling), 2100x1200x1200x0 iterations, shrink 4x2x2x1, smoothing 3x2x1x0 "
                    "(fixed by the preset); SyN[0.2,3,0], MattesMI 32 bins, reg_iterations per level; "
                    "labels: antsApplyTransforms genericLabel")


# ----------------------------------------------------------------------------------------------- data


def nichart_pairs(n: int) -> list[tuple[str, str]]:
    """Deterministic inter-subject pairs (moving A, fixed B): (Subj i, Subj i+3 mod 11), i = 1..n."""
    s = common.SUBJECTS
    return [(s[i], s[(i + 3) % len(s)]) for i in range(len(s))][:n]


def dataset_pairs(dataset: str, n_pairs: int = 6, explicit: list[str] | None = None) -> list[dict[str, Any]]:
    """The pairs of one dataset: name, file paths, and the structures scored (name -> label ids)."""
    ev = common.eval_dir()
    if dataset == "nichart":
        groups = common.dlmuse_groups()
        chosen = [tuple(p.split(":")) for p in explicit] if explicit else nichart_pairs(n_pairs)
        out = []
        for a, b in chosen:
            pa, pb = common.nichart_paths(a), common.nichart_paths(b)
            out.append({"name": f"{a}->{b}", "moving": pa["t1"], "moving_labels": pa["dlmuse"], "fixed": pb["flair"],
                        "fixed_labels": pb["flair_dlmuse"], "groups": groups})
        return out
    if dataset == "spine":
        d = ev / "spine_multicontrast"
        return [{"name": f"{m}->{f}", "moving": d / f"{m}.nii.gz", "moving_labels": d / f"{m}_cord.nii.gz",
                 "fixed": d / f"{f}.nii.gz", "fixed_labels": d / f"{f}_cord.nii.gz", "groups": {"cord": [1]}}
                for m, f in (("t1w", "t2w"), ("t2s", "t2w"), ("t2s", "t1w"))]
    if dataset == "ctmr":
        d = ev / "totalseg_ct_mr"
        organs = {k: [int(v)] for k, v in json.loads((d / "organs.json").read_text()).items() if not k.startswith("_")}
        return [{"name": "mr->ct", "moving": d / "mr.nii.gz", "moving_labels": d / "mr_seg.nii.gz",
                 "fixed": d / "ct.nii.gz", "fixed_labels": d / "ct_seg.nii.gz", "groups": organs}]
    raise ValueError(f"unknown dataset {dataset!r}: use {', '.join(DATASETS)}")


def load_pair(pair: dict[str, Any]) -> dict[str, Any]:
    """A pair's images and label maps (``fixed``, ``moving``, ``moving_labels``, ``fixed_labels``)."""
    from synthvox import io

    return {"fixed": io.load(pair["fixed"]), "moving": io.load(pair["moving"]),
            "moving_labels": io.load_labels(pair["moving_labels"]), "fixed_labels": io.load_labels(pair["fixed_labels"])}


def group_index(labels: np.ndarray, groups: dict[str, list[int]]) -> np.ndarray:
    """A label map recoded to 1..len(groups) in the order of ``groups`` (0 elsewhere), for pictures."""
    out = np.zeros(labels.shape, np.uint8)
    for k, ids in enumerate(groups.values(), start=1):
        out[np.isin(labels, ids)] = k
    return out


# --------------------------------------------------------------------------------------------- worker


def _score(moved_labels: Any, fixed_labels: Any, spacing: np.ndarray, groups: dict[str, list[int]]) -> dict[str, Any]:
    from synthvox.metrics import dice_per_label, hd95_per_label

    dice = dice_per_label(moved_labels, fixed_labels, groups)
    hd = hd95_per_label(moved_labels, fixed_labels, spacing, groups)
    dv = [v for v in dice.values() if v == v]
    hv = [v for v in hd.values() if v == v]
    return {"dice": dice, "mean_dice": float(np.mean(dv)) if dv else float("nan"),
            "hd95": hd, "mean_hd95": float(np.mean(hv)) if hv else float("nan")}


def split_method(method: str) -> tuple[str, float | None]:
    """``"mind@2.5"`` -> ``("mind", 2.5)``: a synthvox method on another working spacing (mm)."""
    base, at, spacing = method.partition("@")
    if not at:
        return method, None
    try:
        value = float(spacing)
    except ValueError:
        value = float("nan")
    if base not in SYNTHVOX_METHODS or not value > 0:
        raise ValueError(f"bad method {method!r}: a spacing goes with {', '.join(SYNTHVOX_METHODS)}, e.g. mind@2.5")
    return base, value


def _run_synthvox(method: str, pair: dict[str, Any], data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from synthvox.registration import RegistrationConfig, register

    method, spacing = split_method(method)
    cfg = RegistrationConfig(**QUICK_CONFIG) if args.quick else RegistrationConfig()
    if args.set:
        from synthvox.config import apply_overrides

        cfg = apply_overrides(cfg, args.set, "--set")
    if spacing is not None:
        cfg = dataclasses.replace(cfg, spacing=spacing)
    features = "mind" if method == "affine" else method
    t = time.perf_counter()
    res = register(data["fixed"], data["moving"], features=features, weights=args.weights, device=args.device,
                   moving_labels=data["moving_labels"], deformable=method != "affine", config=cfg, seed=args.seed)
    sec = time.perf_counter() - t
    rep = res.report
    stages = {k: v for k, v in rep["seconds"].items() if k != "total"}
    out = {"moved": res.moved.data[0].numpy(), "moved_labels": res.moved_labels.data[0].numpy(), "seconds": sec,
           "stages": stages, "folding_percent": float(rep["folding_percent"]), "adam_steps": rep.get("adam_steps")}
    if importlib.util.find_spec("ants") is not None and not args.no_readback:
        out["ants_readback"] = ants_readback(res, pair)
    return out


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of the voxels labelled in either map whose label ids agree."""
    fg = (a != 0) | (b != 0)
    return float((a[fg] == b[fg]).mean()) if fg.any() else 1.0


def _inside_moving(res: Any, data_moving_shape: tuple[int, ...], margin: float) -> np.ndarray:
    """Fixed voxels whose image under the registration lies ``margin`` voxels or more inside MOVING."""
    import torch

    from synthvox.registration.warp import transform_points, world_points

    fixed = res.fixed
    x = world_points(fixed.shape, fixed.affine)
    y = x + res.displacement.permute(1, 2, 3, 0).to(torch.float64)
    vox = transform_points(y, np.linalg.inv(res.inverse_warp.affine)).numpy()
    hi = np.asarray(data_moving_shape, np.float64) - 1 - margin
    return np.all((vox >= margin) & (vox <= hi), axis=-1)


def ants_readback(res: Any, pair: dict[str, Any]) -> dict[str, float]:
    """Every transform file synthvox writes, read back and applied by antspyx (after the timing).

    The result is saved as ``synthvox register`` saves it; antspyx then moves MOVING's labels with
    ``warp.nii.gz`` and with ``deformable_warp.nii.gz`` + ``affine.txt`` (nearest neighbour) and the
    agreement with synthvox's own moved labels is recorded, with the largest difference of the moved
    image (``warp.nii.gz``, linear) where the map lands a voxel or more inside MOVING; FIXED's labels go onto MOVING's grid through
    ``inverse_warp.nii.gz``, and their agreement with MOVING's labels is set beside the forward one's
    with FIXED's labels (both around the registration's accuracy when the inverse is right).
    """
    import ants

    with tempfile.TemporaryDirectory(prefix="readback_") as td:
        d = Path(td)
        res.save(d / "out")
        o = d / "out"
        fx = ants.image_read(str(pair["fixed"]))
        mv = ants.image_read(str(pair["moving"]))
        ml = ants.image_read(str(pair["moving_labels"]))
        fl = ants.image_read(str(pair["fixed_labels"]))
        ours = res.moved_labels.data[0].numpy()
        nn = "nearestNeighbor"
        via_warp = ants.apply_transforms(fx, ml, [str(o / "warp.nii.gz")], interpolator=nn).numpy()
        via_two = ants.apply_transforms(fx, ml, [str(o / "deformable_warp.nii.gz"), str(o / "affine.txt")],
                                        interpolator=nn).numpy()
        moved = ants.apply_transforms(fx, mv, [str(o / "warp.nii.gz")]).numpy()
        back = ants.apply_transforms(mv, fl, [str(o / "inverse_warp.nii.gz")], interpolator=nn).numpy()
        ref_m = ml.numpy()
        ref_f = fl.numpy()
    mine = res.moved.data[0].numpy()
    scale = float(np.abs(mine).max()) or 1.0
    # the image is compared where the map lands at least a voxel inside MOVING: within a voxel of its
    # edge ITK's linear interpolator repeats the edge voxel or returns 0 where torch blends with 0
    inside = _inside_moving(res, data_moving_shape=tuple(res.inverse_warp.shape), margin=1.0)
    diff = np.abs(moved - mine)[inside]
    return {"warp_labels_agree": _agreement(np.rint(via_warp), ours),
            "affine_deformable_labels_agree": _agreement(np.rint(via_two), ours),
            "warp_image_max_diff_rel": float(diff.max()) / scale if diff.size else 0.0,
            "inverse_labels_agree_moving": _agreement(np.rint(back), ref_m),
            "forward_labels_agree_fixed": _agreement(ours, ref_f)}


def _run_headers(pair: dict[str, Any], data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from synthvox.volume import resample_like

    t = time.perf_counter()
    lab = resample_like(data["moving_labels"], data["fixed"], mode="nearest")
    sec = time.perf_counter() - t
    moved = resample_like(data["moving"], data["fixed"])
    # the map is the identity in world space: its Jacobian is 1 everywhere
    return {"moved": moved.data[0].numpy(), "moved_labels": lab.data[0].numpy(), "seconds": sec,
            "stages": {"resample": sec}, "folding_percent": 0.0}


def _run_ants(pair: dict[str, Any], data: dict[str, Any], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import ants
    import nibabel as nib
    import torch

    from synthvox.metrics import folding_percent
    from synthvox.registration.warp import RAS_TO_LPS

    params = {**ANTS_PARAMS, **(ANTS_QUICK if args.quick else {})}
    fx = ants.image_read(str(pair["fixed"]))
    mv = ants.image_read(str(pair["moving"]))
    ml = ants.image_read(str(pair["moving_labels"]))
    prefix = str(tmp / (pair["name"].replace(">", "").replace("/", "_") + "_"))
    t = time.perf_counter()
    reg = ants.registration(fx, mv, outprefix=prefix, **params)
    t_reg = time.perf_counter() - t
    t = time.perf_counter()
    lab = ants.apply_transforms(fx, ml, reg["fwdtransforms"], interpolator="genericLabel")
    t_lab = time.perf_counter() - t
    # the whole fixed -> moving map as one displacement field on the fixed grid (ITK: LPS, mm)
    comp = ants.apply_transforms(fx, mv, reg["fwdtransforms"], compose=prefix + "composed")
    img = nib.load(comp)
    field = np.asarray(img.dataobj, np.float64).reshape(*fx.shape, 3)
    disp = torch.from_numpy(np.moveaxis(field, -1, 0).copy()) * torch.tensor(RAS_TO_LPS, dtype=torch.float64)[:, None, None, None]
    fold = folding_percent(disp, affine=data["fixed"].affine)
    return {"moved": reg["warpedmovout"].numpy().astype(np.float32), "moved_labels": np.rint(lab.numpy()).astype(np.int64),
            "seconds": t_reg + t_lab, "stages": {"registration": t_reg, "labels": t_lab}, "folding_percent": fold}


def worker(args: argparse.Namespace) -> None:
    """Run one method on every pair of one dataset; write a JSON file (and the QC arrays of pair 0)."""
    import torch

    from synthvox.volume import spacing_of

    torch.set_num_threads(args.threads)
    method, dataset = args.worker, args.dataset
    out = Path(args.worker_out)
    pairs = dataset_pairs(dataset, args.pairs, args.pair)
    rows = []
    with tempfile.TemporaryDirectory(prefix="regbench_") as td:
        for i, pair in enumerate(pairs):
            data = load_pair(pair)
            if method == "headers":
                r = _run_headers(pair, data, args)
            elif method == "ants":
                r = _run_ants(pair, data, args, Path(td))
            else:
                r = _run_synthvox(method, pair, data, args)
            ref = data["fixed_labels"].data[0].numpy()
            if r["moved_labels"].shape != ref.shape:
                raise RuntimeError(f"{method}: moved labels {r['moved_labels'].shape} not on the fixed grid {ref.shape}")
            score = _score(r["moved_labels"], ref, spacing_of(data["fixed"].affine), pair["groups"])
            row = {"pair": pair["name"], **score, "seconds": r["seconds"], "stages": r["stages"],
                   "folding_percent": r["folding_percent"]}
            for key in ("adam_steps", "ants_readback"):
                if r.get(key) is not None:
                    row[key] = r[key]
            rows.append(row)
            print(f"[{method}/{dataset}] {pair['name']}: Dice {score['mean_dice']:.3f}  HD95 {score['mean_hd95']:.1f} mm  "
                  f"folding {r['folding_percent']:.3f}%  {r['seconds']:.1f} s", flush=True)
            if i == 0 and args.qc_out:
                np.savez_compressed(args.qc_out, moved=r["moved"].astype(np.float32),
                                    moved_labels=group_index(r["moved_labels"], pair["groups"]))
    result = {"method": method, "dataset": dataset, "pairs": rows, "peak_rss_mb": common.peak_rss_mb(),
              "threads": {"torch": torch.get_num_threads(),
                          "itk": int(os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "0") or 0)}}
    out.write_text(json.dumps(result, default=common._default))


# --------------------------------------------------------------------------------------------- parent


def skip_reason(method: str, weights: str | None) -> str | None:
    """Why a method cannot run here (``None`` when it can)."""
    if method == "ants" and importlib.util.find_spec("ants") is None:
        return "antspyx is not installed (pip install 'synthvox[bench]')"
    if split_method(method)[0] in ("net", "both") and weights is None:
        return "no network weights: no default weights ship with this version and --weights was not given"
    return None


def resolve_weights(weights: str | None) -> str | None:
    if weights is not None:
        return str(Path(weights).resolve())
    from synthvox.models import default_weights_path

    p = default_weights_path()
    return None if p is None else str(p)


def run_worker(method: str, dataset: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """This module as a child process for one (method, dataset); returns its JSON (or an error)."""
    out = tmp / f"{method}_{dataset}.json"
    qc = tmp / f"qc_{method}.npz" if dataset == "nichart" else None
    cmd = [sys.executable, "-m", "benchmarks.registration", "--worker", method, "--dataset", dataset,
           "--worker-out", str(out), "--pairs", str(args.pairs), "--device", args.device,
           "--threads", str(args.threads), "--seed", str(args.seed)]
    cmd += [x for p in (args.pair or []) for x in ("--pair", p)]
    cmd += [x for kv in args.set for x in ("--set", kv)]
    if args.weights:
        cmd += ["--weights", args.weights]
    if args.quick:
        cmd.append("--quick")
    if args.no_readback:
        cmd.append("--no-readback")
    if qc is not None:
        cmd += ["--qc-out", str(qc)]
    n = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": n}
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=common.with_repo_on_path(env), stdout=None, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0 or not out.is_file():
        tail = proc.stderr.strip().splitlines()[-8:]
        print(f"[{method}/{dataset}] FAILED (exit {proc.returncode}):\n  " + "\n  ".join(tail), file=sys.stderr)
        return {"method": method, "dataset": dataset, "error": "\n".join(tail)}
    res = json.loads(out.read_text())
    res["process_seconds"] = time.perf_counter() - t
    if qc is not None and qc.is_file():
        res["_qc"] = str(qc)
    return res


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    """Means over the pairs of one (method, dataset)."""
    rows = res["pairs"]

    def mean(key: str) -> float:
        v = [r[key] for r in rows if r[key] == r[key]]
        return float(np.mean(v)) if v else float("nan")

    md = [r["mean_dice"] for r in rows]
    stages: dict[str, float] = {}
    for r in rows:
        for k, v in r["stages"].items():
            stages[k] = stages.get(k, 0.0) + v / len(rows)
    structures = rows[0]["dice"].keys() if rows else []
    readback = [r["ants_readback"] for r in rows if "ants_readback" in r]
    # the worst pair of each read-back figure (agreements: lowest; image difference: largest)
    worst = {k: (max if k.endswith("diff_rel") else min)(rb[k] for rb in readback) for k in readback[0]} if readback else None
    steps = [r["adam_steps"] for r in rows if r.get("adam_steps") is not None]
    return {
        "ants_readback_worst": worst,
        "adam_steps_mean": float(np.mean(steps)) if steps else None,
        "mean_dice": float(np.mean(md)) if md else float("nan"),
        "sd_dice": float(statistics.stdev(md)) if len(md) > 1 else 0.0,
        "mean_hd95": mean("mean_hd95"),
        "folding_percent": mean("folding_percent"),
        "seconds_per_pair": mean("seconds"),
        "stages": stages,
        "peak_rss_mb": res["peak_rss_mb"],
        "dice_per_structure": {s: float(np.nanmean([r["dice"][s] for r in rows])) if any(r["dice"][s] == r["dice"][s] for r in rows)
                               else float("nan") for s in structures},
    }


def _stage_text(stages: dict[str, float]) -> str:
    return " · ".join(f"{k} {v:.1f}" for k, v in stages.items() if k != "load_model" or v >= 0.05) or "–"


def markdown(payload: dict[str, Any]) -> str:
    lines = [f"Measured {payload['date']}, commit `{payload['commit']}`, {common.machine_line(payload['machine'])}; "
             f"{payload['threads']} thread(s) for torch and ITK; device {payload['device']}"
             + ("; **quick mode** (few iterations, not comparable)" if payload["quick"] else "") + "."]
    if payload.get("weights"):
        lines.append(f"Network weights: `{payload['weights']}`.")
    for m, why in payload["skipped"].items():
        lines.append(f"Skipped `{m}`: {why}.")
    for ds, by_method in payload["results"].items():
        lines += ["", f"### {DATASET_TITLES[ds]}", ""]
        pairs = next((r["pairs"] for r in by_method.values() if "pairs" in r), [])
        lines.append("Pairs: " + ", ".join(p["pair"] for p in pairs) + ".")
        lines.append("")
        rows = []
        for m, r in by_method.items():
            if "error" in r:
                rows.append([m, "failed", None, None, None, None, None])
                continue
            s = r["summary"]
            rows.append([m, f"{s['mean_dice']:.3f} ± {s['sd_dice']:.3f}", s["mean_hd95"], s["folding_percent"],
                         s["seconds_per_pair"], _stage_text(s["stages"]), f"{s['peak_rss_mb']:.0f}"])
        lines.append(common.md_table(["method", "Dice mean ± sd", "HD95 mm", "folding %", "s/pair", "stages (s)",
                                      "peak RSS MB"], rows, fmt="{:.2f}"))
        ok = {m: r for m, r in by_method.items() if "summary" in r}
        for m, r in ok.items():
            w = r["summary"].get("ants_readback_worst")
            if w:
                lines += ["", f"`{m}` outputs read back by antspyx (worst pair): `warp.nii.gz` moves the labels as "
                          f"synthvox did on {100 * w['warp_labels_agree']:.2f}% of labelled voxels, "
                          f"`deformable_warp.nii.gz` + `affine.txt` on {100 * w['affine_deformable_labels_agree']:.2f}%, "
                          f"the moved image (a voxel or more inside MOVING) differs by at most {100 * w['warp_image_max_diff_rel']:.2g}% of its range; "
                          f"FIXED's labels through `inverse_warp.nii.gz` agree with MOVING's on "
                          f"{100 * w['inverse_labels_agree_moving']:.1f}% (forward: {100 * w['forward_labels_agree_fixed']:.1f}%)."]
        if ds == "nichart" and ok:
            structs = list(next(iter(ok.values()))["summary"]["dice_per_structure"])
            lines += ["", "Dice per structure (mean over pairs):", ""]
            lines.append(common.md_table(["structure", *ok], [[s, *(r["summary"]["dice_per_structure"][s] for r in ok.values())]
                                                             for s in structs]))
    lines += ["", "Seconds per pair: registration call and label transform, one process per method and dataset "
              "(file loading and scoring excluded). Peak RSS: the whole child process (imports included). Folding: "
              "% of fixed-grid voxels with Jacobian determinant <= 0 of the composed map. HD95: mm, mean over the "
              "structures present in both maps. ANTs: antspyx "
              f"`ants.registration(type_of_transform='SyN')` defaults ({ANTS_PRESET_NOTE})."]
    return "\n".join(lines)


def plot_dice(payload: dict[str, Any], path: Path) -> None:
    """Box plot of per-pair mean Dice per method (nichart), with the spine and CT/MR pairs as points."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    dsets = [d for d in payload["results"] if any("pairs" in r for r in payload["results"][d].values())]
    fig = Figure(figsize=(4.5 * len(dsets) + 1, 4), dpi=110)
    for k, ds in enumerate(dsets):
        ax = fig.add_subplot(1, len(dsets), k + 1)
        ok = {m: r for m, r in payload["results"][ds].items() if "pairs" in r}
        vals = [[p["mean_dice"] for p in r["pairs"]] for r in ok.values()]
        if ds == "nichart":
            ax.boxplot(vals, showmeans=True)
        for i, v in enumerate(vals, start=1):
            ax.plot(np.full(len(v), i) + np.linspace(-0.08, 0.08, len(v)), v, "o", ms=4, alpha=0.7)
        ax.set_xticks(range(1, len(ok) + 1))
        ax.set_xticklabels(list(ok), rotation=30)
        ax.set_ylim(0, 1)
        ax.set_title({"nichart": "nichart T1->FLAIR", "spine": "spine (cord)", "ctmr": "MR->CT (7 organs)"}[ds], fontsize=10)
        ax.set_ylabel("mean Dice per pair" if k == 0 else "")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"registration, {payload['date']} ({payload['commit']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def plot_qc(payload: dict[str, Any], qc: dict[str, str], path: Path) -> None:
    """One nichart pair: the fixed FLAIR with each method's moved labels outlined (axial, coronal) and its moved T1."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import torch
    from matplotlib.figure import Figure

    from synthvox import io
    from synthvox.registration.qc import label_edges_rgba
    from synthvox.volume import Volume, to_canonical

    pair = dataset_pairs("nichart", payload["pairs"], payload["pair_list"])[0]
    fixed = io.load(pair["fixed"])
    ref = group_index(io.load_labels(pair["fixed_labels"]).data[0].numpy(), pair["groups"])

    def canon(a: np.ndarray) -> np.ndarray:
        return to_canonical(Volume(torch.from_numpy(np.ascontiguousarray(a))[None], fixed.affine)).data[0].numpy()

    def unit(x: np.ndarray) -> np.ndarray:
        lo, hi = np.percentile(x, [1, 99.5])
        return np.clip((x - lo) / (hi - lo if hi > lo else 1.0), 0, 1)

    fimg = unit(canon(fixed.data[0].numpy()))
    cols = [("reference", fimg, canon(ref))]
    summ = payload["results"]["nichart"]
    for m, f in qc.items():
        z = np.load(f)
        d = summ[m]["pairs"][0]["mean_dice"]
        cols.append((f"{m} ({d:.2f})", unit(canon(z["moved"])), canon(z["moved_labels"])))
    sp = to_canonical(Volume(torch.zeros(1, *fixed.shape), fixed.affine)).spacing
    cx, cy, cz = (s // 2 for s in fimg.shape)
    fig = Figure(figsize=(2.2 * len(cols), 6.6), dpi=100)
    for c, (name, img, lab) in enumerate(cols):
        panels = [(fimg[:, :, cz].T, lab[:, :, cz].T, sp[1] / sp[0]), (fimg[:, cy].T, lab[:, cy].T, sp[2] / sp[0]),
                  (img[:, :, cz].T, lab[:, :, cz].T if c == 0 else None, sp[1] / sp[0])]
        for r, (im, lb, asp) in enumerate(panels):
            ax = fig.add_subplot(3, len(cols), r * len(cols) + c + 1)
            ax.imshow(im, cmap="gray", origin="lower", aspect=asp, vmin=0, vmax=1, interpolation="nearest")
            if lb is not None:
                ax.imshow(label_edges_rgba(lb), origin="lower", aspect=asp, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
    for r, t in enumerate(("FLAIR + labels, axial", "FLAIR + labels, coronal", "moved T1, axial")):
        fig.axes[r].set_ylabel(t, fontsize=8)  # column 0's axes were added first
    fig.suptitle(f"{pair['name']}: fixed FLAIR with moved labels outlined (Dice in brackets)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=6, help="number of nichart pairs (default 6; --quick: 1)")
    ap.add_argument("--pair", action="append", default=None, metavar="A:B",
                    help="explicit nichart pair MOVING:FIXED, e.g. Subj5:Subj8 (repeatable; overrides --pairs)")
    ap.add_argument("--consecutive", action="store_true",
                    help="the 11 consecutive nichart pairs of issue 11 (Subj i -> Subj i+1, the last onto the first)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma list of {', '.join(METHODS)}; synthvox's also as METHOD@MM (working spacing), e.g. mind@2.5")
    ap.add_argument("--datasets", default=None, help=f"comma list of {', '.join(DATASETS)} (default all; --quick: nichart)")
    ap.add_argument("--weights", default=None, help="model directory for net/both (default: the shipped weights)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a RegistrationConfig setting for every synthvox method, e.g. net_spacing=2 (repeatable)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (synthvox methods; ANTs always runs on the CPU)")
    ap.add_argument("--threads", type=int, default=1, help="torch and ITK threads per process (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results)")
    ap.add_argument("--quick", action="store_true", help="one nichart pair and few iterations (the test suite)")
    ap.add_argument("--no-readback", action="store_true",
                    help="skip reading synthvox's saved transforms back with antspyx (done by default when installed)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dataset", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--qc-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    if args.consecutive:
        subj = common.SUBJECTS
        args.pair = [f"{subj[i]}:{subj[(i + 1) % len(subj)]}" for i in range(len(subj))]
        args.pairs = len(args.pair)
    if args.quick and args.pair is None and "--pairs" not in (argv if argv is not None else sys.argv):
        args.pairs = 1
    methods = [m for m in args.methods.split(",") if m]
    datasets = [d for d in (args.datasets or ("nichart" if args.quick else ",".join(DATASETS))).split(",") if d]
    for m in methods:
        try:
            base = split_method(m)[0]
        except ValueError as e:
            ap.error(str(e))
        if base not in METHODS:
            ap.error(f"unknown method {m!r}: use {', '.join(METHODS)} (synthvox's also as METHOD@MM, e.g. mind@2.5)")
    for d in datasets:
        if d not in DATASETS:
            ap.error(f"unknown dataset {d!r}: use {', '.join(DATASETS)}")
    if args.set:
        from synthvox.config import apply_overrides
        from synthvox.errors import InputError
        from synthvox.registration import RegistrationConfig

        try:
            apply_overrides(RegistrationConfig(), args.set, "--set")
        except InputError as e:
            ap.error(str(e))
    if not common.require_shared_data():  # after the options: a mistake is named even without the data
        return 2
    args.weights = resolve_weights(args.weights)
    skipped = {m: r for m in methods if (r := skip_reason(m, args.weights))}
    for m, why in skipped.items():
        print(f"skipping {m}: {why}", flush=True)
    run = [m for m in methods if m not in skipped]
    out_dir = args.out if args.out is not None else common.RESULTS
    payload: dict[str, Any] = {**common.header(NAME, args.device), "threads": args.threads, "device": args.device,
                               "quick": bool(args.quick), "pairs": args.pairs, "pair_list": args.pair,
                               "weights": args.weights if any(split_method(m)[0] in ("net", "both") for m in run) else None,
                               "methods": run, "skipped": skipped, "datasets": datasets,
                               "synthvox_config": {**(QUICK_CONFIG if args.quick else {}), "set": args.set}
                               if (args.quick or args.set) else "RegistrationConfig() defaults",
                               "ants": None, "results": {}}
    payload["machine"]["torch_threads"] = args.threads
    if "ants" in run:
        import ants

        payload["ants"] = {"antspyx": ants.__version__, **ANTS_PARAMS, **(ANTS_QUICK if args.quick else {}),
                           "preset": ANTS_PRESET_NOTE, "itk_threads": args.threads}
    errors = 0
    qc: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="regbench_") as td:
        for ds in datasets:
            payload["results"][ds] = {}
            for m in run:
                res = run_worker(m, ds, args, Path(td))
                if "error" in res:
                    errors += 1
                else:
                    if "_qc" in res:
                        qc[m] = res.pop("_qc")
                    res["summary"] = summarise(res)
                payload["results"][ds][m] = res
        js, md = common.write_results(NAME, payload, markdown(payload), out_dir)
        plots = []
        if any("pairs" in r for d in payload["results"].values() for r in d.values()):
            plot_dice(payload, out_dir / f"{NAME}_dice.png")
            plots.append(out_dir / f"{NAME}_dice.png")
        if qc:
            plot_qc(payload, qc, out_dir / f"{NAME}_qc.png")
            plots.append(out_dir / f"{NAME}_qc.png")
    print("\n" + markdown(payload))
    print(f"\nwrote {js}, {md}" + "".join(f", {p}" for p in plots))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
