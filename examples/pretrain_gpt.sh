#!/usr/bin/env bash
# Pretrain GPT on one node: torchrun --standalone with one process per GPU (or per CPU process on a laptop).
#
#   GPUS_PER_NODE=8 MODEL_SIZE=345M DATA_PATH=data/my-corpus_text_document \
#   VOCAB_FILE=gpt2-vocab.json MERGE_FILE=gpt2-merges.txt CHECKPOINT_PATH=ckpt/gpt-345m \
#   TRAIN_ITERS=500000 LR=1.5e-4 GLOBAL_BATCH=512 bash examples/pretrain_gpt.sh
#
# Model presets (Megatron-LM paper, Shoeybi et al. 2019), pick one:
#   MODEL_SIZE=345M   # 24 layers, hidden 1024, 16 heads, TP=1
#   MODEL_SIZE=1.3B   # 24 layers, hidden 2048, 16 heads, TP=2
#   MODEL_SIZE=8.3B   # 72 layers, hidden 3072, 24 heads, TP=8   (needs 8 GPUs per model replica)
#   MODEL_SIZE=tiny   # default: 2 layers, hidden 64, runs on a CPU in seconds
# Other knobs (see examples/common.sh): TP, PP, MICRO_BATCH, GLOBAL_BATCH, TRAIN_ITERS, LR, MOCK_DATA=1,
# CHECKPOINT_PATH (saves there; resumes from it when it holds a checkpoint), EXTRA_ARGS="--flag value ...".
# On CPU set NPROC (default: number of GPUs, or TP*PP on a CPU-only machine). The same command run again
# after an interruption (SIGTERM saves at the next step) continues from the checkpoint.
set -euo pipefail
source "$(dirname "$0")/common.sh"
if [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  [ "$GPUS_PER_NODE" -gt 0 ] || GPUS_PER_NODE=$((TP * PP))
fi
set -x
exec "$PY" -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "$GPUS_PER_NODE" \
  "$REPO/pretrain_gpt.py" "${GPT_ARGS[@]}" "${DATA_ARGS[@]}" "${CKPT_ARGS[@]}" "${USER_ARGS[@]}"
