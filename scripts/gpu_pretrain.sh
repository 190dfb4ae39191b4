#!/usr/bin/env bash
# One pretraining run on the lent GPU (issue 6), continuing from the repository's carry-over file.
#
#   run tool:  carry=[".whl"], timeout_s=600, command:
#              bash scripts/gpu_pretrain.sh 420
#
# 1. installs the carried wheels (nibabel, monai, ...; scripts/gpu_wheels.sh downloads them into .whl/),
# 2. puts training/carry.safetensors (if present, and unless FROM_SCRATCH=1) into the run folder as its
#    newest checkpoint,
# 3. trains SYNTHVOX_CONFIG (default `gpu`, the ablation's recipe at 128^3 that the carry was trained with;
#    `gpu_local` is the field-of-view-independent recipe of issue 22, with batch normalisation: start it
#    with FROM_SCRATCH=1 unless the carry is of that recipe) for BUDGET seconds (SIGTERM at the end makes
#    pretrain checkpoint and exit),
# 4. writes into $OUT: the new carry-over file (split in < 16 MiB parts), the half-precision model
#    directory, log.csv and a summary with steps/s and samples seen.
#
# Locally, to check the script at a small size on the CPU (the carry's network on 32^3 volumes, about
# two steps a second on 2 threads; the tiny preset does not fit the carry's network):
#   OUT=/tmp/gpu_out SYNTHVOX_DEVICE=cpu SKIP_WHEELS=1 RUN=/tmp/gpu_run bash scripts/gpu_pretrain.sh 60 "data.size=[32,32,32]"
# Then, on this machine:  bash scripts/gpu_collect.sh FILES_AT   (joins the parts, replaces the files)
set -uo pipefail
BUDGET=${1:-420}
shift || true
OVERRIDES=("$@")
CONFIG=${SYNTHVOX_CONFIG:-gpu}
DEVICE=${SYNTHVOX_DEVICE:-cuda}
OUT=${OUT:?OUT must name the folder to bring back}
RUN=${RUN:-/tmp/synthvox_run}
cd "$(dirname "$0")/.."

if [ -z "${SKIP_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:src
else
  export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true

mkdir -p "$RUN" "$OUT"
if [ -z "${FROM_SCRATCH:-}" ] && [ -f training/carry.safetensors ]; then
  python3 scripts/weights.py install training/carry.safetensors "$RUN" || exit 4
fi

# train until the budget is spent; pretrain checkpoints on SIGTERM (and every ckpt_every steps)
start=$(date +%s)
ROWS0=$( [ -f "$RUN/log.csv" ] && tail -n +2 "$RUN/log.csv" | wc -l || echo 0 )
timeout -s TERM "$BUDGET" python3 -m synthvox pretrain --config "$CONFIG" --out "$RUN" --resume \
  --device "$DEVICE" progress=false "${OVERRIDES[@]}" 2>&1 | tail -n 20
rc=${PIPESTATUS[0]}
echo "pretrain exited after $(( $(date +%s) - start )) s (status $rc)"
# 0: the steps were done; 124: the budget ran out (pretrain checkpointed on SIGTERM); anything else
# is a failure, and the carry must not be exported as if it had trained
if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ]; then
  echo "error: pretraining failed (status $rc): nothing exported" >&2
  exit 6
fi

python3 scripts/weights.py export "$RUN" --carry "$OUT/carry.safetensors" --model "$OUT/model" \
  --hardware "$(python3 -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU')")" || exit 5
python3 scripts/weights.py split "$OUT/carry.safetensors" && rm -f "$OUT/carry.safetensors"
cp "$RUN/log.csv" "$OUT/log.csv" 2>/dev/null || true
python3 - "$RUN" "$OUT" "$ROWS0" <<'EOF'
import csv, json, sys
run, out, rows0 = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = list(csv.DictReader(open(f"{run}/log.csv")))
summary = {"rows": len(rows)}
if rows:
    last = rows[-1]
    summary.update(step=int(last["step"]), samples=int(last["samples"]), loss=float(last["loss"]))
    # steps per second over the rows this call wrote (elapsed_s restarts at 0 in each call)
    this = rows[rows0:]
    if len(this) >= 2:
        a, b = this[0], this[-1]
        ds, dt = int(b["step"]) - int(a["step"]), float(b["elapsed_s"]) - float(a["elapsed_s"])
        if dt > 0 and ds > 0:
            summary.update(steps_per_s=ds / dt, synth_share=sum(float(r["synth_s"]) for r in this) /
                           max(1e-9, sum(float(r["synth_s"]) + float(r["net_s"]) for r in this)))
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(json.dumps(summary))
EOF
ls -la "$OUT" "$OUT/model"
