"""Benchmark the fused kernels (forward + backward) against the torch eager fallback and torch.compile.

For each op and shape: time of one forward + backward (median of CUDA-event timings), effective
bandwidth in GB/s (minimal bytes the op must move / time, the same byte count for all three
implementations) and that bandwidth as a fraction of the measured device-to-device copy bandwidth.

    python benchmarks/bench_fused_kernels.py [--quick] [--out benchmarks/results]

Writes fused_kernels_<gpu>.md and .json to --out. Without a CUDA device it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

import torch

from megatron.core.fusions import fused_kernels_available, load_error, load_fused_kernels
from megatron.core.fusions.fused_bias_dropout import bias_dropout_add
from megatron.core.fusions.fused_bias_gelu import bias_gelu, bias_gelu_impl, set_compile_enabled
from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
from megatron.core.transformer.enums import AttnMaskType


def cuda_time_ms(fn, iters=10, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth_gbs(nbytes=1 << 30):
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), iters=20)
    return 2 * nbytes / ms / 1e6


def fwd_bwd(fn, inputs, grad):
    """Closure running fn(*inputs) and its backward w.r.t. the first input."""
    def run():
        out = fn(*inputs)
        torch.autograd.grad(out, inputs[0], grad)
    return run


def compiled(fn):
    return torch.compile(fn, dynamic=False)


def softmax_cases(quick):
    mask_func = lambda s, m: s.masked_fill(m, -10000.0)
    shapes = [(2, 8, 1024)] if quick else [(8, 32, 2048), (2, 32, 4096), (1, 4, 16384)]
    for b, np_, s in shapes:
        n = b * np_ * s * s
        x = torch.randn(b, np_, s, s, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn_like(x)
        for kind in ("causal", "padding"):
            mtype = AttnMaskType.causal if kind == "causal" else AttnMaskType.padding
            mod = FusedScaleMaskSoftmax(False, True, mtype, True, mask_func, True, 0.125)
            mask = None
            if kind == "padding":
                mask = torch.rand(b, 1, s, s, device="cuda") < 0.1
            # minimal bytes: causal reads the lower triangle and writes all; padding reads the mask once
            if kind == "causal":
                nbytes = 2 * (0.5 * n + n) + 2 * (n + n)
            else:
                nbytes = 2 * 2 * n + mask.numel() + 2 * 3 * n
            yield (f"softmax_{kind}", f"b={b} np={np_} s={s} bf16", nbytes, {
                "fused": fwd_bwd(mod, (x, mask), g) if mod.is_kernel_available(mask, b, np_, s, s) else None,
                "eager": fwd_bwd(mod.forward_torch_softmax, (x, mask), g),
                "compile": fwd_bwd(compiled(mod.forward_torch_softmax), (x, mask), g),
            })
            del mask
        del x, g


def layer_norm_cases(quick):
    rows = 4096 if quick else 16384
    for hidden in ([1024] if quick else [1024, 2048, 4096, 8192, 12288]):
        ln = FusedLayerNorm(hidden).cuda()
        x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn_like(x)
        nbytes = 2 * rows * hidden * (2 + 3) + 4 * hidden * 5
        yield ("layer_norm", f"rows={rows} h={hidden} bf16, fp32 params", nbytes, {
            "fused": fwd_bwd(ln, (x,), g) if ln.use_kernel(x) else None,
            "eager": fwd_bwd(ln.forward_torch, (x,), g),
            "compile": fwd_bwd(compiled(ln.forward_torch), (x,), g),
        })


def elementwise_cases(quick):
    rows, h = (4096, 4096) if quick else (16384, 16384)
    x = torch.randn(rows, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    n = rows * h

    def gelu_eager(inp, b):
        set_compile_enabled(False)
        try:
            return bias_gelu_impl(inp, b)
        finally:
            set_compile_enabled(True)

    yield ("bias_gelu", f"[{rows}, {h}] bf16", 2 * (2 * n + 3 * n), {
        "fused": None,  # no hand kernel: the module uses torch.compile ("compile" column)
        "eager": fwd_bwd(gelu_eager, (x, bias), g),
        "compile": fwd_bwd(bias_gelu_impl, (x, bias), g),
        "compile_autograd": fwd_bwd(compiled(lambda a, b: bias_gelu(b, a)), (x, bias), g),
    })
    r = torch.randn_like(x)
    bda = lambda a, b, res: bias_dropout_add(a, b, res, 0.1, True)
    yield ("bias_dropout_add", f"[{rows}, {h}] bf16 p=0.1", 2 * (3 * n + 2 * n), {
        "fused": None,
        "eager": fwd_bwd(bda, (x, bias, r), g),
        "compile": fwd_bwd(compiled(bda), (x, bias, r), g),
    })


def gpu_slug():
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name().lower()).strip("_")


def atomic_write(path, text):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp_")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fused_kernels: no CUDA device visible; nothing to measure (run on a GPU machine).")
        return 0
    if not fused_kernels_available():
        print(f"bench_fused_kernels: fused kernels unavailable ({load_error()}); timing baselines only.")
    load_fused_kernels()
    copy_gbs = copy_bandwidth_gbs()
    print(f"device {torch.cuda.get_device_name()}: copy bandwidth {copy_gbs:.0f} GB/s")
    results = []
    for gen in (softmax_cases, layer_norm_cases, elementwise_cases):
        for op, shape, nbytes, impls in gen(args.quick):
            row = {"op": op, "shape": shape, "bytes": nbytes, "ms": {}, "gbs": {}, "frac_copy": {}}
            for name, fn in impls.items():
                if fn is None:
                    continue
                try:
                    ms = cuda_time_ms(fn)
                except Exception as exc:  # e.g. torch.compile unavailable: record and go on
                    row["ms"][name] = f"error: {type(exc).__name__}: {str(exc)[:120]}"
                    continue
                row["ms"][name] = round(ms, 4)
                row["gbs"][name] = round(nbytes / ms / 1e6, 1)
                row["frac_copy"][name] = round(nbytes / ms / 1e6 / copy_gbs, 3)
            print(json.dumps(row))
            results.append(row)
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "copy_gbs": round(copy_gbs, 1), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": args.quick}
    base = os.path.join(args.out, f"fused_kernels_{gpu_slug()}")
    atomic_write(base + ".json", json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    lines = [f"# Fused kernels on {meta['device']}", "",
             f"torch {meta['torch']}, CUDA {meta['cuda']}, copy bandwidth {meta['copy_gbs']} GB/s, {meta['date']}.",
             "Forward + backward, median ms; GB/s = minimal bytes moved / time; frac = GB/s / copy GB/s.", "",
             "| op | shape | impl | ms | GB/s | frac of copy |", "|---|---|---|---|---|---|"]
    for row in results:
        for name, ms in row["ms"].items():
            lines.append(f"| {row['op']} | {row['shape']} | {name} | {ms} | {row['gbs'].get(name, '')} | "
                         f"{row['frac_copy'].get(name, '')} |")
    atomic_write(base + ".md", "\n".join(lines) + "\n")
    print(f"wrote {base}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
