"""The whole command as a user waits for it: ``synthvox register`` against an antspyx SyN script, from
process start to exit, on the same nichart pairs in one run (issue 24).

For each nichart pair (T1 of subject A with its DLMUSE labels onto the FLAIR of subject B, the pairs of
``benchmarks/registration.py``), in turn (the order alternates from pair to pair, so a change in the
machine's load falls on both):

- ``synthvox``: ``python -m synthvox register FIXED MOVING --out DIR --moving-labels L --fixed-labels L
  --device cpu --quiet`` (the default features and settings), every output written (moved image, the
  three fields, affine.txt, moved labels, qc.png, report.json);
- ``ants``: a Python script that imports antspyx, reads the images, runs ``ants.registration`` with
  the SyN preset of ``benchmarks/registration.py`` (``ANTS_PARAMS``), moves the labels
  (``genericLabel``) and writes the moved image and labels (its transforms are written by
  ``ants.registration`` itself);
- ``batch`` (unless ``--no-batch``): all the pairs through one ``synthvox register --pairs`` process,
  its wall time divided by the number of pairs.

Wall seconds run from just before the process starts to its exit. Beside them, the in-process times:
synthvox's ``report.json`` stages (registration only), and the ANTs script's ``ants.registration`` call.
Dice is scored the same way for both from the written moved label maps, on the 14 coarse structures of
``dlmuse_groups.json``. Both processes get ``--threads`` threads (torch / ITK / OpenMP).

    python -m benchmarks.whole_command --pairs 6 --threads 1
"""

from __future__ import annotations

import argparse
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
from benchmarks import registration as reg_bench

NAME = "whole_command"

