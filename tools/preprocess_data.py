#!/usr/bin/env python
"""Tokenize a JSONL corpus into Megatron indexed datasets ``{prefix}_{key}_document.bin/.idx``.

Example::

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/my-corpus \\
        --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt \\
        --append-eod --workers 2

Lines are read in bounded chunks, tokenized by ``--workers`` processes and written in input order,
so memory stays bounded on inputs of any size. Outputs appear under their final names only when
complete. Document i of every key's dataset comes from (non-blank, valid) input line i: a field that
tokenizes to nothing is written as a zero-length document, so the keys stay aligned (the GPT dataset
reads zero-length documents as contributing no tokens).
"""

import argparse
import collections
import json
import multiprocessing
import os
import sys
import time

import numpy

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, best_fitting_dtype  # noqa: E402
from megatron.training.tokenizer import build_tokenizer  # noqa: E402

CHUNK_LINES = 64  # lines per task sent to a worker

_encoder = None  # per-process Encoder, set by _init_worker


class Encoder:
    """Turns one JSONL line (bytes) into token arrays per json key, or an error message."""

    def __init__(self, args):
        self.json_keys = args.json_keys
        self.append_eod = args.append_eod
        self.tokenizer = build_tokenizer(args.tokenizer_type, vocab_file=args.vocab_file,
                                         merge_file=args.merge_file, vocab_size=args.vocab_size)
        self.dtype = best_fitting_dtype(self.tokenizer.vocab_size)

    def encode_line(self, line: bytes):
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return None, f"invalid JSON ({e})"
        if not isinstance(obj, dict):
            return None, "a JSON line must be an object"
        out = {}
        for key in self.json_keys:
            text = obj.get(key)
            if not isinstance(text, str):
                return None, f"key {key!r} is missing or not a string (see --json-keys)"
            try:
                ids = self.tokenizer.tokenize(text)
            except Exception as e:  # the line's content made the tokenizer fail: report the line
                return None, f"key {key!r} could not be tokenized ({type(e).__name__}: {e})"
            if ids and self.append_eod:
                ids.append(self.tokenizer.eod)
            out[key] = numpy.asarray(ids, dtype=self.dtype)
        return out, None

    def encode_chunk(self, lines):
        return [self.encode_line(line) if line.strip() else (None, "empty line") for line in lines]


def _init_worker(args):
    global _encoder
    _encoder = Encoder(args)


def _encode_chunk(lines):
    return _encoder.encode_chunk(lines)


def _read_chunks(path):
    """Yield (first line number, [raw lines]) chunks of the input file."""
    with open(path, "rb") as f:
        chunk, first = [], 1
        for lineno, line in enumerate(f, 1):
            chunk.append(line)
            if len(chunk) == CHUNK_LINES:
                yield first, chunk
                chunk, first = [], lineno + 1
        if chunk:
            yield first, chunk


def _ordered_results(args, encoder):
    """Yield (first line number, chunk, results) in input order with at most ~4 chunks per worker in flight."""
    chunks = _read_chunks(args.input)
    if args.workers <= 1:
        for first, chunk in chunks:
            yield first, chunk, encoder.encode_chunk(chunk)
        return
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(args.workers, initializer=_init_worker, initargs=(args,)) as pool:
        pending = collections.deque()
        for first, chunk in chunks:
            pending.append((first, chunk, pool.apply_async(_encode_chunk, (chunk,))))
            if len(pending) >= 4 * args.workers:
                first0, chunk0, res = pending.popleft()
                yield first0, chunk0, res.get()
        while pending:
            first0, chunk0, res = pending.popleft()
            yield first0, chunk0, res.get()


def run(args):
    """Tokenize ``args.input`` into one indexed dataset per json key; returns a summary dict."""
    encoder = Encoder(args)  # validates the tokenizer files before any worker starts
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    prefixes = {key: f"{args.output_prefix}_{key}_document" for key in args.json_keys}
    builders = {key: IndexedDatasetBuilder(p + ".bin", dtype=encoder.dtype) for key, p in prefixes.items()}
    docs = skipped = empty = 0
    nbytes = 0
    start = time.time()
    try:
        for first, chunk, results in _ordered_results(args, encoder):
            for i, (line, (out, err)) in enumerate(zip(chunk, results)):
                nbytes += len(line)
                if err == "empty line":
                    continue
                if err is not None:
                    if args.skip_invalid_lines:
                        skipped += 1
                        continue
                    raise ValueError(f"--input {args.input} line {first + i}: {err}; fix the line or pass "
                                     "--skip-invalid-lines")
                for key, ids in out.items():
                    empty += int(ids.size == 0)
                    builders[key].add_document(ids, [ids.size])  # zero-length too: keys stay aligned
                docs += 1
                if docs % args.log_interval == 0:
                    elapsed = max(time.time() - start, 1e-9)
                    print(f"Processed {docs} documents ({docs / elapsed:.1f} docs/s, "
                          f"{nbytes / elapsed / 1024 ** 2:.2f} MB/s).", file=sys.stderr, flush=True)
        for key, builder in builders.items():
            builder.finalize(prefixes[key] + ".idx")
    except BaseException:
        for builder in builders.values():
            builder.abort()
        raise
    elapsed = max(time.time() - start, 1e-9)
    summary = dict(documents=docs, skipped_invalid_lines=skipped, empty_documents=empty, bytes=nbytes,
                   seconds=elapsed, outputs=list(prefixes.values()))
    print(f"Done: {docs} documents, {nbytes / 1024 ** 2:.2f} MB in {elapsed:.2f} s "
          f"({docs / elapsed:.1f} docs/s, {nbytes / elapsed / 1024 ** 2:.2f} MB/s); "
          f"skipped {skipped} invalid lines, {empty} empty (zero-length) documents. Wrote "
          + ", ".join(p + ".bin/.idx" for p in prefixes.values()), file=sys.stderr, flush=True)
    return summary


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Tokenize JSONL into Megatron .bin/.idx datasets")
    group = parser.add_argument_group(title="input data")
    group.add_argument("--input", type=str, required=True, help="path to the input JSONL file")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract from each JSON line")
    group.add_argument("--skip-invalid-lines", action="store_true",
                       help="skip malformed lines (count reported at the end) instead of failing")
    group = parser.add_argument_group(title="tokenizer")
    group.add_argument("--tokenizer-type", type=str, required=True, choices=["GPT2BPETokenizer", "NullTokenizer"])
    group.add_argument("--vocab-file", type=str, default=None, help="GPT-2 vocab.json")
    group.add_argument("--merge-file", type=str, default=None, help="GPT-2 merges.txt")
    group.add_argument("--vocab-size", type=int, default=None, help="vocab size for NullTokenizer")
    group.add_argument("--append-eod", action="store_true", help="append an end-of-document token to each document")
    group = parser.add_argument_group(title="output data")
    group.add_argument("--output-prefix", type=str, required=True, help="path prefix of the output files")
    group = parser.add_argument_group(title="runtime")
    group.add_argument("--workers", type=int, default=1, help="number of tokenizer worker processes")
    group.add_argument("--log-interval", type=int, default=10000, help="documents between progress lines")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.input):
        parser.error(f"--input {args.input}: no such file")
    if args.workers < 1 or args.log_interval < 1:
        parser.error("--workers and --log-interval must be >= 1")
    return args


def main(argv=None):
    """Run the tool; a user mistake (bad input line, missing tokenizer file, ...) exits with one stderr line."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = get_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as err:  # json.JSONDecodeError and UnicodeError are ValueErrors
        sys.exit(f"preprocess_data.py: error: {err}")


if __name__ == "__main__":
    main()
