"""How registration with network features changed as pretraining went on: every exported checkpoint.

For each model directory given (e.g. the half-precision exports of a run's checkpoints,
``python scripts/weights.py export RUN --model DIR``), runs ``benchmarks/registration.py`` with
``--methods net,both`` on the same pairs, and MIND once as the reference, then tabulates mean Dice
per dataset against the training step recorded in each model's card.

    python benchmarks/checkpoints.py MODEL_DIR [MODEL_DIR ...] [--pairs 2] [--datasets nichart,ctmr]

Writes ``checkpoints.json`` and ``checkpoints.md`` into ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import registration  # noqa: E402

NAME = "checkpoints"


def step_of(model_dir: Path) -> int:
    """The training step recorded in a model directory's card (-1 when absent)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    return int(cfg.get("extra", {}).get("model_card", {}).get("training_steps", -1))


def evaluate(model_dirs: list[Path], pairs: int, datasets: str, threads: int, device: str, quick: bool = False) -> dict[str, Any]:
    payload: dict[str, Any] = {**common.header(NAME, device), "pairs": pairs, "datasets": datasets.split(","),
                               "threads": threads, "rows": []}
    base = ["--pairs", str(pairs), "--datasets", datasets, "--threads", str(threads), "--device", device]
    if quick:
        base.append("--quick")
    with tempfile.TemporaryDirectory(prefix="ckbench_") as td:
        ref_out = Path(td) / "mind"
        registration.main([*base, "--methods", "affine,mind", "--out", str(ref_out)])
        ref = json.loads((ref_out / "registration.json").read_text())
        for ds, res in ref["results"].items():
            for m, r in res.items():
                payload["rows"].append({"model": m, "step": None, "dataset": ds, "method": m,
                                        "mean_dice": r["summary"]["mean_dice"]})
        for md in sorted(model_dirs, key=step_of):
            out = Path(td) / md.name
            registration.main([*base, "--methods", "net,both", "--weights", str(md), "--out", str(out)])
            res = json.loads((out / "registration.json").read_text())
            for ds, rr in res["results"].items():
                for m, r in rr.items():
                    payload["rows"].append({"model": str(md), "step": step_of(md), "dataset": ds, "method": m,
                                            "mean_dice": r["summary"]["mean_dice"],
                                            "folding_percent": r["summary"]["folding_percent"]})
    return payload


def markdown(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    datasets = payload["datasets"]
    lines = [f"Measured {payload['date']} on {common.machine_line(m)} (commit {payload['commit']}); "
             f"{payload['pairs']} nichart pair(s); mean Dice per dataset.", ""]
    cols = ["step", "features"] + datasets
    rows = []
    keyed: dict[tuple[Any, str], dict[str, float]] = {}
    for r in payload["rows"]:
        keyed.setdefault((r["step"], r["method"]), {})[r["dataset"]] = r["mean_dice"]
    for (step, method), d in sorted(keyed.items(), key=lambda kv: (-1 if kv[0][0] is None else kv[0][0], kv[0][1])):
        rows.append(["– (no network)" if step is None else step, method] + [d.get(ds) for ds in datasets])
    lines.append(common.md_table(cols, rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--datasets", default="nichart,ctmr")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    for md in args.models:
        if not (md / "config.json").is_file():
            ap.error(f"not a model directory: {md}")
    payload = evaluate(args.models, args.pairs, args.datasets, args.threads, args.device, args.quick)
    text = markdown(payload)
    common.write_results(NAME, payload, text, args.out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
