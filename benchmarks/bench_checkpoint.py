"""Checkpoint save/load throughput (GB/s) for a ~1 GB GPT-shaped model vs a plain torch.save/torch.load.

    python benchmarks/bench_checkpoint.py [--size-gb 1.0] [--dir /tmp/bench_ckpt] [--repeats 2]

Ours = the crash-safe path (temp dir, fsync, rename, atomic tracker) and the allowlisted
``torch.load(weights_only=True)``; baseline = ``torch.save`` to one file (with and without fsync) and
``torch.load(weights_only=True)``. Prints the best of ``--repeats`` runs.
"""

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

import torch  # noqa: E402

from megatron.training.checkpoint_conversion import nest_model_state  # noqa: E402
from megatron.training.checkpoint_io import safe_load, save_sharded_checkpoint  # noqa: E402


def gpt_state(size_gb: float, hidden: int = 2048):
    """Megatron-named fp32 tensors totalling about ``size_gb`` GB."""
    per_layer = 12 * hidden * hidden + 13 * hidden
    layers = max(1, int(size_gb * 1e9 / 4 / per_layer))
    sd = {"language_model.embedding.word_embeddings.weight": torch.randn(50304, hidden)}
    for i in range(layers):
        p = f"language_model.encoder.layers.{i}."
        sd[p + "self_attention.query_key_value.weight"] = torch.randn(3 * hidden, hidden)
        sd[p + "self_attention.dense.weight"] = torch.randn(hidden, hidden)
        sd[p + "mlp.dense_h_to_4h.weight"] = torch.randn(4 * hidden, hidden)
        sd[p + "mlp.dense_4h_to_h.weight"] = torch.randn(hidden, 4 * hidden)
    return sd


def _best(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gb", type=float, default=1.0)
    p.add_argument("--dir", default="/tmp/bench_ckpt")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    flat = gpt_state(args.size_gb)
    gb = sum(t.numel() * t.element_size() for t in flat.values()) / 1e9
    state = {"model": nest_model_state(flat), "iteration": 1, "checkpoint_version": 3.0}
    ours_dir, plain = os.path.join(args.dir, "ours"), os.path.join(args.dir, "plain.pt")

    counter = iter(range(1000))

    def plain_save(fsync=False):
        if os.path.exists(plain):
            os.rename(plain, plain + f".{next(counter)}")  # a fresh file each time, as a checkpoint is
        with open(plain, "wb") as f:
            torch.save(state, f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())

    it = iter(range(1, 1000))
    results = {"torch.save": _best(plain_save, args.repeats)}  # also warms up the allocator / page cache
    results["torch.save + fsync"] = _best(lambda: plain_save(True), args.repeats)
    results["ours save"] = _best(lambda: save_sharded_checkpoint(ours_dir, next(it), {(0, 0): state}, 1),
                                 args.repeats)
    ours_file = [os.path.join(r, f) for r, _, fs in os.walk(ours_dir) for f in fs if f == "model_optim_rng.pt"][-1]
    results["ours load (allowlisted)"] = _best(lambda: safe_load(ours_file), args.repeats)
    results["torch.load(weights_only=True)"] = _best(lambda: torch.load(plain, weights_only=True), args.repeats)
    print(f"model: {gb:.2f} GB fp32 in {len(flat)} tensors; best of {args.repeats}")
    for name, sec in results.items():
        print(f"  {name:32s} {sec:7.2f} s  {gb / sec:6.2f} GB/s")
    print(f"  save ratio ours / torch.save        {results['torch.save'] / results['ours save']:.2f}x throughput")
    print(f"  save ratio ours / torch.save+fsync  {results['torch.save + fsync'] / results['ours save']:.2f}x")
    print(f"  load ratio ours / torch.load        "
          f"{results['torch.load(weights_only=True)'] / results['ours load (allowlisted)']:.2f}x")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
