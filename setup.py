"""Build script: the C++ dataset helpers always, the fused CUDA kernels when CUDA is available.

* ``megatron.core.datasets.helpers_cpp`` (pybind11, from ``csrc/helpers.cpp``) is always built.
* ``megatron_fused_kernels`` (from ``csrc/fused/*.cu``) is built when a CUDA-enabled torch and nvcc
  are present, or forced with ``MEGATRON_BUILD_CUDA=1`` (``=0`` skips it). Architectures come
  from ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0``). Without CUDA the install still succeeds
  and the pure-torch fallbacks in ``megatron/core/fusions`` are used.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _helpers_extension():
    from pybind11.setup_helpers import Pybind11Extension

    src = os.path.join("csrc", "helpers.cpp")
    if not os.path.exists(os.path.join(ROOT, src)):
        return []
    return [
        Pybind11Extension(
            "megatron.core.datasets.helpers_cpp",
            [src],
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    ]


def _want_cuda():
    flag = os.environ.get("MEGATRON_BUILD_CUDA")
    if flag == "0":
        return False
    try:
        import torch
    except ImportError:
        if flag == "1":
            sys.exit("MEGATRON_BUILD_CUDA=1 but torch is not importable; install torch first "
                     "and build with --no-build-isolation")
        return False
    has_cuda = torch.version.cuda is not None and shutil.which("nvcc") is not None
    if flag == "1" and not has_cuda:
        sys.exit("MEGATRON_BUILD_CUDA=1 needs a CUDA-enabled torch and nvcc on PATH "
                 f"(torch.version.cuda={torch.version.cuda}, nvcc={shutil.which('nvcc')})")
    return has_cuda


def _cuda_extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "fused", "*.cu"))
                     + glob.glob(os.path.join("csrc", "fused", "*.cpp")))
    if not sources or not _want_cuda():
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = CUDAExtension(
        "megatron_fused_kernels",
        sources,
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--use_fast_math", "-U__CUDA_NO_HALF_OPERATORS__",
                     "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__",
                     "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "--expt-relaxed-constexpr"],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


def main():
    ext_modules = _helpers_extension()
    cuda_exts, cmdclass = _cuda_extensions()
    ext_modules += cuda_exts
    setup(ext_modules=ext_modules, cmdclass=cmdclass)


if __name__ == "__main__":
    main()
