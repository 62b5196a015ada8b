#!/usr/bin/env bash
# The GPU suite on a bare GPU machine (the device tool's): install the carried pure-Python wheels (.whl/, made here
# with `make gpu-wheels`), put this checkout on the path, and run every part within its budget.
# Figures: $OUT/gpu_suite.json and $OUT/gpu_suite.md (OUT defaults to ./gpu_suite_out).
# Usage: bash benchmarks/gpu_suite.sh [--parts predict,train] [--budget 495]
set -uo pipefail
cd "$(dirname "$0")/.."
# module:distribution, installed from the carried wheels only where the machine lacks the module (its own stay)
for pair in open_clip:open_clip_torch diffusers:diffusers ftfy:ftfy wcwidth:wcwidth pandas:pandas; do
  module=${pair%%:*} dist=${pair#*:}
  python -c "import $module" 2>/dev/null && continue
  python -m pip install -q --no-index --no-deps --find-links .whl "$dist" 2>/dev/null \
    || echo "gpu_suite: $module is missing and no carried wheel installed it; the parts that need it say so"
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec python benchmarks/gpu_suite.py --out "${OUT:-gpu_suite_out}" "$@"
