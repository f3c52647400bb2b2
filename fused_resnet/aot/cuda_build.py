"""Compiling the CUDA C++ kernels for a GPU that is not here.

The kernels in csrc/cuda (and csrc/cutlass_conv, when CUTLASS's headers are given) are
torch-free: nvcc compiles each file alone in seconds. One nvcc run per file gives both the PTX
(kept from the compilation, --keep) and the ptxas resource report (-Xptxas -v) of every
kernel entry.
"""

import glob
import os
import re
import shutil
import subprocess
import tempfile
from typing import Iterator, List, Optional

from fused_resnet.aot import ptx as ptx_tools

# What setup.py gives nvcc for these files (the fp16/bf16 operators CUTLASS relies on, relaxed
# constexpr); torch's own flags don't matter to torch-free sources.
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr",
              "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"]


def find_nvcc() -> Optional[str]:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = os.path.join(home, "bin", "nvcc")
    return candidate if os.path.exists(candidate) else shutil.which("nvcc")


def sources(csrc: str, cutlass_include: Optional[str]) -> List[str]:
    found = sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
    if cutlass_include:
        found += sorted(glob.glob(os.path.join(csrc, "cutlass_conv", "*.cu")))
    return found


def demangle(names: List[str]) -> List[str]:
    """Readable C++ names. llvm-cxxfilt first: binutils' c++filt gives up on the very long
    symbols of CUTLASS kernels (and returns them unchanged); a name no tool demangles is
    spelled from its source-name parts (see _spelled)."""
    if not names:
        return names
    for tool in ("llvm-cxxfilt", "c++filt"):
        path = shutil.which(tool)
        if path is None:
            continue
        out = subprocess.run([path], input="\n".join(names), capture_output=True, text=True)
        lines = out.stdout.splitlines()
        if len(lines) == len(names):
            return [line if not line.startswith("_Z") else _spelled(line) for line in lines]
    return [_spelled(name) for name in names]


def _spelled(mangled: str) -> str:
    """A readable stand-in for an Itanium-mangled name from its identifiers (each written
    <length><identifier>): enough to read its family and element type."""
    parts, i = [], 0
    while i < len(mangled):
        digits = re.match(r"\d+", mangled[i:])
        if not digits:
            i += 1
            continue
        n, start = int(digits.group(0)), i + len(digits.group(0))
        word = mangled[start:start + n]
        if len(word) == n and re.fullmatch(r"[A-Za-z_]\w*", word):
            parts.append(word)
            i = start + n
        else:
            i = start
    if len(parts) < 2:
        return mangled
    # the function, then its template's type-like names (namespaces are lower-case words)
    types = [p for p in parts[2:] if p[0].isupper() or p.endswith("_t") or p.startswith("__")]
    return f"{parts[0]}::{parts[1]}<{', '.join(types)}>(...)"


def element_type(demangled: str) -> str:
    """fp16 / bf16 / fp32 from a kernel's template arguments ("" if none is named)."""
    for token, name in (("__nv_bfloat16", "bf16"), ("bfloat16_t", "bf16"), ("__half", "fp16"),
                        ("half_t", "fp16"), ("float", "fp32")):
        if re.search(rf"(?<![A-Za-z0-9]){token}(?![A-Za-z0-9_])", demangled):
            return name
    return ""


def compile_source(path: str, csrc: str, capability: int, nvcc: str,
                   cutlass_include: Optional[str]) -> Iterator[dict]:
    """One row per kernel entry of `path`: name, PTX, registers, spills."""
    includes = ["-I", csrc] + (["-I", cutlass_include] if cutlass_include else [])
    with tempfile.TemporaryDirectory() as keep:
        cmd = [nvcc, f"-gencode=arch=compute_{capability},code=sm_{capability}", "-cubin",
               "-Xptxas", "-v", "--keep", "--keep-dir", keep, *NVCC_FLAGS, *includes, path,
               "-o", os.path.join(keep, "out.cubin")]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"nvcc failed on {path}:\n{run.stderr[-4000:]}")
        ptx_files = glob.glob(os.path.join(keep, "*.ptx"))
        ptx = "".join(open(p).read() for p in ptx_files)
    resources = ptx_tools.ptxas_resources(run.stderr)
    entries = list(ptx_tools.entries(ptx))
    readable = demangle([name for name, _ in entries])
    for (name, text), pretty in zip(entries, readable):
        yield {"entry": name, "demangled": pretty, "ptx": text,
               **resources.get(name, {"registers": 0, "spill_stores": 0, "spill_loads": 0,
                                      "stack_frame": 0})}
