"""Few-shot segmentation on nichart_dev: train on 1 and on 3 subjects, score Dice on the others.

Labels: the DLMUSE parcellations of ``t1/`` mapped to the 14 coarse structures of ``dlmuse_groups.json``
(left and right merged), ids 1..14 in the file's order. For each training-set size the benchmark
finetunes with ``--init random`` and ``--init default`` at the same budget (the default weights may
not ship yet: then random only, with a note), and prints mean and per-structure Dice side by side,
plus finetuning steps per second and inference seconds per 2 mm volume on this machine.

    python benchmarks/bench_fewshot.py --steps 2000 --device cuda          # the real budget, on a GPU
    python benchmarks/bench_fewshot.py --steps 20 --n-test 3 --device cpu  # a smoke run on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SYNTHVOX_SHARED", REPO / ".." / "shared")).resolve()
DATA = SHARED / "data" / "eval" / "nichart_dev"
GROUPS = SHARED / "data" / "eval" / "dlmuse_groups.json"


def load_groups() -> dict[str, list[int]]:
    return {k: v for k, v in json.loads(GROUPS.read_text()).items() if not k.startswith("_")}


def coarse_labels(lab: torch.Tensor, groups: dict[str, list[int]]) -> torch.Tensor:
    """DLMUSE ids -> 1..14 (in ``groups`` order); everything else 0."""
    lut = torch.zeros(int(lab.max()) + 1, dtype=torch.int64)
    for i, ids in enumerate(groups.values(), start=1):
        for j in ids:
            if j < len(lut):
                lut[j] = i
    return lut[lab]


def subjects() -> list[str]:
    names = sorted(p.name.split("_")[0] for p in (DATA / "t1").glob("*_T1.nii.gz"))
    return sorted(names, key=lambda s: int(s.replace("Subj", "")))


def dice_scores(pred: torch.Tensor, ref: torch.Tensor, n: int) -> np.ndarray:
    out = np.full(n, np.nan)
    for k in range(1, n + 1):
        p, r = pred == k, ref == k
        s = int(p.sum() + r.sum())
        if s:
            out[k - 1] = 2.0 * int((p & r).sum()) / s
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--patch", type=int, default=96)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train", default="all", choices=["all", "decoder", "head"])
    ap.add_argument("--variant", default="default", help="architecture for --init random (match the default weights)")
    ap.add_argument("--n-train", default="1,3", help="training-set sizes, comma-separated")
    ap.add_argument("--n-test", type=int, default=0, help="score only this many test subjects (0: all others)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write results JSON here")
    args = ap.parse_args()

    if not DATA.is_dir():
        sys.exit(f"nichart_dev not found at {DATA} (set SYNTHVOX_SHARED)")
    from synthvox import io
    from synthvox.models import default_weights_path
    from synthvox.segmentation import finetune
    from synthvox.segmentation.infer import segment_with
    from synthvox.segmentation.modeldir import load_model_dir
    from synthvox.volume import Volume

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    groups = load_groups()
    names = list(groups)
    subs = subjects()
    images = {s: io.load(DATA / "t1" / f"{s}_T1.nii.gz") for s in subs}
    labels = {}
    for s in subs:
        lab = io.load_labels(next((DATA / "dlmuse").glob(f"{s}_*.nii.gz")))
        labels[s] = Volume(coarse_labels(lab.data, groups), lab.affine)
    inits = ["random"] + (["default"] if default_weights_path() is not None else [])
    note = "" if "default" in inits else "no default weights ship yet: --init random only"
    print(f"device {device} ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads); budget {args.steps} steps, patch {args.patch}, batch {args.batch}, "
          f"train {args.train}, variant {args.variant}" + (f"; {note}" if note else ""))

    results = []
    for n_train in [int(v) for v in args.n_train.split(",")]:
        train, test = subs[:n_train], subs[n_train:]
        if args.n_test:
            test = test[: args.n_test]
        row = {"n_train": n_train, "train": train, "test": test}
        for init in inits:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                model = finetune(
                    [images[s] for s in train], [labels[s] for s in train], out_dir=Path(tmp) / "m",
                    init=init, variant=args.variant, steps=args.steps, patch_size=args.patch,
                    batch_size=args.batch, lr=args.lr, train=args.train, device=device, seed=args.seed,
                    progress=False, val_every=args.steps,
                )
                t_train = time.perf_counter() - t0
                # pure optimisation speed from the log (excludes data preparation and validation)
                rows = (Path(model) / "log.csv").read_text().splitlines()[1:]
                secs = [float(r.split(",")[-1]) for r in rows]
                steps_per_s = (len(secs) - 2) / (secs[-2] - secs[0]) if len(secs) > 2 else float("nan")
                net, meta = load_model_dir(model, device)
                per, t_inf = [], []
                for s in test:
                    t1 = time.perf_counter()
                    seg = segment_with(net, meta, images[s], device=device)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t_inf.append(time.perf_counter() - t1)
                    per.append(dice_scores(seg.data, labels[s].data, len(names)))
                print(f"  {init}, {n_train} train: {s} Dice {np.nanmean(per[-1]):.3f} ({t_inf[-1]:.1f} s)", flush=True)
            per = np.stack(per)
            row[init] = {
                "mean_dice": float(np.nanmean(per)),
                "per_structure": dict(zip(names, np.nanmean(per, axis=0).round(4).tolist())),
                "steps_per_s": steps_per_s,
                "train_s": t_train,
                "inference_s_per_volume": float(np.mean(t_inf)),
            }
        results.append(row)
        print(f"\n{n_train} training subject(s) {train}, {len(test)} test subjects")
        print(f"{'structure':28s}" + "".join(f"{i:>10s}" for i in inits))
        for k in names:
            print(f"{k:28s}" + "".join(f"{row[i]['per_structure'][k]:10.3f}" for i in inits))
        print(f"{'MEAN':28s}" + "".join(f"{row[i]['mean_dice']:10.3f}" for i in inits))
        print(f"{'finetune steps/s':28s}" + "".join(f"{row[i]['steps_per_s']:10.3f}" for i in inits))
        print(f"{'inference s/volume':28s}" + "".join(f"{row[i]['inference_s_per_volume']:10.2f}" for i in inits))
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "note": note,
                                        "device": str(device), "results": results}, indent=2))


if __name__ == "__main__":
    main()
