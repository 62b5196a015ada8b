#!/usr/bin/env bash
# Prompts -> cleaned, deduplicated set -> SD2 images -> MiniLM targets -> grouped folds, resumable.
#
#   build_dataset.sh WORK_DIR SD2_MODEL_DIR PROMPTS[:COLUMN] [PROMPTS[:COLUMN] ...]
#
# WORK_DIR ends up with index.parquet (imgId, prompt, source, path, seed, group, fold), targets.npy aligned to it, and
# images/. Re-running skips every finished step and every image already made. Settings come from the environment:
#   GPUS (processes, one per GPU; default 1)   IMAGES_PER_PROMPT (1)   STEPS (25)   GUIDANCE (9.0)
#   IMAGE_SIZE (512)   RENDER_SIZE (the model's)   BATCH_SIZE (4)   FORMAT (png|webp)   FOLDS (5)   PYTHON (python)
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
work=$1 model=$2
shift 2
py=${PYTHON:-python}
gpus=${GPUS:-1}

"$py" -m kaggle_i2p.dataset text "$@" --work "$work" --folds "${FOLDS:-5}"

generate=(-m kaggle_i2p.dataset generate --work "$work" --model "$model" --images-per-prompt "${IMAGES_PER_PROMPT:-1}"
          --steps "${STEPS:-25}" --guidance "${GUIDANCE:-9.0}" --image-size "${IMAGE_SIZE:-512}"
          --batch-size "${BATCH_SIZE:-4}" --format "${FORMAT:-png}")
if [ -n "${RENDER_SIZE:-}" ]; then generate+=(--render-size "$RENDER_SIZE"); fi
if [ "$gpus" -gt 1 ]; then
  "$py" -m torch.distributed.run --standalone --nproc_per_node "$gpus" "${generate[@]}"
else
  "$py" "${generate[@]}"
fi

"$py" -m kaggle_i2p.dataset index --work "$work" --format "${FORMAT:-png}"
