#!/usr/bin/env bash
# After a GPU run of scripts/gpu_pretrain.sh: take its files (the run tool's files_at folder) into the
# repository: join the carry-over parts into training/carry.safetensors (replacing the old one) and
# replace the shipped half-precision weights in src/synthvox/data/weights/default.
#   bash scripts/gpu_collect.sh FILES_AT
set -euo pipefail
SRC=${1:?give the folder the files of the GPU run were copied to}
cd "$(dirname "$0")/.."
python3 scripts/weights.py join "$SRC/carry.safetensors.part000" training/carry.safetensors
python3 scripts/weights.py info training/carry.safetensors
tmp=$(mktemp -d src/synthvox/data/weights/.default.XXXX)
cp "$SRC/model/config.json" "$SRC/model/model.safetensors" "$tmp/"
chmod 644 "$tmp"/*
python3 -c "from synthvox.models import load_model; load_model('$tmp'); print('model loads')"
rm -rf src/synthvox/data/weights/default && mv "$tmp" src/synthvox/data/weights/default
chmod 755 src/synthvox/data/weights/default
mkdir -p training/logs && cp "$SRC/log.csv" "training/logs/log_$(date +%Y%m%d_%H%M).csv"
echo "updated training/carry.safetensors and src/synthvox/data/weights/default"
