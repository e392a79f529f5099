"""Builds the optional compiled kernels ``sparsebert._C``.

Always: the CPU kernels (``csrc/cpu``). With a CUDA build of torch and nvcc (``CUDA_HOME``):
also the CUDA kernels (``csrc/cuda``). Switches (environment):

* ``SPARSEBERT_NO_EXTENSION=1``  install pure Python (reference + Triton backends only)
* ``SPARSEBERT_SKIP_CUDA=1``     build only the CPU kernels even where CUDA is available
* ``SPARSEBERT_SKIP_CPU=1``      leave out the CPU kernels (a quicker build on a GPU machine)
* ``TORCH_CUDA_ARCH_LIST``, ``MAX_JOBS``, ``CUDA_HOME``  honoured as by torch.utils.cpp_extension;
  with no GPU visible and no ``TORCH_CUDA_ARCH_LIST`` the CUDA kernels are built for ``8.0;9.0a``

Install with ``pip install --no-build-isolation -e .`` so the extension builds against the torch
that will run it.
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("SPARSEBERT_NO_EXTENSION"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("sparsebert: torch not importable at build time; installing without sparsebert._C "
              "(use pip install --no-build-isolation)", file=sys.stderr)
        return [], {}

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = rel("csrc/module.cpp") + ([] if _flag("SPARSEBERT_SKIP_CPU") else rel("csrc/cpu/*.cpp"))
    # --- CPU flags (csrc/cpu owns this list) ---
    # Baseline ISA on purpose (no -march): the AVX-512 / AVX2 kernels are separate translation
    # units (csrc/cpu/bsr_cpu_isa_*.cpp, `#pragma GCC target`) picked by CPUID at run time, so
    # the wheel runs on any x86-64 and still uses AVX-512 on the Xeon dev/CI machines.
    # -ffp-contract=fast: -std=c++17 (ISO mode) would otherwise forbid fusing a*b+c into FMA.
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=fast"]
    ldflags = ["-fopenmp"]
    defines = []

    with_cuda = (
        not _flag("SPARSEBERT_SKIP_CUDA")
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and bool(rel("csrc/cuda/*.cu"))
    )
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # torch derives the arch list from the visible GPUs and fails deep inside
            # _get_cuda_arch_flags when there are none (a build machine, CI): build for the
            # GPUs the kernels are written for (A100, H100/H200; 9.0a enables wgmma).
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0a"
            print("sparsebert: no GPU visible: building the CUDA kernels for TORCH_CUDA_ARCH_LIST=8.0;9.0a",
                  file=sys.stderr)
        sources += rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")
        defines.append(("SPARSEBERT_WITH_CUDA", None))
        # --- CUDA flags (csrc/cuda owns this list) ---
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
                "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "--expt-relaxed-constexpr"]
        # ATen/cuda/CUDAContext.h (bsr_cuda.cpp) includes cublas_v2.h / cusparse.h, which a bare
        # toolkit may lack but the pip wheels torch depends on ship (site-packages/nvidia/cu*/include).
        # -idirafter: searched last, so CUDA_HOME's own headers always win.
        # torch >= 2.14's headers need C++20 (TorchVersion compares as a version, not a string).
        cxx_std = "-std=c++20" if torch.torch_version.TorchVersion(torch.__version__) >= (2, 14) else "-std=c++17"
        cuda_cxx = [f for f in cxx if not f.startswith("-std=")] + [cxx_std]
        try:
            import nvidia
            for base in getattr(nvidia, "__path__", []):
                for inc in sorted(glob.glob(os.path.join(base, "cu*", "include"))):
                    cuda_cxx += ["-idirafter", inc]
        except ImportError:
            pass
        ext = cpp_extension.CUDAExtension(
            "sparsebert._C", sources, define_macros=defines,
            extra_compile_args={"cxx": cuda_cxx, "nvcc": nvcc}, extra_link_args=ldflags)
    else:
        if torch.version.cuda is not None and cpp_extension.CUDA_HOME is None:
            print("sparsebert: CUDA torch but no nvcc/CUDA_HOME: building CPU kernels only", file=sys.stderr)
        ext = cpp_extension.CppExtension(
            "sparsebert._C", sources, define_macros=defines,
            extra_compile_args={"cxx": cxx}, extra_link_args=ldflags)
    return [ext], {"build_ext": _build_ext_class(cpp_extension.BuildExtension)}


def _build_ext_class(base):
    class BuildExtension(base):
        """torch's BuildExtension, plus a check that the result uses the shared C++ runtime."""

        def build_extension(self, ext):
            super().build_extension(ext)
            _check_shared_libstdcxx(self.get_ext_fullpath(ext.name))

    return BuildExtension.with_options(use_ninja=True)


def _check_shared_libstdcxx(path):
    """Refuse an extension that carries its own copy of libstdc++.

    Some compilers link libstdc++ statically (seen: a /opt/gcc g++ wrapper set as CC/CXX on a GPU
    image). Then a TORCH_CHECK failure inside our ops throws through a second C++ runtime and the
    process dies with a segmentation fault instead of raising a RuntimeError.
    """
    import shutil
    import subprocess

    nm = shutil.which("nm")
    if nm is None or not os.path.exists(path):
        return
    out = subprocess.run([nm, "-D", "--defined-only", path], capture_output=True, text=True).stdout
    if any(line.split()[-1:] == ["__cxa_throw"] for line in out.splitlines()):
        os.remove(path)
        cxx = os.environ.get("CXX", "the default C++ compiler")
        raise RuntimeError(
            f"sparsebert._C was linked with a static libstdc++ by {cxx}: C++ errors raised by its "
            "input checks would crash Python instead of raising. Rebuild with a compiler that links "
            "libstdc++ dynamically, e.g. CC=gcc CXX=g++ (the system compiler).")


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
