"""Registration accuracy and speed on nichart_dev T1 -> FLAIR inter-subject pairs.

For each pair (T1 of subject A moving, with its DLMUSE labels; FLAIR of subject B fixed, scored against
B's ``flair_dlmuse``), prints the mean Dice over the 14 coarse structures of ``dlmuse_groups.json`` and
seconds per pair for: the headers alone, the affines (init + affine stage), and each deformable method
asked for. ANTs SyN plugs in through ``METHODS`` (another issue adds it).

    python benchmarks/bench_registration.py --pairs 4 --methods affine,mind [--weights MODEL] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from synthvox import io
from synthvox.metrics import dice_per_label
from synthvox.registration import register
from synthvox.volume import Volume, resample_like


def shared_dir() -> Path:
    env = os.environ.get("SYNTHVOX_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[1] / ".." / "shared"


def pairs(n: int) -> list[tuple[str, str]]:
    """Deterministic inter-subject pairs (moving A, fixed B), A != B, covering the header-offset subjects."""
    subj = [f"Subj{i}" for i in range(1, 12)]
    out = [(subj[i], subj[(i + 3) % 11]) for i in range(11)]
    return out[:n]


def load_pair(root: Path, a: str, b: str) -> dict[str, Volume]:
    d = root / "data" / "eval" / "nichart_dev"
    return {
        "moving": io.load(d / "t1" / f"{a}_T1.nii.gz"),
        "moving_labels": io.load_labels(d / "dlmuse" / f"{a}_T1_DLMUSE.nii.gz"),
        "fixed": io.load(d / "flair" / f"{b}_FL.nii.gz"),
        "fixed_labels": io.load_labels(d / "flair_dlmuse" / f"{b}_FL_DLMUSE.nii.gz"),
    }


def method_headers(p: dict[str, Volume], **_: object) -> Volume:
    return resample_like(p["moving_labels"], p["fixed"], mode="nearest")


def make_synthvox(features: str, deformable: bool, weights: str | None, device: str) -> Callable[..., Volume]:
    def run(p: dict[str, Volume], **_: object) -> Volume:
        res = register(p["fixed"], p["moving"], features=features, weights=weights, device=device,
                       moving_labels=p["moving_labels"], deformable=deformable)
        run.last_report = res.report  # type: ignore[attr-defined]
        assert res.moved_labels is not None
        return res.moved_labels

    return run


#: Hook for other methods (e.g. ANTs SyN): name -> callable(pair) -> moved labels on the fixed grid.
EXTRA_METHODS: dict[str, Callable[..., Volume]] = {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--methods", default="headers,affine,mind", help="comma list: headers, affine, mind, net, both")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    root = shared_dir()
    groups = {k: v for k, v in json.loads((root / "data" / "eval" / "dlmuse_groups.json").read_text()).items()
              if not k.startswith("_")}
    methods: dict[str, Callable[..., Volume]] = {"headers": method_headers,
                                                  "affine": make_synthvox("mind", False, None, args.device)}
    for f in ("mind", "net", "both"):
        methods[f] = make_synthvox(f, True, args.weights, args.device)
    methods.update(EXTRA_METHODS)
    names = [m for m in args.methods.split(",") if m]
    results: dict[str, list[dict[str, object]]] = {m: [] for m in names}
    print(f"torch threads: {torch.get_num_threads()}")
    for a, b in pairs(args.pairs):
        p = load_pair(root, a, b)
        line = [f"{a}->{b}"]
        for m in names:
            t = time.perf_counter()
            lab = methods[m](p)
            sec = time.perf_counter() - t
            d = dice_per_label(lab.data, p["fixed_labels"].data, groups)
            mean = float(np.nanmean(list(d.values())))
            rep = getattr(methods[m], "last_report", {})
            results[m].append({"pair": f"{a}->{b}", "dice": d, "mean_dice": mean, "seconds": sec,
                               "folding_percent": rep.get("folding_percent"), "stages": rep.get("seconds")})
            line.append(f"{m}: {mean:.3f} ({sec:.1f}s)")
        print("  ".join(line), flush=True)
    print("\nmean Dice over pairs (14 structures) and seconds per pair:")
    for m in names:
        dm = np.mean([r["mean_dice"] for r in results[m]])
        sm = np.mean([r["seconds"] for r in results[m]])
        print(f"  {m:8s} dice {dm:.3f}  s/pair {sm:.1f}")
    print("per structure:")
    print("  " + " ".join(f"{m:>8s}" for m in names) + "  structure")
    for g in groups:
        print("  " + " ".join(f"{np.nanmean([r['dice'][g] for r in results[m]]):8.3f}" for m in names) + f"  {g}")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
