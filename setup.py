"""Build fused_resnet and its C++/CUDA extension fused_resnet._C.

What gets built is decided from the environment, never from whether a GPU is visible, so a
GPU-less machine with a CUDA toolkit builds the CUDA kernels too:

- C++ CPU kernels: always.
- CUDA kernels: when a CUDA toolkit (nvcc under CUDA_HOME) and a CUDA build of torch are present,
  unless FUSED_RESNET_SKIP_CUDA=1.
- CUTLASS conv kernels (csrc/cutlass_conv/): with the CUDA kernels, when the CUTLASS headers
  are found (the pinned nvidia-cutlass wheel's cutlass_library/source/include, or
  FUSED_RESNET_CUTLASS_INCLUDE), unless FUSED_RESNET_SKIP_CUTLASS=1.
- Architectures: TORCH_CUDA_ARCH_LIST if set, else sm_80 and sm_90 (plus PTX for newer GPUs).
- Parallel compile jobs: MAX_JOBS (read by torch's BuildExtension / ninja).
- Source stamp: a hash of csrc/ and this file (fused_resnet/_build_stamp.py), compiled into _C
  from a generated one-line source in the build directory, so fused_resnet.info() can say which
  sources the installed _C was built from (benchmarks/gpu_session.sh rebuilds only when the
  tree's stamp differs). Only that generated file recompiles when the stamp changes.
"""

import glob
import importlib.util
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _log(msg):
    print(f"[fused_resnet build] {msg}", flush=True)


def _load_build_stamp():
    """fused_resnet/_build_stamp.py by path: the package itself is not importable while it is
    being built (and needs no import to compute a stamp)."""
    spec = importlib.util.spec_from_file_location(
        "_fused_resnet_build_stamp", os.path.join(ROOT, "fused_resnet", "_build_stamp.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _default_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`; a wrapper script in /usr/local/bin makes it guess
    /usr/local, which has no CUDA libraries. Prefer the conventional toolkit directory."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for candidate in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = candidate
            return


def _cuda_decision():
    """Return (build_cuda, reason)."""
    if os.environ.get("FUSED_RESNET_SKIP_CUDA", "0") == "1":
        return False, "FUSED_RESNET_SKIP_CUDA=1"
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    cuda_home = cpp_extension.CUDA_HOME
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return False, "no CUDA toolkit found (set CUDA_HOME to a directory with bin/nvcc)"
    return True, f"CUDA toolkit at {cuda_home}, torch built with CUDA {torch.version.cuda}"


def _cutlass_include():
    """(include directory or None, reason)."""
    if os.environ.get("FUSED_RESNET_SKIP_CUTLASS", "0") == "1":
        return None, "FUSED_RESNET_SKIP_CUTLASS=1"
    candidates = []
    if os.environ.get("FUSED_RESNET_CUTLASS_INCLUDE"):
        candidates.append(os.environ["FUSED_RESNET_CUTLASS_INCLUDE"])
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")  # located, not imported
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.append(os.path.join(location, "source", "include"))
    for include in candidates:
        if os.path.exists(os.path.join(include, "cutlass", "cutlass.h")):
            return include, f"headers at {include}"
    return None, "CUTLASS headers not found (pip install nvidia-cutlass==4.2.0.0 --no-deps)"


def _extensions():
    _default_cuda_home()
    import torch
    from torch.utils import cpp_extension

    build_cuda, reason = _cuda_decision()
    cpu_sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", f"-DFR_TORCH_VERSION={torch.__version__}"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for expands to OpenMP pragmas in our own sources: without -fopenmp the
        # CPU kernels would run on one thread.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    _log(f"C++ CPU kernels: yes ({', '.join(cpu_sources)})")
    if not build_cuda:
        _log(f"CUDA kernels: no ({reason})")
        return [
            cpp_extension.CppExtension(
                "fused_resnet._C",
                cpu_sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=link_flags,
            )
        ]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    _log(f"CUDA kernels: yes ({reason}); arch list {os.environ['TORCH_CUDA_ARCH_LIST']}; "
         f"sources {', '.join(cuda_sources)}")
    defines = ["-DFR_WITH_CUDA=1"]
    # torch's defaults hide the fp16/bf16 operators CUTLASS's numeric types rely on
    nvcc_flags = ["-O3", "-lineinfo", "-U__CUDA_NO_HALF_OPERATORS__",
                  "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                  "-U__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
    cutlass_include, cutlass_reason = _cutlass_include()
    if cutlass_include is not None:
        cutlass_sources = sorted(glob.glob("csrc/cutlass_conv/*.cu")) + \
            sorted(glob.glob("csrc/cutlass_conv/*.cpp"))
        cuda_sources += cutlass_sources
        include_dirs.append(cutlass_include)
        defines.append("-DFR_WITH_CUTLASS=1")
    _log(f"CUTLASS conv kernels: {'yes' if cutlass_include else 'no'} ({cutlass_reason})")
    return [
        cpp_extension.CUDAExtension(
            "fused_resnet._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            extra_link_args=link_flags,
            extra_compile_args={
                "cxx": cxx_flags + defines,
                # No --use_fast_math: BN statistics need IEEE division and rsqrt.
                "nvcc": nvcc_flags + defines,
            },
        )
    ]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    use_ninja = shutil.which("ninja") is not None or _has_ninja_module()
    if not use_ninja:
        _log("ninja not found: compiling sources one at a time")

    class BuildWithStamp(BuildExtension):
        """torch's BuildExtension, plus the source stamp compiled into _C from a generated
        file in the build directory (rewritten only when the stamp changes)."""

        def build_extensions(self):
            stamps = _load_build_stamp()
            stamp = stamps.source_stamp(ROOT)
            path = os.path.abspath(os.path.join(self.build_temp, "fused_resnet_source_stamp.cpp"))
            text = stamps.stamp_source(stamp)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if not os.path.exists(path) or open(path).read() != text:
                with open(path, "w") as f:
                    f.write(text)
            for ext in self.extensions:
                if ext.name == "fused_resnet._C" and path not in ext.sources:
                    ext.sources.append(path)
            _log(f"source stamp {stamp} (csrc/ and setup.py)")
            super().build_extensions()

    return {"build_ext": BuildWithStamp.with_options(use_ninja=use_ninja)}


def _has_ninja_module():
    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    return True


setup(
    packages=["fused_resnet", "fused_resnet.ops", "fused_resnet.modules", "fused_resnet.bench",
              "fused_resnet.bench.roofline", "fused_resnet.aot", "fused_resnet.kernels"],
    package_dir={"fused_resnet.kernels": "kernels"},
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    zip_safe=False,
)
