#!/usr/bin/env bash
# Pretrain GPT on several nodes with torchrun. Run this script once on every node.
#
# Static form (each node knows its rank; node 0's address is the master):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 GPUS_PER_NODE=8 MODEL_SIZE=1.3B \
#     DATA_PATH=... VOCAB_FILE=... MERGE_FILE=... CHECKPOINT_PATH=/shared/ckpt bash examples/pretrain_gpt_distributed.sh
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 ...                                       (same on node 1)
#
# c10d rendezvous form (ranks assigned by torchrun; any node may be listed as the endpoint; nodes can
# join in any order and a restarted node re-joins):
#   RDZV=c10d NNODES=2 RDZV_ENDPOINT=10.0.0.1:29400 RDZV_ID=my-job-42 GPUS_PER_NODE=8 ... bash examples/pretrain_gpt_distributed.sh
#
# Model presets (Megatron-LM paper, Shoeybi et al. 2019), pick one:
#   MODEL_SIZE=345M   # 24 layers, hidden 1024, 16 heads, TP=1
#   MODEL_SIZE=1.3B   # 24 layers, hidden 2048, 16 heads, TP=2
#   MODEL_SIZE=8.3B   # 72 layers, hidden 3072, 24 heads, TP=8  (data parallel across nodes: TP stays in a node)
#   MODEL_SIZE=tiny   # default, CPU-sized
# Two "nodes" on one machine (what the tests do): NNODES=2 NODE_RANK={0,1} MASTER_ADDR=127.0.0.1 GPUS_PER_NODE=2.
# Multi-host CPU jobs may need GLOO_SOCKET_IFNAME=<interface> so gloo does not advertise loopback.
# A dead rank makes every rank exit non-zero within --distributed-timeout-minutes (DIST_TIMEOUT_MIN).
set -euo pipefail
source "$(dirname "$0")/common.sh"
NNODES="${NNODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-$("$PY" -c "import torch; print(torch.cuda.device_count() or 1)")}"
if [ "${RDZV:-static}" = "c10d" ]; then
  LAUNCH=(--nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" --rdzv_backend c10d
          --rdzv_endpoint "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port}" --rdzv_id "${RDZV_ID:-megatron-gpt}")
else
  LAUNCH=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK (0..NNODES-1)}" --nproc_per_node "$GPUS_PER_NODE"
          --master_addr "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}" --master_port "${MASTER_PORT:-29500}")
fi
set -x
exec "$PY" -m torch.distributed.run "${LAUNCH[@]}" \
  "$REPO/pretrain_gpt.py" "${GPT_ARGS[@]}" "${DATA_ARGS[@]}" "${CKPT_ARGS[@]}" "${USER_ARGS[@]}"
