#!/usr/bin/env python
"""Preprocessing throughput (MB/s, 1 and 2 workers) vs HF `tokenizers` and tiktoken on the same text,
and GPT index build time for a 100M-token corpus.

    python benchmarks/bench_preprocess.py [--mb 8] [--vocab-size 8192] [--index-tokens 100000000]

The corpus is stdlib prose (pydoc_data.topics) repeated to --mb megabytes of JSONL; the tokenizer is a
byte-level BPE trained on it by tools/train_tokenizer.py (GPT-2's own files cannot be downloaded here).
Baselines encode the same documents in this process, single-threaded, from the same vocab/merges.
"""

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

import numpy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def make_corpus(path, megabytes):
    import pydoc_data.topics

    texts = list(pydoc_data.topics.topics.values())
    written, i = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < megabytes * 1024 ** 2:
            line = json.dumps({"text": texts[i % len(texts)]}) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            i += 1
    return texts


def docs_of(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def time_encode(fn, docs, nbytes, repeat=2):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for d in docs:
            fn(d)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1024 ** 2


def tiktoken_encoder(vocab_file, merge_file):
    import tiktoken

    from megatron.training.tokenizer.gpt2_tokenization import GPT2_PATTERN, bytes_to_unicode
    byte_decoder = {v: k for k, v in bytes_to_unicode().items()}
    with open(vocab_file, encoding="utf-8") as f:
        vocab = json.load(f)
    ranks = {bytes(byte_decoder[c] for c in tok): i for tok, i in vocab.items() if tok != "<|endoftext|>"}
    return tiktoken.Encoding(name="bench", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": vocab["<|endoftext|>"]})


class _FakeIndexed:
    """Only the sequence lengths: enough for GPTDataset's index construction."""

    def __init__(self, sizes):
        self.sequence_lengths = sizes

    def __len__(self):
        return len(self.sequence_lengths)


def bench_index(num_tokens, seq_length, tmp):
    from megatron.core.datasets import helpers
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    rng = numpy.random.default_rng(0)
    sizes = rng.integers(1, 1000, size=num_tokens // 500).astype(numpy.int32)  # ~500 tokens per document
    sizes[-1] += num_tokens - int(sizes.sum())
    num_samples = (num_tokens - 1) // seq_length
    cfg = GPTDatasetConfig(random_seed=1234, sequence_length=seq_length, blend=(["x"], None), split="1",
                           path_to_cache=os.path.join(tmp, "cache"))
    t0 = time.perf_counter()
    ds = GPTDataset(_FakeIndexed(sizes), os.path.join(tmp, "fake"), numpy.arange(len(sizes), dtype=numpy.int32),
                    num_samples, "train", cfg)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    GPTDataset(_FakeIndexed(sizes), os.path.join(tmp, "fake"), numpy.arange(len(sizes), dtype=numpy.int32),
               num_samples, "train", cfg)
    load = time.perf_counter() - t0
    print(f"index build, {num_tokens / 1e6:.0f}M tokens, {len(sizes)} docs, seq {seq_length}: {build:.2f} s "
          f"(C++ helpers: {helpers.HAVE_CPP_HELPERS}; {len(ds)} samples); cached reload {load * 1e3:.1f} ms")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=8.0, help="corpus size in MB")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--index-tokens", type=int, default=100_000_000)
    p.add_argument("--seq-length", type=int, default=2048)
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl")
        make_corpus(corpus, args.mb)
        nbytes = os.path.getsize(corpus)
        _tool("train_tokenizer").main(["--input", corpus, "--vocab-size", str(args.vocab_size),
                                       "--output-dir", tmp])
        vocab, merges = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
        pre = _tool("preprocess_data")
        rates = {}
        for workers in (1, 2):
            t0 = time.perf_counter()
            pre.main(["--input", corpus, "--output-prefix", os.path.join(tmp, f"out{workers}"),
                      "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges,
                      "--append-eod", "--workers", str(workers), "--log-interval", "1000000000"])
            rates[workers] = nbytes / (time.perf_counter() - t0) / 1024 ** 2
        docs = docs_of(corpus)
        text_bytes = sum(len(d.encode("utf-8")) for d in docs)
        from tokenizers import ByteLevelBPETokenizer

        hf = ByteLevelBPETokenizer(vocab, merges, add_prefix_space=False)
        hf_rate = time_encode(lambda d: hf.encode(d), docs, text_bytes)
        tk = tiktoken_encoder(vocab, merges)
        same = all(tk.encode_ordinary(d) == hf.encode(d).ids for d in docs[:200])
        tk_rate = time_encode(tk.encode_ordinary, docs, text_bytes)
        print(f"\ncorpus {nbytes / 1024 ** 2:.1f} MB JSONL ({len(docs)} docs), vocab {args.vocab_size}, "
              f"{os.cpu_count()} CPUs")
        print(f"preprocess_data.py 1 worker : {rates[1]:7.2f} MB/s (end to end: read, JSON, tokenize, write)")
        print(f"preprocess_data.py 2 workers: {rates[2]:7.2f} MB/s  (x{rates[2] / rates[1]:.2f} vs 1 worker)")
        print(f"HF tokenizers encode, 1 thread: {hf_rate:7.2f} MB/s  -> preprocess 1 worker / tokenizers = "
              f"{rates[1] / hf_rate:.2f}")
        print(f"tiktoken encode, 1 thread     : {tk_rate:7.2f} MB/s  -> preprocess 1 worker / tiktoken   = "
              f"{rates[1] / tk_rate:.2f}  (tiktoken ids == tokenizers ids on 200 docs: {same})")
        bench_index(args.index_tokens, args.seq_length, tmp)


if __name__ == "__main__":
    main()
