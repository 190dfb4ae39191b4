"""Does ``segment``'s quality table find the broken scans of a study? (issue 26, item 3)

A folder of held-out nichart_dev T1s (never used to train the model or as atlases) plus deliberately
broken copies of the first one, segmented by the whole command ``synthvox segment -i DIR -o OUT``
(with ``--model`` a finetuned model directory, the quality figure is ``1 - mean entropy``; with
``--atlas-image/--atlas-label`` the atlases' agreement). The broken copies:

- ``turned``: the voxel array turned by 90 degrees (axes 1 and 2), its header kept, so the anatomy
  lies on its back in the world (a header gone wrong);
- ``cropped``: only the upper 45 % of the head along the array's last axis, as a scan whose field of
  view missed most of the brain.

Each label map is scored against the coarse DLMUSE structures carried the same way (the quality
figure does not see them). Success: every broken copy that failed (its Dice below every intact
scan's; registration may turn a turned head back and segment it well) ranks below every intact scan
in ``quality.csv``, and the figure orders the scans as their Dice does.

    python -m benchmarks.segment_quality --model MODEL [--subjects Subj8,Subj9,Subj10,Subj11]
    python -m benchmarks.segment_quality --atlases Subj1,Subj2,Subj3
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
import torch

from benchmarks import common
from benchmarks.fewshot import coarse_labels

NAME = "segment_quality"
#: The broken copies of the first subject, by name.
BROKEN = ("turned", "cropped")


def broken_copy(image: Any, labels: Any, kind: str) -> tuple[Any, Any]:
    """``kind`` of :data:`BROKEN` applied alike to an image and its label map (``Volume`` each)."""
    from synthvox.volume import Volume

    if kind == "turned":
        def turn(v: Volume) -> Volume:
            return Volume(torch.from_numpy(np.ascontiguousarray(np.rot90(v.data.numpy(), 1, axes=(2, 3)))), v.affine)
        return turn(image), turn(labels)
    if kind == "cropped":
        n = image.shape[-1]
        k = int(round(0.55 * n))
        a = image.affine.copy()
        a[:3, 3] = a[:3, :3] @ np.array([0.0, 0.0, float(k)]) + a[:3, 3]
        return Volume(image.data[..., k:].contiguous(), a), Volume(labels.data[..., k:].contiguous(), a)
    raise ValueError(f"unknown broken copy {kind!r}")


def make_study(root: Path, subjects: list[str], groups: dict[str, list[int]]) -> dict[str, Path]:
    """The images (``root/images``) and their reference label maps (``root/labels``), by image name."""
    from synthvox import io
    from synthvox.volume import Volume

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    refs: dict[str, Path] = {}
    for i, s in enumerate(subjects):
        p = common.nichart_paths(s)
        image, lab = io.load(p["t1"]), io.load_labels(p["dlmuse"])
        lab = Volume(coarse_labels(lab.data, groups), lab.affine)
        copies = [(s, image, lab)] + ([(f"{s}_{k}", *broken_copy(image, lab, k)) for k in BROKEN] if i == 0 else [])
        for name, im, lb in copies:
            io.save(im, root / "images" / f"{name}.nii.gz")
            io.save(lb, root / "labels" / f"{name}.nii.gz", labels=True)
            refs[name] = root / "labels" / f"{name}.nii.gz"
    return refs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="A finetuned model directory (synthvox finetune).")
    ap.add_argument("--atlases", default="", help="Training subjects used as atlases instead of --model, e.g. Subj1,Subj2,Subj3.")
    ap.add_argument("--subjects", default="Subj8,Subj9,Subj10,Subj11", help="Held-out subjects; the first one is also broken.")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="Results folder (default benchmarks/results).")
    args = ap.parse_args(argv)
    if (args.model is None) == (not args.atlases):
        ap.error("give --model or --atlases (one of them)")
    from synthvox import io
    from synthvox.metrics import dice_per_label
    from synthvox.volume import Volume

    common.require_shared_data()
    groups = common.dlmuse_groups()
    subjects = [s for s in args.subjects.split(",") if s]
    atlases = [s for s in args.atlases.split(",") if s]
    if set(atlases) & set(subjects):
        ap.error("the atlases must not be among the held-out --subjects")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        refs = make_study(root, subjects, groups)
        cmd = [sys.executable, "-m", "synthvox", "segment", "-i", str(root / "images"), "-o", str(root / "out")]
        if args.model is not None:
            cmd += ["--model", str(args.model)]
        for a in atlases:
            p = common.nichart_paths(a)
            lab = io.load_labels(p["dlmuse"])
            io.save(Volume(coarse_labels(lab.data, groups), lab.affine), root / f"atlas_{a}.nii.gz", labels=True)
            cmd += ["--atlas-image", str(p["t1"]), "--atlas-label", str(root / f"atlas_{a}.nii.gz")]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        with open(root / "out" / "quality.csv", encoding="utf-8", newline="") as f:
            table = list(csv.DictReader(f))
        rows = []
        for rank, r in enumerate(table, start=1):
            name = r["image"].split(".nii")[0]
            pred = io.load_labels(root / "out" / r["labels"])
            ref = io.load_labels(refs[name])
            d = dice_per_label(pred.data, ref.data, list(range(1, len(groups) + 1)))
            rows.append({"rank": rank, "image": name, "quality": float(r["quality"]), "measure": r["measure"],
                         "dice": float(np.nanmean(list(d.values()))), "broken": name.rsplit("_", 1)[-1] in BROKEN})
    intact = [r for r in rows if not r["broken"]]
    # a broken copy the method still segmented as well as an intact scan (registration turns a turned
    # head back) is no failure to find: what must rank last are the copies whose Dice is below every
    # intact scan's
    failed = [r for r in rows if r["broken"] and r["dice"] < min(i["dice"] for i in intact)]
    found = bool(failed and intact and max(r["quality"] for r in failed) < min(i["quality"] for i in intact))
    q, dice = np.array([r["quality"] for r in rows]), np.array([r["dice"] for r in rows])
    spearman = float(np.corrcoef(np.argsort(np.argsort(q)), np.argsort(np.argsort(dice)))[0, 1]) if len(rows) > 2 else float("nan")
    payload = {**common.header(NAME), "settings": {k: str(v) for k, v in vars(args).items()}, "command_s": wall,
               "load_avg_start": load0, "rows": rows, "failed": [r["image"] for r in failed], "failed_ranked_last": found, "spearman_quality_dice": spearman}
    md = [f"# {NAME}", "", f"{payload['date']}, commit `{payload['commit']}`, {common.machine_line(payload['machine'])}",
          f"{'model ' + str(args.model) if args.model else 'atlases ' + args.atlases}; whole command {wall:.0f} s, "
          f"{args.threads} thread(s), load average {load0:.1f} at the start", "",
          common.md_table(["rank (quality.csv)", "image", "quality", "mean Dice", "broken"],
                          [[r["rank"], r["image"], r["quality"], r["dice"], "yes" if r["broken"] else ""] for r in rows]),
          "", f"Failed copies ({', '.join(r['image'] for r in failed) or 'none'}: broken, and Dice below every intact scan's) "
              f"ranked below every intact scan: **{'yes' if found else 'no'}**; "
              f"Spearman correlation of quality and Dice: {spearman:.2f}."]
    tag = "model" if args.model is not None else "atlas"
    js, mdp = common.write_results(f"{NAME}_{tag}", payload, "\n".join(md), args.out)
    print("\n".join(md))
    print(f"wrote {js} and {mdp}")
    return 0 if found else 1


if __name__ == "__main__":
    raise SystemExit(main())
