"""Build the fused CUDA kernels (csrc/fused/*.cu) for the CPU CUDA emulator, with g++ and a sanitizer.

The .cu sources are compiled unchanged except for one rewrite: each `kernel<<<grid, block, smem,
stream>>>(args)` launch becomes `::emu::launch(kernel, ::emu::LaunchConfig(grid, block, smem, stream),
args)`. The emulator's headers (include/) stand in for cuda_runtime.h, cuda_fp16.h and cuda_bf16.h.
The result is linked with check_kernels.cpp, which runs every launcher of csrc/fused/fused_kernels.h
against float64 references. See include/emu_cuda.h for what is and is not modelled.

    python tests/cuda_emu/build.py OUT_DIR [--sanitize address|thread|none]   # prints the executable
"""

import argparse
import hashlib
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FUSED = ROOT / "csrc" / "fused"

# kernel or kernel<targs>, then <<<config>>>( ; template arguments hold no '<', '>' or parentheses.
LAUNCH = re.compile(r"(\b[A-Za-z_]\w*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)

SANITIZE_FLAGS = {
    "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"],
    "thread": ["-fsanitize=thread"],
    "none": [],
}


def translate(source: str) -> tuple[str, int]:
    """Rewrites the <<<>>> launches of a .cu source for the emulator; returns (text, launches)."""
    return LAUNCH.subn(r"::emu::launch(\1, ::emu::LaunchConfig(\2), ", source)


def find_compiler() -> str:
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        raise FileNotFoundError("no C++ compiler (g++ or clang++) on PATH")
    return cxx


def build(out_dir: Path, sanitize: str = "address", mutations: dict[str, list[tuple[str, str]]] | None = None) -> Path:
    """Translates and compiles csrc/fused/*.cu plus check_kernels.cpp; returns the executable.

    mutations: {file name in csrc/fused: [(old, new), ...]}, each `old` replaced once, to check that a
    deliberately broken kernel fails (the tests' proof that the check can fail). Objects are cached in
    out_dir by content and flags, so rebuilding after a mutation recompiles only what it changed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    mutations = dict(mutations or {})
    cxx = find_compiler()
    flags = ["-std=c++20", "-O1", "-g", "-fno-omit-frame-pointer", "-pthread", "-Wall", "-Wno-unknown-pragmas",
             "-Werror", f"-I{HERE / 'include'}", f"-I{FUSED}", *SANITIZE_FLAGS[sanitize]]
    headers = {}  # mutated headers, included from the build dir ahead of csrc/fused
    for path in sorted(FUSED.iterdir()):
        if path.suffix in (".cuh", ".h") and path.name in mutations:
            headers[path.name] = _mutate(path.name, path.read_text(), mutations.pop(path.name))
    build_dir = out_dir / hashlib.sha256(repr(sorted(headers.items())).encode()).hexdigest()[:12]
    build_dir.mkdir(exist_ok=True)
    for name, text in headers.items():
        (build_dir / name).write_text(text)
    sources = [HERE / "check_kernels.cpp"]
    for cu in sorted(FUSED.glob("*.cu")):
        text, launches = translate(_mutate(cu.name, cu.read_text(), mutations.pop(cu.name, [])))
        if "<<<" in text:
            raise ValueError(f"{cu}: a kernel launch the emulator rewrite does not recognise")
        if launches == 0:
            raise ValueError(f"{cu}: no kernel launch found")
        dst = build_dir / f"{cu.stem}_emu.cpp"
        dst.write_text(f'#line 1 "{cu}"\n' + text)
        sources.append(dst)
    if mutations:
        raise ValueError(f"mutations name files that are not in {FUSED}: {sorted(mutations)}")

    def compile_one(src: Path) -> Path:
        key = hashlib.sha256((src.read_text() + repr(flags) + repr(sorted(headers.items()))).encode()).hexdigest()
        obj = out_dir / f"{src.stem}.{sanitize}.{key[:16]}.o"
        if obj.exists():
            return obj
        cmd = [cxx, *flags, f"-I{build_dir}", "-c", str(src), "-o", str(obj) + ".tmp"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {src.name} for the emulator failed:\n{proc.stderr[-6000:]}")
        Path(str(obj) + ".tmp").rename(obj)
        return obj

    with ThreadPoolExecutor(max_workers=2) as pool:
        objects = list(pool.map(compile_one, sources))
    exe = build_dir / f"check_kernels.{sanitize}"
    proc = subprocess.run([cxx, *flags, *map(str, objects), "-o", str(exe)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"linking the emulator check failed:\n{proc.stderr[-6000:]}")
    return exe


def _mutate(name: str, text: str, replacements: list[tuple[str, str]]) -> str:
    for old, new in replacements:
        if old not in text:
            raise ValueError(f"mutation of {name}: {old!r} not found")
        text = text.replace(old, new, 1)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--sanitize", choices=sorted(SANITIZE_FLAGS), default="address")
    args = parser.parse_args()
    print(build(args.out_dir, args.sanitize))


if __name__ == "__main__":
    main()
