#!/usr/bin/env bash
# Prompts -> cleaned, deduplicated set -> SD2 images -> MiniLM targets -> grouped folds, resumable.
#
#   build_dataset.sh WORK_DIR SD2_MODEL_DIR PROMPTS[:COLUMN] [PROMPTS[:COLUMN] ...]
#
# WORK_DIR ends up with index.parquet (imgId, prompt, source, path, seed, group, fold), targets.npy aligned to it, and
# images/. Re-running skips every finished step and every image already made. Settings come from the environment, and
# only those set are passed on (their defaults: python -m kaggle_i2p.dataset text|generate --help):
#   GPUS (processes, one per GPU; default 1)   IMAGES_PER_PROMPT   STEPS   GUIDANCE   IMAGE_SIZE   RENDER_SIZE
#   BATCH_SIZE   FORMAT (png|webp)   FOLDS   SEARCH (auto|exact|ivf)   NPROBE
#   PYTHON (the first of python3, python that can import kaggle_i2p)
# Several machines (WORK_DIR on a filesystem they share): run it on each with NNODES, NODE_RANK (0..NNODES-1) and
# MASTER_ADDR (node 0's address; MASTER_PORT, default 29500). Node 0 runs the text steps while the others wait for
# its prompt index; then every GPU of every node generates its share (global rank = shard), and the rank that finds
# every image made writes the index. See docs/scale.md (SLURM, job arrays).
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
nnodes=${NNODES:-1} node_rank=${NODE_RANK:-0}
if [ "$nnodes" -gt 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  echo "build_dataset.sh: error: NNODES=$nnodes needs MASTER_ADDR (node 0's address, reachable from every node)" >&2
  exit 2
fi
# Check what can be checked before the first step runs: a missing model folder must not wait for the text steps.
if [ ! -f "$model/model_index.json" ]; then
  echo "build_dataset.sh: error: $model is not a local diffusers Stable Diffusion folder (no model_index.json);" \
       "give the folder saved with pipeline.save_pretrained()" >&2
  exit 2
fi

text=(-m kaggle_i2p.dataset text "$@" --work "$work")
for pair in FOLDS=--folds SEARCH=--search NPROBE=--nprobe; do
  name=${pair%%=*}
  if [ -n "${!name:-}" ]; then text+=("${pair#*=}" "${!name}"); fi
done
if [ "$node_rank" -eq 0 ]; then
  if [ "$gpus" -gt 1 ]; then  # the embedding shards are shared by the GPUs; the last rank to finish goes on
    "$py" -m torch.distributed.run --standalone --nproc_per_node "$gpus" "${text[@]}"
  else
    "$py" "${text[@]}"
  fi
else
  echo "build_dataset.sh: node $node_rank waits for node 0's text steps ($work/prompt_index.parquet)" >&2
  while [ ! -f "$work/prompt_index.parquet" ]; do sleep 10; done
fi

generate=(-m kaggle_i2p.dataset generate --work "$work" --model "$model")
for pair in IMAGES_PER_PROMPT=--images-per-prompt STEPS=--steps GUIDANCE=--guidance IMAGE_SIZE=--image-size \
            RENDER_SIZE=--render-size BATCH_SIZE=--batch-size FORMAT=--format; do
  name=${pair%%=*}
  if [ -n "${!name:-}" ]; then generate+=("${pair#*=}" "${!name}"); fi
done
# The rank that finds every image made writes index.parquet and targets.npy (on any node, whichever finishes last).
if [ "$nnodes" -gt 1 ]; then
  "$py" -m torch.distributed.run --nnodes "$nnodes" --node_rank "$node_rank" --nproc_per_node "$gpus" \
    --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" "${generate[@]}"
elif [ "$gpus" -gt 1 ]; then
  "$py" -m torch.distributed.run --standalone --nproc_per_node "$gpus" "${generate[@]}"
else
  "$py" "${generate[@]}"
fi
