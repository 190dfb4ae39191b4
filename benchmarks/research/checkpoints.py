"""The learning curve of a pretraining run, by the feature probe: probe figures against steps and CPU-hours.

Every checkpoint of a run folder (``--run RUN``, each exported to a temporary model directory) and any
model directory given are measured in one probe run (``benchmarks/features.py``: MIND-SSC and raw
intensity are computed once, beside them). CPU-hours come from the run logs (``--log``, repeatable:
the logs of earlier parts of the same run, e.g. ``training/log_cpu64.csv``, then ``RUN/log.csv``):
the summed synthesis and network seconds up to each step, one thread.

The markdown gives the table and a straight-line fit of the probe score against log10(CPU-hours),
extrapolated to the CPU-hours at which it would reach MIND-SSC's score (only a trend, stated as such).

    python -m benchmarks.research.checkpoints --run training/runs/cpu --log training/log_cpu64.csv --log training/runs/cpu/log.csv
    python -m benchmarks.research.checkpoints MODEL_DIR [MODEL_DIR ...] [--reg-pairs 1] [--reg-datasets nichart,spine,ctmr] [--quick]

Each row has the field-of-view term (``fov_pad``: the features' change in the centre of a nichart T1
padded by 16 voxels, :func:`features.fov_term`) beside the probe's figures and the registration rows.

Writes ``checkpoints.json``, ``checkpoints.md`` and ``checkpoints.png`` into ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common, features

NAME = "checkpoints"
METRICS = ("score", "knn", "boundary", "interior", "inter")


def step_of(model_dir: Path) -> int:
    """The training step recorded in a model directory's card (-1 when absent)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    extra = cfg.get("extra", {})
    card = extra.get("model_card", extra)
    return int(card.get("training_steps", card.get("steps", -1)))


def cpu_hours(logs: list[Path]) -> dict[int, float]:
    """Step -> cumulative one-thread CPU-hours (synthesis + network seconds) over the logs, in order."""
    out: dict[int, float] = {}
    total, last = 0.0, -1
    for log in logs:
        with open(log, newline="") as f:
            for row in csv.DictReader(f):
                step = int(row["step"])
                if step <= last:
                    continue
                total += float(row["synth_s"]) + float(row["net_s"])
                out[step] = total / 3600.0
                last = step
    return out


def hours_at(step: int, table: dict[int, float]) -> float | None:
    """CPU-hours at ``step`` (linear between logged steps), None when outside the logs."""
    if not table or step < 0:
        return None
    steps = sorted(table)
    if step <= steps[0]:
        return table[steps[0]] * step / steps[0] if steps[0] > 0 else 0.0
    if step > steps[-1]:
        if len(steps) < 2 or step > 2 * steps[-1] - steps[-2]:  # at most one log interval beyond the last row
            return None
        rate = (table[steps[-1]] - table[steps[-2]]) / (steps[-1] - steps[-2])
        return table[steps[-1]] + rate * (step - steps[-1])
    return float(np.interp(step, steps, [table[s] for s in steps]))


def export_checkpoints(run: Path, dst: Path, every: int = 1) -> list[Path]:
    """Each checkpoint of ``run`` as a model directory under ``dst`` (every ``every``-th, and the newest)."""
    import torch

    from synthvox.models import save_model
    from synthvox.train.batchnorm import EXPORT_BATCHES
    from synthvox.train.checkpointing import (
        checkpoint_card,
        checkpoint_network,
        list_checkpoints,
        load_checkpoint,
    )

    ckpts = list_checkpoints(run / "checkpoints")
    chosen = [c for i, c in enumerate(ckpts) if i % every == 0 or i == len(ckpts) - 1]
    out = []
    for step, path in chosen:
        tensors, state = load_checkpoint(path)
        md = dst / f"step_{step:08d}"
        with torch.no_grad():  # the full card: registration and the probe read the training scale from it
            net = checkpoint_network(tensors, state, EXPORT_BATCHES)  # as scripts/weights.py export makes it
            save_model(net, md, extra={"model_card": checkpoint_card(state, bn_batches=net.bn_batches)})
        out.append(md)
    return out


