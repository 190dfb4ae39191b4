#!/usr/bin/env bash
# The pretraining run that accumulates across sessions on one CPU thread (issue 10).
#
#   nohup bash scripts/cpu_accumulate.sh 7200 > /tmp/accumulate.log 2>&1 &
#
# 1. puts training/carry.safetensors into the run folder (RUN, default training/runs/cpu_reflect: one
#    folder per recipe, this one for the `cpu` preset since it took reflect padding) as its
#    newest checkpoint, unless the folder already holds a newer one (then the run simply continues);
#    with FROM_SCRATCH=1 it does not, and a new run folder starts from initialised weights,
# 2. trains PRESET (default `cpu`, the winning recipe of benchmarks/README.md's ablation) for BUDGET
#    seconds on one thread at low priority; SIGTERM at the end makes pretrain checkpoint and exit,
# 3. exports the newest checkpoint: RUN/carry.safetensors (float32, no optimizer state) and
#    RUN/model (float16),
# 4. runs the feature probe (benchmarks/features.py) on RUN/model beside the shipped weights and
#    MIND-SSC, into RUN/probe/.
# Keep the result only when the probe's score, its `inter` figure and its registration rows say it is
# better (DEVELOPERS.md).
set -uo pipefail
BUDGET=${1:-3600}
shift || true
cd "$(dirname "$0")/.."
RUN=${RUN:-training/runs/cpu_reflect}
PRESET=${PRESET:-cpu}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824
mkdir -p "$RUN"
if [ -z "${FROM_SCRATCH:-}" ] && [ -f training/carry.safetensors ]; then
  python3 scripts/weights.py install training/carry.safetensors "$RUN" || exit 4
fi
start=$(date +%s)
timeout -s TERM "$BUDGET" nice -n 10 python3 -m synthvox pretrain --config "$PRESET" --out "$RUN" --resume \
  --device cpu progress=false "$@" 2>&1 | tail -n 5
echo "pretrain exited after $(( $(date +%s) - start )) s"
python3 scripts/weights.py export "$RUN" --carry "$RUN/carry.safetensors" --model "$RUN/model" --hardware "CPU, 1 thread" || exit 5
[ -n "${SKIP_PROBE:-}" ] || nice -n 10 python3 -m benchmarks.features --weights shipped --weights "$RUN/model" --out "$RUN/probe" --quick
