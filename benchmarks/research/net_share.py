"""The network's share of the features with ``--features both``, and the spacing it sees: a sweep on
nichart pairs, beside MIND-SSC and the network alone in the same run.

For each nichart pair (T1 of subject A onto the FLAIR of subject B, scored on the 14 coarse DLMUSE
structures as in ``registration.py``), ``synthvox.registration.register`` runs with ``mind``, with
``net`` and with ``both`` at every ``--shares`` value (``RegistrationConfig.net_share``), at every
``--spacings`` value of the network (``RegistrationConfig.net_spacing``; ``card``: what the weights'
card says). A pair's feature sets are computed once per network spacing and reused by every share
(``common.FeatureCache``): the registrations are the
same as separate ``registration.py --set net_share=S`` runs, in a third of the time.

Choose the share on pairs other than those that judge it: the default pairs are Subj i -> Subj i+3
(``registration.py``'s default), while the figures recorded in the model card come from
``registration.py --consecutive`` (Subj i -> Subj i+1).

Writes ``net_share.json`` and ``net_share.md`` into ``--out`` (default benchmarks/results).

    python -m benchmarks.research.net_share --pairs 11 --shares 0.15,0.3,0.5 --spacings card,2
    python -m benchmarks.research.net_share --quick --weights MODEL_DIR --out /tmp/share   # one pair, short solver
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.registration import QUICK_CONFIG, dataset_pairs, load_pair, resolve_weights

NAME = "net_share"


def parse_list(text: str, what: str, allow_card: bool = False) -> list[float | None]:
    """``"0.15,0.3"`` -> ``[0.15, 0.3]`` (``card`` -> None where allowed); SystemExit on a bad value."""
    out: list[float | None] = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if allow_card and item == "card":
            out.append(None)
            continue
        try:
            out.append(float(item))
        except ValueError:
            raise SystemExit(f"error: bad {what} {item!r}") from None
    if not out:
        raise SystemExit(f"error: no {what} given")
    return out


def runs(shares: list[float], spacings: list[float | None]) -> list[tuple[str, float | None, float | None]]:
    """(features, share, network spacing) of every registration of one pair, MIND first."""
    out: list[tuple[str, float | None, float | None]] = [("mind", None, None)]
    for sp in spacings:
        out.append(("net", None, sp))
        out += [("both", sh, sp) for sh in shares]
    return out


def sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    from synthvox.metrics import dice_per_label
    from synthvox.registration import RegistrationConfig, register

    pairs = dataset_pairs("nichart", args.pairs, args.pair)
    base = QUICK_CONFIG if args.quick else {}
    rows: list[dict[str, Any]] = []
    for pair in pairs:
        data = load_pair(pair)
        ref = data["fixed_labels"].data[0].numpy()
        with common.FeatureCache():
            for kind, share, spacing in runs(args.shares, args.spacings):
                cfg = RegistrationConfig(**base, net_spacing=spacing, net_share=share)
                t = time.perf_counter()
                res = register(data["fixed"], data["moving"], features=kind, weights=args.weights,
                               moving_labels=data["moving_labels"], config=cfg)
                dice = dice_per_label(res.moved_labels.data[0].numpy(), ref, pair["groups"])
                row = {"pair": pair["name"], "features": kind, "net_share": res.report["network_share"],
                       "net_spacing_mm": res.report["network_spacing_mm"],
                       "mean_dice": float(np.nanmean(list(dice.values()))), "seconds": time.perf_counter() - t}
                rows.append(row)
                print(f"[{pair['name']}] {kind} share {row['net_share']} at {row['net_spacing_mm']} mm: "
                      f"Dice {row['mean_dice']:.3f}", flush=True)
    return rows


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean Dice per (features, share, spacing), in the order first seen."""
    groups: dict[tuple[Any, ...], list[float]] = defaultdict(list)
    for r in rows:
        groups[(r["features"], r["net_share"], r["net_spacing_mm"])].append(r["mean_dice"])
    return [{"features": k[0], "net_share": k[1], "net_spacing_mm": k[2], "mean_dice": float(np.mean(v)),
             "pairs": len(v), "per_pair": v} for k, v in groups.items()]


def markdown(payload: dict[str, Any]) -> str:
    mind = next((s["mean_dice"] for s in payload["summary"] if s["features"] == "mind"), float("nan"))
    table = common.md_table(
        ["features", "net share", "network at (mm)", "mean Dice", "against mind", "per pair"],
        [[s["features"], s["net_share"], s["net_spacing_mm"], s["mean_dice"], s["mean_dice"] - mind,
          " ".join(f"{v:.3f}" for v in s["per_pair"])] for s in payload["summary"]])
    return (f"Measured {payload['date']}, commit `{payload['commit']}`, {common.machine_line(payload['machine'])}.\n"
            f"Weights: `{payload['weights']}`. Pairs: {', '.join(payload['pair_names'])}.\n"
            f"{'Quick solver settings. ' if payload['quick'] else ''}Mean Dice over the 14 structures.\n\n{table}\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=11, help="nichart pairs Subj i -> Subj i+3 (default 11; --quick: 1)")
    ap.add_argument("--pair", action="append", default=None, metavar="A:B", help="explicit pairs (repeatable)")
    ap.add_argument("--shares", default="0.15,0.3,0.5", help="the network's shares with both (default 0.15,0.3,0.5)")
    ap.add_argument("--spacings", default="card", help="network spacings in mm, or card (default card)")
    ap.add_argument("--weights", default=None, help="model directory (default: the shipped weights)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="one pair, the short solver settings of registration.py")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    args.shares = parse_list(args.shares, "share")
    args.spacings = parse_list(args.spacings, "spacing", allow_card=True)
    if any(not 0 < s < 1 for s in args.shares):
        raise SystemExit("error: a share is between 0 and 1 (exclusive)")
    if any(s is not None and not s > 0 for s in args.spacings):
        raise SystemExit("error: a spacing is a positive number of mm")
    if args.quick and args.pair is None:
        args.pairs = 1
    args.weights = resolve_weights(args.weights)
    if args.weights is None or not Path(args.weights).is_dir():
        raise SystemExit(f"error: no model directory {args.weights or '(no shipped weights)'}: pass --weights MODEL_DIR")
    if not common.require_shared_data():
        return 2
    import torch

    torch.set_num_threads(args.threads)
    rows = sweep(args)
    payload = {**common.header(NAME), "weights": args.weights, "quick": bool(args.quick),
               "pair_names": list(dict.fromkeys(r["pair"] for r in rows)), "rows": rows, "summary": summary(rows)}
    text = markdown(payload)
    js, md = common.write_results(NAME, payload, text, args.out)
    print(f"{text}\nwrote {js}, {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
