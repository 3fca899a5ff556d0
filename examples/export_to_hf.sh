#!/usr/bin/env bash
# Export a Megatron checkpoint (any TP/PP layout) to a Hugging Face GPT2LMHeadModel folder, optionally
# with the tokenizer, and check that Transformers loads it.
#
#   CHECKPOINT_PATH=ckpt/gpt-345m HF_DIR=hf/gpt-345m VOCAB_FILE=gpt2-vocab.json MERGE_FILE=gpt2-merges.txt \
#     bash examples/export_to_hf.sh
#
# Works for every size; the model shape comes from the checkpoint's stored args. The Megatron paper presets:
#   345M   # 24 layers, hidden 1024, 16 heads   (~0.7 GB in fp16 once exported)
#   1.3B   # 24 layers, hidden 2048, 16 heads   (~2.6 GB)
#   8.3B   # 72 layers, hidden 3072, 24 heads   (~17 GB: export on a machine with that much RAM)
# ITERATION=N exports that iteration instead of the latest. PROMPT="..." also prints a sample.
set -euo pipefail
source "$(dirname "$0")/common.sh"
: "${CHECKPOINT_PATH:?set CHECKPOINT_PATH to the Megatron checkpoint directory (holding latest_checkpointed_iteration.txt)}"
: "${HF_DIR:?set HF_DIR to the output folder}"
ARGS=(--load "$CHECKPOINT_PATH" --output "$HF_DIR")
[ -n "${ITERATION:-}" ] && ARGS+=(--iteration "$ITERATION")
[ -n "${VOCAB_FILE:-}" ] && ARGS+=(--vocab-file "$VOCAB_FILE")
[ -n "${MERGE_FILE:-}" ] && ARGS+=(--merge-file "$MERGE_FILE")
"$PY" "$REPO/tools/convert_checkpoint_to_hf.py" "${ARGS[@]}"
"$PY" - "$HF_DIR" "${PROMPT:-}" <<'PYEOF'
import os
import sys

import torch
from transformers import AutoModelForCausalLM

path, prompt = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(path)
n = sum(p.numel() for p in model.parameters())
print(f"[export] {path}: {type(model).__name__}, {n / 1e6:.2f}M parameters, loads with transformers")
if prompt and os.path.exists(os.path.join(path, "tokenizer_config.json")):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=60, do_sample=True, top_k=20, temperature=0.8,
                         pad_token_id=tok.eos_token_id)
    print("[export] sample:", tok.decode(out[0], skip_special_tokens=True))
PYEOF
