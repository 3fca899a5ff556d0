#!/usr/bin/env bash
# Quickstart, end to end on one machine (CPU is enough; ~3-5 minutes on 2 cores):
#   1. set up .venv (reused if present)          4. pretrain a tiny GPT with TP=2 on 2 processes
#   2. build a corpus (or use yours) + tokenizer  5. save a Megatron checkpoint, export it to Hugging Face
#   3. preprocess it into .bin/.idx               6. generate a sample with Transformers from the export
#
#   bash examples/quickstart.sh [corpus.jsonl|corpus.txt]
#
# Without an argument the corpus is the English documentation that ships inside Python (pydoc_data.topics,
# ~470 KB). A .jsonl corpus needs a "text" field per line; a .txt corpus is split into paragraphs.
# Outputs go to $QUICKSTART_DIR (default ./quickstart-out). Knobs: TRAIN_ITERS (default 300), VENV.
# Bigger models: see examples/pretrain_gpt.sh (the Megatron paper presets, also listed here):
#   MODEL_SIZE=345M   # 24 layers, hidden 1024, 16 heads, TP=1
#   MODEL_SIZE=1.3B   # 24 layers, hidden 2048, 16 heads, TP=2
#   MODEL_SIZE=8.3B   # 72 layers, hidden 3072, 24 heads, TP=8
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
START=$SECONDS
stage() { echo; echo "=== [quickstart $(( SECONDS - START ))s] $*"; }

stage "1/6 environment"
source scripts/setup_env.sh test
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
OUT="${QUICKSTART_DIR:-$REPO/quickstart-out}"
rm -rf "$OUT/checkpoints" "$OUT/hf" "$OUT/data"
mkdir -p "$OUT"
echo "python: $PY   outputs: $OUT"

stage "2/6 corpus and tokenizer"
"$PY" - "${1:-}" "$OUT/corpus.jsonl" <<'PYEOF'
import json
import sys

src, dst = sys.argv[1], sys.argv[2]
if not src:
    import pydoc_data.topics

    texts = [t.strip() for topic in sorted(pydoc_data.topics.topics)
             for t in pydoc_data.topics.topics[topic].split("\n\n\n") if t.strip()]
    origin = "pydoc_data.topics (Python's own documentation)"
elif src.endswith(".jsonl"):
    with open(src, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    origin = src
else:
    with open(src, encoding="utf-8") as f:
        texts = [p.strip() for p in f.read().split("\n\n") if p.strip()]
    origin = src
with open(dst, "w", encoding="utf-8") as f:
    for t in texts:
        f.write(json.dumps({"text": t}) + "\n")
print(f"corpus: {len(texts)} documents, {sum(map(len, texts)) / 1e3:.0f} KB of text from {origin} -> {dst}")
PYEOF
"$PY" tools/train_tokenizer.py --input "$OUT/corpus.jsonl" --vocab-size 2048 --output-dir "$OUT/tokenizer"

stage "3/6 preprocess into Megatron .bin/.idx"
"$PY" tools/preprocess_data.py --input "$OUT/corpus.jsonl" --tokenizer-type GPT2BPETokenizer \
  --vocab-file "$OUT/tokenizer/vocab.json" --merge-file "$OUT/tokenizer/merges.txt" --append-eod \
  --output-prefix "$OUT/data/corpus" --workers 1

NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -ge 2 ]; then DEVICE_ARGS=(--distributed-backend nccl --bf16); DEVICE="2 GPUs (nccl, bf16)"
else DEVICE_ARGS=(--distributed-backend gloo); DEVICE="CPU (gloo, fp32)"; fi
TRAIN_ITERS="${TRAIN_ITERS:-300}"
stage "4/6 pretrain a 4-layer GPT (hidden 128) with tensor parallelism TP=2 on 2 processes, $DEVICE, $TRAIN_ITERS iterations"
"$PY" -m torch.distributed.run --standalone --nproc_per_node 2 pretrain_gpt.py "${DEVICE_ARGS[@]}" \
  --tensor-model-parallel-size 2 --num-layers 4 --hidden-size 128 --num-attention-heads 4 \
  --seq-length 128 --max-position-embeddings 128 --micro-batch-size 8 --global-batch-size 16 \
  --train-iters "$TRAIN_ITERS" --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 10 \
  --weight-decay 0.1 --clip-grad 1.0 --hidden-dropout 0 --attention-dropout 0 \
  --data-path "$OUT/data/corpus_text_document" --split 98,2,0 --tokenizer-type GPT2BPETokenizer \
  --vocab-file "$OUT/tokenizer/vocab.json" --merge-file "$OUT/tokenizer/merges.txt" \
  --log-interval 20 --eval-interval 100 --eval-iters 4 --save "$OUT/checkpoints" --save-interval 100000 \
  --distributed-timeout-minutes 5 2>&1 | grep --line-buffered -v "Warning\|warnings.warn" | tee "$OUT/train.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "training failed (log: $OUT/train.log)" >&2; exit 1; }
"$PY" - "$OUT/train.log" <<'PYEOF'
import re
import sys

vals = [float(v) for v in re.findall(r"\| lm loss: ([0-9.E+-]+)", open(sys.argv[1]).read())]
if len(vals) < 2 or not vals[-1] < vals[0] - 1.0:
    sys.exit(f"loss did not fall enough: {vals}")
print(f"lm loss fell from {vals[0]:.3f} to {vals[-1]:.3f}")
PYEOF

stage "5/6 export the checkpoint to Hugging Face"
CHECKPOINT_PATH="$OUT/checkpoints" HF_DIR="$OUT/hf" VOCAB_FILE="$OUT/tokenizer/vocab.json" \
  MERGE_FILE="$OUT/tokenizer/merges.txt" PY="$PY" bash examples/export_to_hf.sh

stage "6/6 generate with transformers from $OUT/hf"
"$PY" - "$OUT/hf" <<'PYEOF'
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path).eval()
torch.manual_seed(1234)
prompt = "The for statement is used to"
ids = tok(prompt, return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=60, do_sample=True, top_k=20, temperature=0.7,
                     pad_token_id=tok.eos_token_id)
print("-" * 72)
print(tok.decode(out[0], skip_special_tokens=True))
print("-" * 72)
PYEOF
stage "done in $(( SECONDS - START )) s: checkpoint $OUT/checkpoints, Hugging Face model $OUT/hf"
