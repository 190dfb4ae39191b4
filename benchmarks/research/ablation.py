"""Pretraining recipe ablation at an equal CPU budget, judged by the feature probe (issue 10).

Each variant is today's recipe (the one the shipped weights were trained with) with one config key
changed, trained from scratch on one thread for the same number of steps (``--steps``; the smaller
network gets the steps that cost about the same CPU time), then exported and measured with
``benchmarks/features.py --quick`` (no registration). The last rows combine changes; the best
measured recipe is the ``cpu`` preset. Each variant's result is kept in ``--work`` so that an interrupted ablation resumes.

    OMP_NUM_THREADS=1 nice python -m benchmarks.research.ablation [--steps 150] [--only NAME ...]
    OMP_NUM_THREADS=1 nice python -m benchmarks.research.ablation --steps 120 --reprobe   # the trained variants, probed again

Writes ``ablation.json`` and ``ablation.md`` into ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import common

NAME = "ablation"
#: The recipe of the shipped interim weights (training/carry.safetensors' config), at a short schedule.
TODAY = ["data.size=64", "optim.lr=6e-4", "batch_pairs=1", "tensorboard=false", "ckpt_every=100000", "log_every=10"]
#: name -> (what changes, overrides on top of TODAY).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "today": ("today's recipe: uniform voxels, equal layer weights, 2.25 mm, lr 6e-4, batch 1", []),
    "balanced": ("voxels drawn per label (loss.sampling=balanced)", ["loss.sampling=balanced"]),
    "fullres": ("layer weights towards full resolution (loss.layer_weights)",
                ["loss.layer_weights={enc3: 0.5, bottleneck: 0.5, dec1: 2, out: 3}"]),
    "2mm": ("training scale 2 mm = registration grid (data.synth labels.fov_mm=128)", ["data.synth={labels.fov_mm: 128}"]),
    "head3bn": ("reference projection head: 3 layers with BatchNorm (loss.head=mlp3bn)", ["loss.head=mlp3bn"]),
    "reflect": ("reference padding (model.padding=reflect)", ["model.padding=reflect"]),
    "prenorm": ("reference loss taps: each level's last convolution before normalisation (loss.taps=prenorm)",
                ["loss.taps=prenorm"]),
    "lr2e-4": ("reference learning rate (optim.lr=2e-4)", ["optim.lr=2e-4"]),
    "small": ("half the channels, ~1.5 M parameters (model.variant=small), about the same CPU time", ["model.variant=small"]),
    "batch2": ("two pairs per step (batch_pairs=2), half the steps: about the same CPU time", ["batch_pairs=2"]),
    "balanced+fullres+2mm": ("the three that first looked promising, together",
                             ["loss.sampling=balanced", "loss.layer_weights={enc3: 0.5, bottleneck: 0.5, dec1: 2, out: 3}",
                              "data.synth={labels.fov_mm: 128}"]),
    "fullres+2mm": ("full-resolution layer weights and 2 mm, uniform voxels",
                    ["loss.layer_weights={enc3: 0.5, bottleneck: 0.5, dec1: 2, out: 3}", "data.synth={labels.fov_mm: 128}"]),
    "fullres+reflect": ("full-resolution layer weights and reflect padding",
                        ["loss.layer_weights={enc3: 0.5, bottleneck: 0.5, dec1: 2, out: 3}", "model.padding=reflect"]),
    "fullres+reflect+prenorm": ("the cpu preset's recipe with the reference loss taps",
                                ["loss.layer_weights={enc3: 0.5, bottleneck: 0.5, dec1: 2, out: 3}", "model.padding=reflect",
                                 "loss.taps=prenorm"]),
    "fullres+reflect+labels": ("the cpu preset's recipe with twice the templates per label map (40-80: smaller structures)",
                               ["loss.layer_weights={enc3: 0.5, bottleneck: 0.5, dec1: 2, out: 3}", "model.padding=reflect",
                                "data.synth={labels.n_templates: [40, 80]}"]),
    "small+fullres": ("the small network with the full-resolution layer weights, about the same CPU time",
                      ["model.variant=small", "loss.layer_weights={enc3: 0.5, bottleneck: 0.5, dec1: 2, out: 3}"]),
    "small+fullres+reflect": ("the small network, full-resolution layer weights and reflect padding, about the same CPU time",
                              ["model.variant=small", "loss.layer_weights={enc3: 0.5, bottleneck: 0.5, dec1: 2, out: 3}",
                               "model.padding=reflect"]),
}
#: Steps multiplier that gives a variant the same CPU time as the default network (measured per step).
STEP_FACTOR = {"small": 1.7, "batch2": 0.5, "small+fullres": 1.7, "small+fullres+reflect": 1.7}


def train(name: str, steps: int, work: Path) -> dict[str, Any]:
    run = work / name
    desc, extra = VARIANTS[name]
    n = int(round(steps * STEP_FACTOR.get(name, 1.0)))
    cmd = ["--config", "default", *TODAY, *extra, f"steps={n}", "optim.warmup=20"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t = time.perf_counter()
    before = os.times()
    subprocess.run([sys.executable, "-m", "synthvox", "pretrain", *cmd, "--out", str(run), "--force",
                    "--device", "cpu", "progress=false"], check=True, env=env)
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    with open(run / "log.csv") as f:
        rows = list(csv.DictReader(f))
    return {"name": name, "change": desc, "overrides": extra, "steps": n, "cpu_s": cpu,
            "wall_s": time.perf_counter() - t, "first_loss": float(rows[0]["loss"]), "last_loss": float(rows[-1]["loss"])}


def probe(name: str, work: Path) -> dict[str, Any]:
    from benchmarks import features

    out = work / name / "probe"
    features.main(["--weights", str(work / name / "model"), "--quick", "--reg-pairs", "0", "--out", str(out)])
    p = json.loads((out / "features.json").read_text())
    label = next(k for k in p["score"] if k.startswith("net["))
    res = {ds: r["mean"][label] for ds, r in p["results"].items()}
    ref = {ds: {k: r["mean"][k] for k in ("mind", "intensity")} for ds, r in p["results"].items()}
    return {"score": p["score"][label], "probe": res, "reference": ref, "mind_score": p["score"]["mind"]}


def markdown(rows: list[dict[str, Any]], steps: int) -> str:
    head = ["variant", "change", "steps", "CPU s", "loss first→last", "nichart knn", "boundary", "interior",
            "inter", "spine knn", "ctmr knn", "score"]
    body = []
    for r in rows:
        pr = r["probe"]
        body.append([r["name"], r["change"], r["steps"], f"{r['cpu_s']:.0f}", f"{r['first_loss']:.2f}→{r['last_loss']:.2f}",
                     pr["nichart"]["knn"], pr["nichart"]["boundary"], pr["nichart"]["interior"], pr["nichart"].get("inter"),
                     pr.get("spine", {}).get("knn"), pr.get("ctmr", {}).get("knn"), r["score"]])
    if rows:
        m = rows[0]["reference"]
        body.append(["MIND-SSC", "(no training)", "–", "–", "–", m["nichart"]["mind"]["knn"], m["nichart"]["mind"]["boundary"],
                     m["nichart"]["mind"]["interior"], m["nichart"]["mind"].get("inter"), m.get("spine", {}).get("mind", {}).get("knn"),
                     m.get("ctmr", {}).get("mind", {}).get("knn"), rows[0]["mind_score"]])
    return (f"Recipe ablation: each variant trained from scratch on one CPU thread for {steps} steps at 64³ "
            "(the default network; `small` and `batch2` get the same CPU time), then probed (`features.py --quick`).\n\n"
            + common.md_table(head, body))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--only", nargs="*", default=None, help=f"variants to run (default all: {', '.join(VARIANTS)})")
    ap.add_argument("--work", type=Path, default=Path("/tmp/synthvox_ablation"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--reprobe", action="store_true",
                    help="probe the variants already trained in --work again (after the probe changed), without training")
    args = ap.parse_args(argv)
    names = args.only or list(VARIANTS)
    for n in names:
        if n not in VARIANTS:
            ap.error(f"unknown variant {n!r}: use {', '.join(VARIANTS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in names:
        done = args.work / n / "result.json"
        if done.is_file() and json.loads(done.read_text()).get("steps") == int(round(args.steps * STEP_FACTOR.get(n, 1.0))):
            r = json.loads(done.read_text())
            if args.reprobe:
                r.update(probe(n, args.work))
                done.write_text(json.dumps(r, indent=1))
            rows.append(r)
            continue
        if args.reprobe:
            ap.error(f"--reprobe: variant {n!r} has no trained result of {args.steps} steps in {args.work}")
        r = train(n, args.steps, args.work)
        r.update(probe(n, args.work))
        done.write_text(json.dumps(r, indent=1))
        rows.append(r)
        print(markdown(rows, args.steps), flush=True)
    payload = {**common.header(NAME), "steps": args.steps, "rows": rows}
    js, md = common.write_results(NAME, payload, markdown(rows, args.steps), args.out)
    print(markdown(rows, args.steps))
    print(f"\nwrote {js}, {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
