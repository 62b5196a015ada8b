#!/usr/bin/env bash
# Prompts -> cleaned, deduplicated set -> SD2 images -> MiniLM targets -> grouped folds, resumable.
#
#   build_dataset.sh WORK_DIR SD2_MODEL_DIR PROMPTS[:COLUMN] [PROMPTS[:COLUMN] ...]
#
# WORK_DIR ends up with index.parquet (imgId, prompt, source, path, seed, group, fold), targets.npy aligned to it, and
# images/. Re-running skips every finished step and every image already made. Settings come from the environment, and
# only those set are passed on (their defaults: python -m kaggle_i2p.dataset text|generate --help):
#   GPUS (processes, one per GPU; default 1)   IMAGES_PER_PROMPT   STEPS   GUIDANCE   IMAGE_SIZE   RENDER_SIZE
#   BATCH_SIZE   FORMAT (png|webp)   FOLDS   PYTHON (the first of python3, python that can import kaggle_i2p)
set -euo pipefail
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
if [ $# -lt 3 ]; then
  usage >&2
  exit 2
fi
work=$1 model=$2
shift 2
if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
else
  py=
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "import kaggle_i2p" 2>/dev/null; then
      py=$candidate; break
    fi
  done
  if [ -z "$py" ]; then
    echo "build_dataset.sh: error: neither python3 nor python can import kaggle_i2p; install it (pip install" \
         "'kaggle_i2p[dataset]') or set PYTHON=/path/to/python" >&2
    exit 2
  fi
fi
echo "build_dataset.sh: using $py ($(command -v "$py"))" >&2
gpus=${GPUS:-1}
# Check what can be checked before the first step runs: a missing model folder must not wait for the text steps.
if [ ! -f "$model/model_index.json" ]; then
  echo "build_dataset.sh: error: $model is not a local diffusers Stable Diffusion folder (no model_index.json);" \
       "give the folder saved with pipeline.save_pretrained()" >&2
  exit 2
fi

"$py" -m kaggle_i2p.dataset text "$@" --work "$work" ${FOLDS:+--folds "$FOLDS"}

generate=(-m kaggle_i2p.dataset generate --work "$work" --model "$model")
for pair in IMAGES_PER_PROMPT=--images-per-prompt STEPS=--steps GUIDANCE=--guidance IMAGE_SIZE=--image-size \
            RENDER_SIZE=--render-size BATCH_SIZE=--batch-size FORMAT=--format; do
  name=${pair%%=*}
  if [ -n "${!name:-}" ]; then generate+=("${pair#*=}" "${!name}"); fi
done
if [ "$gpus" -gt 1 ]; then
  "$py" -m torch.distributed.run --standalone --nproc_per_node "$gpus" "${generate[@]}"
else
  "$py" "${generate[@]}"
fi

"$py" -m kaggle_i2p.dataset index --work "$work" ${FORMAT:+--format "$FORMAT"}
