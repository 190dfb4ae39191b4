#!/usr/bin/env bash
# Download the wheels the lent GPU machine lacks (Python 3.12, x86-64) into .whl/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl nibabel monai importlib-resources pyyaml
ls -la .whl
