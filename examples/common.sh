# Shared settings for the example launch scripts (sourced, not run). Every value can be overridden from
# the environment, e.g.  MODEL_SIZE=345M TP=1 bash examples/pretrain_gpt.sh
#
# Model presets (Shoeybi et al. 2019, "Megatron-LM", Table 2; GPT-2 BPE vocab, 1024-token context):
#   MODEL_SIZE=345M   24 layers, hidden 1024, 16 heads                  TP=1
#   MODEL_SIZE=1.3B   24 layers, hidden 2048, 16 heads (GPT-3 XL shape)  TP=2
#                     (the paper's 1.2B row: 40 layers, hidden 1536, 16 heads, TP=2)
#   MODEL_SIZE=8.3B   72 layers, hidden 3072, 24 heads                  TP=8
#   MODEL_SIZE=tiny   2 layers, hidden 64, 4 heads, seq 64  (CPU smoke tests; the default)

REPO="${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
if [ -z "${PY:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

MODEL_SIZE="${MODEL_SIZE:-tiny}"
case "$MODEL_SIZE" in
  345M) NUM_LAYERS=24; HIDDEN=1024; HEADS=16; SEQ=1024; : "${TP:=1}" ;;
  1.3B) NUM_LAYERS=24; HIDDEN=2048; HEADS=16; SEQ=1024; : "${TP:=2}" ;;
  8.3B) NUM_LAYERS=72; HIDDEN=3072; HEADS=24; SEQ=1024; : "${TP:=8}" ;;
  tiny) NUM_LAYERS=2; HIDDEN=64; HEADS=4; SEQ=64; : "${TP:=1}" ;;
  *) echo "error: MODEL_SIZE=$MODEL_SIZE is not one of 345M, 1.3B, 8.3B, tiny" >&2; exit 2 ;;
esac
NUM_LAYERS="${NUM_LAYERS_OVERRIDE:-$NUM_LAYERS}"
PP="${PP:-1}"
MICRO_BATCH="${MICRO_BATCH:-4}"
GLOBAL_BATCH="${GLOBAL_BATCH:-16}"
TRAIN_ITERS="${TRAIN_ITERS:-100}"
LR="${LR:-3e-4}"

# Data: a Megatron .bin/.idx prefix (tools/preprocess_data.py) with its GPT-2 vocab/merges, or MOCK_DATA=1.
DATA_ARGS=()
if [ "${MOCK_DATA:-0}" = "1" ] || [ -z "${DATA_PATH:-}" ]; then
  DATA_ARGS=(--mock-data --vocab-size "${VOCAB_SIZE:-512}" --tokenizer-type NullTokenizer)
else
  DATA_ARGS=(--data-path $DATA_PATH --split "${SPLIT:-949,50,1}" --tokenizer-type GPT2BPETokenizer
             --vocab-file "$VOCAB_FILE" --merge-file "$MERGE_FILE")
fi

GPT_ARGS=(
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN" --num-attention-heads "$HEADS"
  --seq-length "$SEQ" --max-position-embeddings "$SEQ"
  --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --train-iters "$TRAIN_ITERS"
  --lr "$LR" --min-lr "${MIN_LR:-1e-5}" --lr-decay-style cosine --lr-warmup-iters "${WARMUP_ITERS:-$(( TRAIN_ITERS / 10 ))}"
  --weight-decay 0.1 --clip-grad 1.0
  --log-interval "${LOG_INTERVAL:-10}" --eval-interval "${EVAL_INTERVAL:-1000}" --eval-iters "${EVAL_ITERS:-5}"
  --distributed-timeout-minutes "${DIST_TIMEOUT_MIN:-10}"
)
# GPU runs: mixed precision by default (override with PRECISION=); CPU runs stay in fp32.
if "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  PRECISION="${PRECISION---bf16}"
  if [ -n "$PRECISION" ]; then GPT_ARGS+=($PRECISION); fi
fi

# Checkpoints: --save always when CHECKPOINT_PATH is set; --load only once a checkpoint exists there,
# so the same command starts a run and resumes it (after pre-emption or a requeue).
CKPT_ARGS=()
if [ -n "${CHECKPOINT_PATH:-}" ]; then
  CKPT_ARGS=(--save "$CHECKPOINT_PATH" --save-interval "${SAVE_INTERVAL:-1000}")
  if [ -f "$CHECKPOINT_PATH/latest_checkpointed_iteration.txt" ]; then CKPT_ARGS+=(--load "$CHECKPOINT_PATH"); fi
fi
# Free-form extra flags for pretrain_gpt.py.
read -r -a USER_ARGS <<< "${EXTRA_ARGS:-}"