ANTS_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
import ants
fixed, moving, labels, out, params = sys.argv[1:6]
fx, mv, ml = ants.image_read(fixed), ants.image_read(moving), ants.image_read(labels)
t = time.perf_counter()
reg = ants.registration(fx, mv, outprefix=out + "/", **json.loads(params))
t_reg = time.perf_counter() - t
lab = ants.apply_transforms(fx, ml, reg["fwdtransforms"], interpolator="genericLabel")
ants.image_write(reg["warpedmovout"], out + "/moved.nii.gz")
ants.image_write(lab, out + "/moved_labels.nii.gz")
print(json.dumps({"registration": t_reg, "in_process": time.perf_counter() - t0}))
"""


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        env[var] = str(threads)
    env["PYTHONPATH"] = str(common.REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return wall, proc.stdout


def _dice(moved_labels: Path, fixed_labels: Path, groups: dict[str, list[int]]) -> tuple[float, dict[str, float]]:
    from synthvox import io
    from synthvox.metrics import dice_per_label

    moved = io.load_labels(moved_labels).data[0]
    fixed = io.load_labels(fixed_labels).data[0]
    if moved.shape != fixed.shape:
        raise RuntimeError(f"moved labels {tuple(moved.shape)} are not on the fixed grid {tuple(fixed.shape)}")
    dice = dice_per_label(moved, fixed, groups)
    vals = [v for v in dice.values() if v == v]
    return float(np.mean(vals)), dice


def run(args: argparse.Namespace) -> dict[str, Any]:
    pairs = reg_bench.dataset_pairs("nichart", args.pairs)
    env = _env(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="whole_command.") as tmp:
        root = Path(tmp)
        for i, p in enumerate(pairs):
            row: dict[str, Any] = {"pair": p["name"]}
            sv_out, ants_out = root / f"sv{i}", root / f"ants{i}"
            ants_out.mkdir()
            sv_cmd = [sys.executable, "-m", "synthvox", "register", str(p["fixed"]), str(p["moving"]), "--out", str(sv_out),
                      "--moving-labels", str(p["moving_labels"]), "--fixed-labels", str(p["fixed_labels"]),
                      "--device", "cpu", "--quiet"]
            ants_cmd = [sys.executable, "-c", ANTS_SCRIPT, str(p["fixed"]), str(p["moving"]), str(p["moving_labels"]),
                        str(ants_out), json.dumps(reg_bench.ANTS_PARAMS)]
            order = ["synthvox", "ants"] if i % 2 == 0 else ["ants", "synthvox"]
            for method in order:
                if method == "synthvox":
                    wall, _ = _timed(sv_cmd, env)
                    rep = json.loads((sv_out / "report.json").read_text())
                    mean, dice = _dice(sv_out / "moved_labels.nii.gz", Path(p["fixed_labels"]), p["groups"])
                    row["synthvox"] = {"wall": wall, "registration": rep["seconds"]["total"], "stages": rep["seconds"],
                                       "mean_dice": mean, "dice": dice, "folding_percent": rep["folding_percent"]}
                else:
                    wall, stdout = _timed(ants_cmd, env)
                    inner = json.loads(stdout.strip().splitlines()[-1])
                    mean, dice = _dice(ants_out / "moved_labels.nii.gz", Path(p["fixed_labels"]), p["groups"])
                    row["ants"] = {"wall": wall, "registration": inner["registration"], "in_process": inner["in_process"],
                                   "mean_dice": mean, "dice": dice}
            row["ratio"] = row["synthvox"]["wall"] / row["ants"]["wall"]
            print(f"{p['name']}: synthvox {row['synthvox']['wall']:.1f} s (Dice {row['synthvox']['mean_dice']:.3f}), "
                  f"ANTs {row['ants']['wall']:.1f} s (Dice {row['ants']['mean_dice']:.3f}), ratio {row['ratio']:.2f}",
                  file=sys.stderr)
            rows.append(row)
        batch = None
        if args.batch:
            csv_path = root / "pairs.csv"
            lines = ["fixed,moving,moving_labels,fixed_labels,name"]
            lines += [f"{p['fixed']},{p['moving']},{p['moving_labels']},{p['fixed_labels']},pair{i}" for i, p in enumerate(pairs)]
            csv_path.write_text("\n".join(lines) + "\n")
            wall, _ = _timed([sys.executable, "-m", "synthvox", "register", "--pairs", str(csv_path), "--out",
                              str(root / "batch"), "--device", "cpu", "--quiet"], env)
            batch = {"wall": wall, "per_pair": wall / len(pairs), "pairs": len(pairs)}
            print(f"batch of {len(pairs)}: {wall:.1f} s, {wall / len(pairs):.1f} s per pair", file=sys.stderr)
    ratios = [r["ratio"] for r in rows]
    summary = {
        "synthvox_wall_median": statistics.median(r["synthvox"]["wall"] for r in rows),
        "ants_wall_median": statistics.median(r["ants"]["wall"] for r in rows),
        "ratio_median": statistics.median(ratios), "ratio_max": max(ratios),
        "synthvox_mean_dice": float(np.mean([r["synthvox"]["mean_dice"] for r in rows])),
        "ants_mean_dice": float(np.mean([r["ants"]["mean_dice"] for r in rows])),
        "synthvox_registration_median": statistics.median(r["synthvox"]["registration"] for r in rows),
        "ants_registration_median": statistics.median(r["ants"]["registration"] for r in rows),
    }
    if batch:
        summary["batch_per_pair"] = batch["per_pair"]
        summary["batch_ratio"] = batch["per_pair"] / summary["ants_wall_median"]
    return {**common.header(NAME), "threads": args.threads, "ants_params": reg_bench.ANTS_PARAMS, "pairs": rows,
            "batch": batch, "summary": summary}


def markdown(payload: dict[str, Any]) -> str:
    s = payload["summary"]
    rows = [[r["pair"], r["synthvox"]["wall"], r["synthvox"]["registration"], r["ants"]["wall"], r["ants"]["registration"],
             r["ratio"], r["synthvox"]["mean_dice"], r["ants"]["mean_dice"]] for r in payload["pairs"]]
    table = common.md_table(["pair", "synthvox wall s", "synthvox registration s", "ANTs wall s", "ANTs registration s",
                             "wall ratio", "synthvox Dice", "ANTs Dice"], rows, fmt="{:.2f}")
    lines = [f"# The whole command: synthvox register vs antspyx SyN ({payload['date']}, {payload['commit']})", "",
             common.machine_line(payload["machine"]) + f"; {payload['threads']} thread(s) per process", "", table, "",
             f"Median wall per pair: synthvox {s['synthvox_wall_median']:.1f} s, ANTs {s['ants_wall_median']:.1f} s; "
             f"ratio median {s['ratio_median']:.2f} (max {s['ratio_max']:.2f}). Mean Dice (14 coarse structures): "
             f"synthvox {s['synthvox_mean_dice']:.3f}, ANTs {s['ants_mean_dice']:.3f}."]
    if payload.get("batch"):
        b = payload["batch"]
        lines.append(f"One `register --pairs` process for the {b['pairs']} pairs: {b['wall']:.1f} s, "
                     f"{b['per_pair']:.1f} s per pair ({s['batch_ratio']:.2f}x ANTs' median wall per pair).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=6, help="number of nichart pairs (Subj i -> Subj i+3)")
    ap.add_argument("--threads", type=int, default=1, help="threads per process, both tools (default 1)")
    ap.add_argument("--no-batch", dest="batch", action="store_false", help="skip the one-process batch run")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    if not common.require_shared_data():
        return 0
    payload = run(args)
    js, md = common.write_results(NAME, payload, markdown(payload), args.out)
    print(markdown(payload))
    print(f"wrote {js} and {md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
