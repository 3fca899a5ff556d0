"""End to end: JSONL -> tokenizer training -> preprocess_data.py (2 workers) -> pretrain_gpt.py at TP=2."""

import json
import os
import re
import subprocess
import sys

from tests.multiprocess import find_free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(cmd, cwd, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    assert out.returncode == 0, f"{cmd[:3]} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def _corpus(path, n_docs=300):
    import pydoc_data.topics as topics

    texts = [t.strip() for t in topics.topics.values() if len(t.strip()) > 200]
    with open(path, "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"text": texts[i % len(texts)][:2000]}) + "\n")


def test_jsonl_to_bin_idx_to_pretrain_tp2(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    _corpus(corpus)
    tok_dir = tmp_path / "tok"
    _run([sys.executable, os.path.join(ROOT, "tools/train_tokenizer.py"), "--input", str(corpus),
          "--vocab-size", "1000", "--output-dir", str(tok_dir)], tmp_path)
    vocab, merges = str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt")
    prefix = tmp_path / "corpus"
    pre = _run([sys.executable, os.path.join(ROOT, "tools/preprocess_data.py"), "--input", str(corpus),
                "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges,
                "--append-eod", "--output-prefix", str(prefix), "--workers", "2"], tmp_path)
    data = str(prefix) + "_text_document"
    assert os.path.isfile(data + ".bin") and os.path.isfile(data + ".idx"), pre.stdout

    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.training.tokenizer import build_tokenizer

    ds = IndexedDataset(data)
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    first = json.loads(open(corpus).readline())["text"]
    assert list(ds[0]) == tok.tokenize(first) + [tok.eod]  # what training will read is what we tokenized

    flags = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
             "--max-position-embeddings", "64", "--micro-batch-size", "4", "--global-batch-size", "8",
             "--train-iters", "6", "--lr", "1e-3", "--log-interval", "2", "--eval-interval", "3", "--eval-iters", "1",
             "--tensor-model-parallel-size", "2", "--data-path", data, "--split", "90,9,1",
             "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges,
             "--data-cache-path", str(tmp_path / "cache")]
    out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(find_free_port()), os.path.join(ROOT, "pretrain_gpt.py"), *flags], tmp_path)
    losses = [float(m) for m in re.findall(r"lm loss: ([0-9.E+-]+) \|", out.stdout)]
    assert len(losses) == 3 and all(0 < v < 20 for v in losses), out.stdout[-3000:]
    assert "validation loss at iteration 3" in out.stdout
    assert os.listdir(tmp_path / "cache"), "dataset indices were not cached under --data-cache-path"

    bad = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"),
                          *[f if f != data else str(tmp_path / "missing") for f in flags],
                          "--tensor-model-parallel-size", "1"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    assert bad.returncode == 2 and "--data-path" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-2000:]
