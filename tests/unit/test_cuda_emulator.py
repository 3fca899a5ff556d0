"""The fused CUDA kernels (csrc/fused/*.cu), run on a CPU emulator of the CUDA execution model.

CI has no GPU, so the kernels' logic is executed here instead: tests/cuda_emu/build.py compiles the
unchanged .cu sources with g++ against an emulator of threads, blocks, __syncthreads and warp
shuffles (tests/cuda_emu/include/emu_cuda.h), and tests/cuda_emu/check_kernels.cpp runs every
launcher of csrc/fused/fused_kernels.h against float64 references:

* AddressSanitizer + UBSan build, full sweep (129 cases): every (vector width, chunks, threads per
  row) variant, masks, fully masked rows, causal with sq != sk, all layer-norm dtype pairs, rows
  from 1 to 16384 elements, unaligned pointers. Outputs are NaN-poisoned (unwritten elements fail);
  any out-of-bounds access fails.
* ThreadSanitizer build, small shapes: each CUDA thread an OS thread; a missing barrier is a race.
* Mutations: deliberately broken copies of the kernels must fail the check, so it can fail.

Not covered (needs the GPU: tests/unit/test_fused_kernels_gpu.py): the real compiler's code
generation, --use_fast_math approximations, the hardware memory model, speed.
"""

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("cuda_emu_build", ROOT / "tests" / "cuda_emu" / "build.py")
emu_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(emu_build)

needs_cxx = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None,
                               reason="no C++ compiler: the CUDA emulator tests need g++ or clang++")

COMPILED_CHUNKS = {8: {1, 2}, 4: {1, 2, 4}, 1: {1, 4, 16}}  # common.cuh ChunkList<VEC>


_SANITIZER_OK: dict[str, str] = {}


def require_sanitizer(sanitize: str, tmp: Path) -> None:
    """Skips (with the compiler's words) where this toolchain cannot build and run a sanitized program."""
    if sanitize not in _SANITIZER_OK:
        src = tmp / "probe.cpp"
        src.write_text("#include <thread>\nint main() { std::thread([] {}).join(); }\n")
        exe = tmp / f"probe.{sanitize}"
        cmd = [emu_build.find_compiler(), "-pthread", *emu_build.SANITIZE_FLAGS[sanitize], str(src), "-o", str(exe)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
        _SANITIZER_OK[sanitize] = "" if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]
    if _SANITIZER_OK[sanitize]:
        pytest.skip(f"{sanitize} sanitizer unavailable here: {_SANITIZER_OK[sanitize]}")


def run_check(exe: Path, suite: str = "", timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *([suite] if suite else [])], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cuda_emu")


def test_translate_rewrites_every_launch_form():
    src = ("k<<<g, b, 0, s>>>(x, y);\n"
           "softmax_forward_kernel<T, VEC, CH, CAUSAL><<<static_cast<unsigned>(blocks), cfg.block, 0, stream>>>(\n"
           "    a, b);\n"
           "reduce<TW><<<rgrid, rblock, 0, stream>>>(p);")
    out, n = emu_build.translate(src)
    assert n == 3 and "<<<" not in out
    assert "::emu::launch(k, ::emu::LaunchConfig(g, b, 0, s), x, y);" in out
    assert ("::emu::launch(softmax_forward_kernel<T, VEC, CH, CAUSAL>, ::emu::LaunchConfig(static_cast<unsigned>"
            "(blocks), cfg.block, 0, stream), \n    a, b);") in out
    assert "::emu::launch(reduce<TW>, ::emu::LaunchConfig(rgrid, rblock, 0, stream), p);" in out


@needs_cxx
def test_kernels_on_emulator_asan(build_dir):
    require_sanitizer("address", build_dir)
    exe = emu_build.build(build_dir, "address")
    proc = run_check(exe)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    summary = re.search(r"SUMMARY cases=(\d+) failed=(\d+)", out)
    assert summary and int(summary.group(2)) == 0 and int(summary.group(1)) >= 120, out[-4000:]
    assert "ERROR: AddressSanitizer" not in out and "runtime error" not in out
    # every compiled variant was reached, and rows of 32..1024 threads
    configs = re.findall(r"config (\w+) vec=(\d+) chunks=(\d+) tpr=(\d+)", out)
    for kernel in ("softmax", "layer_norm"):
        vecs = (8, 1) if kernel == "softmax" else (8, 4, 1)
        for vec in vecs:
            seen = {int(c) for k, v, c, _ in configs if k == kernel and int(v) == vec}
            assert seen == COMPILED_CHUNKS[vec], (kernel, vec, seen)
        tprs = {int(t) for k, _, _, t in configs if k == kernel}
        assert tprs == {32, 64, 128, 256, 512, 1024}, (kernel, tprs)


@needs_cxx
def test_kernels_on_emulator_tsan(build_dir):
    require_sanitizer("thread", build_dir)
    exe = emu_build.build(build_dir, "thread")
    proc = run_check(exe, "race")
    out = proc.stdout + proc.stderr
    assert "ThreadSanitizer" not in out, out[-8000:]
    assert proc.returncode == 0 and "SUMMARY cases=6 failed=0" in out, out[-4000:]


# (name, sanitizer, suite, {file: [(old, new)]}, what the check must report)
MUTATIONS = [
    ("missing barrier before smem reuse", "thread", "race",
     {"common.cuh": [("__syncthreads();  // smem may be reused", "// smem may be reused")]}, "data race"),
    ("causal mask off by one", "none", "softmax",
     {"softmax.cu": [("valid = qi + (sk - sq) + 1;", "valid = qi + (sk - sq) + 2;")]}, "FAIL causal_softmax"),
    ("store past the row end", "address", "softmax",
     {"softmax.cu": [("if (active && col < sk) {", "if (active && col <= sk) {")]}, "heap-buffer-overflow"),
    ("masked triangle left unwritten", "none", "softmax",
     {"softmax.cu": [("if (active && col < sk) {", "if (active && col < valid) {")]}, "not written (NaN)"),
    ("threads exit before the block reduction", "none", "layer_norm",
     {"layer_norm.cu": [("  const float mean = row_reduce(",
                         "  if (!active) return;\n  const float mean = row_reduce(")]},
     "of its threads exited"),
]


@needs_cxx
@pytest.mark.parametrize("name,sanitize,suite,mutation,expected", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_broken_kernels_fail_the_check(build_dir, name, sanitize, suite, mutation, expected):
    require_sanitizer(sanitize, build_dir)
    exe = emu_build.build(build_dir, sanitize, mutation)
    proc = run_check(exe, suite)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"{name}: the broken kernel passed:\n{out[-3000:]}"
    assert expected in out, f"{name}: expected {expected!r} in:\n{out[-3000:]}"
