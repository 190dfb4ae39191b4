"""Does ``results.csv``'s quality flag find a broken registration without labels? (issue 24, item 3)

A batch of nichart dev pairs (T1 of subject A onto the FLAIR of subject B, the pairs of
``registration.py``) plus one deliberately broken pair: the first pair's moving T1 (and its labels)
turned by 90 degrees in its voxel array, its header kept, so the anatomy is turned in the world. The
whole batch runs through ``synthvox register --pairs`` (one process, ``--init`` as given, default
``moments``); the flag of every pair is read back from ``results.csv`` beside its mean Dice over the
DLMUSE labels (which the flag does not see). Success: the broken pair flagged, none of the others.

    python -m benchmarks.quality_flag --pairs 6 [--init none]
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks import registration as reg_bench

NAME = "quality_flag"


def make_batch(root: Path, n_pairs: int) -> tuple[Path, str]:
    """The pairs CSV (``n_pairs`` dev pairs and the turned copy of the first); the broken pair's name."""
    import torch

    from synthvox import io
    from synthvox.volume import Volume

    pairs = reg_bench.dataset_pairs("nichart", n_pairs)
    lines = ["name,fixed,moving,moving_labels,fixed_labels"]
    for p in pairs:
        a, b = p["name"].split("->")
        lines.append(f"{a}_to_{b},{p['fixed']},{p['moving']},{p['moving_labels']},{p['fixed_labels']}")
    p = pairs[0]

    def turned(v: Volume) -> Volume:
        return Volume(torch.from_numpy(np.ascontiguousarray(np.rot90(v.data.numpy(), 1, axes=(1, 2)))), v.affine)

    io.save(turned(io.load(p["moving"])), root / "turned_T1.nii.gz")
    io.save(turned(io.load_labels(p["moving_labels"])), root / "turned_T1_DLMUSE.nii.gz", labels=True)
    a, b = p["name"].split("->")
    broken = f"{a}turned90_to_{b}"
    lines.append(f"{broken},{p['fixed']},{root / 'turned_T1.nii.gz'},{root / 'turned_T1_DLMUSE.nii.gz'},{p['fixed_labels']}")
    path = root / "pairs.csv"
    path.write_text("\n".join(lines) + "\n")
    return path, broken


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="quality_flag.") as tmp:
        root = Path(tmp)
        pairs_csv, broken = make_batch(root, args.pairs)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "synthvox", "register", "--pairs", str(pairs_csv), "--out",
                               str(root / "study"), "--init", args.init, "--device", "cpu", "--quiet"],
                              env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode not in (0, 1):
            raise RuntimeError(proc.stderr[-2000:])
        with open(root / "study" / "results.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    keep = ("name", "status", "quality", "quality_reasons", "cost_ratio", "rotation_deg", "mean_dice",
            "similarity_final", "folding_percent", "seconds")
    table = [{k: r[k] for k in keep} for r in rows]
    flagged = sorted(r["name"] for r in rows if r["quality"] != "ok")
    return {**common.header(NAME), "init": args.init, "threads": args.threads, "broken": broken, "wall": wall,
            "rows": table, "flagged": flagged, "found_only_the_broken": flagged == [broken]}


def markdown(payload: dict[str, Any]) -> str:
    rows = [[r["name"], r["quality"], r["cost_ratio"], r["rotation_deg"], r["mean_dice"], r["quality_reasons"] or "–"]
            for r in payload["rows"]]
    table = common.md_table(["pair", "flag", "cost / median", "turned (deg)", "mean Dice (not seen by the flag)",
                             "reasons"], rows)
    verdict = ("the broken pair, and only it, is flagged" if payload["found_only_the_broken"]
               else f"flagged: {', '.join(payload['flagged']) or 'none'} (broken: {payload['broken']})")
    return "\n".join([f"# Quality flag on the nichart dev batch ({payload['date']}, {payload['commit']})", "",
                      common.machine_line(payload["machine"]) + f"; --init {payload['init']}; "
                      f"{payload['wall']:.0f} s for the batch", "", table, "", f"Result: {verdict}."])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=6, help="good nichart pairs (Subj i -> Subj i+3), plus the broken one")
    ap.add_argument("--init", default="moments", help="--init of the batch (default moments)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    if not common.require_shared_data():
        return 0
    payload = run(args)
    common.write_results(NAME if args.init == "moments" else f"{NAME}_init_{args.init}", payload, markdown(payload), args.out)
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