def trend(rows: list[dict[str, Any]], target: float, key: str = "score") -> dict[str, Any] | None:
    """Least-squares line of ``key`` against log10(hours); where it would reach ``target``."""
    pts = [(math.log10(r["cpu_hours"]), r[key]) for r in rows
           if r.get("cpu_hours") and r["cpu_hours"] > 0 and r.get(key) is not None]
    if len(pts) < 3:
        return None
    x, y = np.array(pts).T
    slope, icpt = np.polyfit(x, y, 1)
    res: dict[str, Any] = {"key": key, "slope_per_decade": float(slope), "intercept": float(icpt), "target": target,
                           "points": len(pts)}
    res["hours_to_target"] = float(10 ** ((target - icpt) / slope)) if slope > 0 else None
    return res


def evaluate(models: list[Path], logs: list[Path], quick: bool, reg_pairs: int, threads: int,
             reg_datasets: tuple[str, ...] = ("nichart",)) -> dict[str, Any]:
    models = sorted(models, key=step_of)
    probe = features.run([str(m) for m in models], ["nichart"] if quick else list(features.DATASETS),
                         ["Subj1", "Subj2"] if quick else ["Subj1", "Subj2", "Subj4"], 150 if quick else 300,
                         300 if quick else 600, reg_pairs, quick, threads, fov=["pad"], fov_subjects=["Subj1"],
                         reg_datasets=reg_datasets)
    hours = cpu_hours(logs)
    labels = list(probe["weights"])
    nich = probe["results"]["nichart"]["mean"]
    rows = []
    for lab, md in zip(labels, models):
        st = step_of(md)
        row = {"model": str(md), "label": lab, "step": st, "cpu_hours": hours_at(st, hours), "score": probe["score"][lab],
               **{k: nich[lab].get(k) for k in METRICS[1:]}}
        for ds in probe["results"]:
            if ds != "nichart":
                row[f"{ds}_knn"] = probe["results"][ds]["mean"][lab]["knn"]
        fov = probe.get("fov", {}).get("mean", {}).get(lab)
        row["fov_pad"] = fov.get("pad") if fov else None
        if probe.get("registration"):
            for kind in ("net", "both"):
                for ds in reg_datasets:
                    suffix = "" if ds == "nichart" else f"@{ds}"
                    r = probe["registration"].get(f"{kind}:{lab}{suffix}")
                    row[f"reg_{kind}{suffix}"] = r["mean_dice"] if r else None
        rows.append(row)
    ref = {name: {"score": probe["score"][name], **nich[name]} for name in ("mind", "intensity")}
    if probe.get("registration") and "mind" in probe["registration"]:
        ref["mind"]["reg"] = probe["registration"]["mind"]["mean_dice"]
        for ds in reg_datasets[1:] if reg_datasets[:1] == ("nichart",) else reg_datasets:
            if f"mind@{ds}" in probe["registration"]:
                ref["mind"][f"reg@{ds}"] = probe["registration"][f"mind@{ds}"]["mean_dice"]
    # What has to reach MIND-SSC is registration: extrapolate `both` registration Dice when measured, else the score.
    key, target = ("reg_both", ref["mind"]["reg"]) if "reg" in ref["mind"] else ("score", ref["mind"]["score"])
    return {**common.header(NAME), "quick": quick, "logs": [str(p) for p in logs], "rows": rows, "reference": ref,
            "trend": trend(rows, target, key), "probe_seconds": probe["seconds"]}


def markdown(p: dict[str, Any]) -> str:
    lines = [f"Learning curve by the feature probe ({p['date']}, commit {p['commit']}; {common.machine_line(p['machine'])}). "
             "hours: one training thread, summed synthesis + network seconds of the run logs (wall time of that "
             "thread; on a busy machine more than its CPU time).", ""]
    extra = [k for k in p["rows"][0] if k.endswith("_knn") or k.startswith("reg_") or k == "fov_pad"] if p["rows"] else []
    cols = ["step", "hours", *METRICS, *extra]
    rows = [[r["step"], None if r["cpu_hours"] is None else f"{r['cpu_hours']:.2f}", *[r.get(m) for m in METRICS],
             *[r.get(k) for k in extra]] for r in p["rows"]]
    for name, ref in p["reference"].items():
        mind_reg = {"reg_net": ref.get("reg"), **{f"reg_net@{k[4:]}": v for k, v in ref.items() if k.startswith("reg@")}}
        rows.append([name, "–", *[ref.get(m) for m in METRICS], *[mind_reg.get(k) if name == "mind" else None for k in extra]])
    lines.append(common.md_table(cols, rows))
    t = p.get("trend")
    if t:
        lines.append("")
        what = {"reg_both": "registration Dice with `both`", "score": "probe score"}.get(t.get("key", "score"), t.get("key"))
        if t["hours_to_target"] is not None:
            lines.append(f"Trend: {what} {t['slope_per_decade']:+.3f} per tenfold hours over {t['points']} checkpoints; "
                         f"the line reaches MIND-SSC's ({t['target']:.3f}) at about {t['hours_to_target']:.3g} "
                         "hours of one thread — an extrapolation of a short, noisy curve, not a promise.")
        else:
            lines.append(f"Trend: {what} {t['slope_per_decade']:+.3f} per tenfold hours over {t['points']} checkpoints: "
                         f"not rising, so no extrapolation reaches MIND-SSC's ({t['target']:.3f}).")
    return "\n".join(lines)


def plot(p: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in p["rows"] if r["step"] >= 0]
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, xkey, xlabel in ((axes[0], "step", "training step"), (axes[1], "cpu_hours", "hours of one training thread")):
        pts = [r for r in rows if r.get(xkey) is not None]
        for m, colour in zip(METRICS, ("k", "tab:blue", "tab:orange", "tab:green", "tab:red")):
            ax.plot([r[xkey] for r in pts], [r[m] for r in pts], "o-", color=colour, label=f"net {m}")
            ax.axhline(p["reference"]["mind"][m], color=colour, ls="--", lw=0.8)
        ax.set_xlabel(xlabel)
        xs = [r[xkey] for r in pts if r[xkey]]
        if xkey == "cpu_hours" and len(xs) > 1 and max(xs) > 10 * min(xs):
            ax.set_xscale("log")
        ax.set_ylabel("probe (dashed: MIND-SSC)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", type=Path, help="model directories")
    ap.add_argument("--run", type=Path, default=None, help="a run folder: probe each of its checkpoints")
    ap.add_argument("--every", type=int, default=1, help="with --run: every k-th checkpoint (and the newest)")
    ap.add_argument("--log", action="append", type=Path, default=[], help="run logs in training order (for CPU-hours)")
    ap.add_argument("--reg-pairs", type=int, default=0, help="nichart registration pairs per model (default 0)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="nichart only, two subjects, fewer voxels")
    ap.add_argument("--reg-datasets", default="nichart", help="registration rows on these datasets, a comma list of "
                    "nichart, spine, ctmr (the mind row shows MIND-SSC's under reg_net)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not common.require_shared_data():
        return 2
    for md in args.models:
        if not (md / "config.json").is_file():
            ap.error(f"not a model directory: {md}")
    for log in args.log:
        if not log.is_file():
            ap.error(f"no such log: {log}")
    with tempfile.TemporaryDirectory(prefix="ckprobe_") as td:
        models = list(args.models)
        if args.run is not None:
            models += export_checkpoints(args.run, Path(td), max(1, args.every))
        if not models:
            ap.error("give model directories or --run")
        payload = evaluate(models, args.log, args.quick, args.reg_pairs, args.threads,
                           tuple(d for d in args.reg_datasets.split(",") if d))
    out = args.out if args.out is not None else common.RESULTS
    text = markdown(payload)
    common.write_results(NAME, payload, text, out)
    plot(payload, Path(out) / f"{NAME}.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
