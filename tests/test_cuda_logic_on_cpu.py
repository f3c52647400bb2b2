"""The CUDA kernels cannot run here, but the logic that splits their per-channel reductions
across blocks and lanes (csrc/common/reduce_plan.h) and their per-group math
(csrc/common/bn_add_relu_math.h) is __host__ __device__: this compiles
tests/cpp/cuda_reduce_sim.cpp, which runs those functions on the CPU exactly as the kernels
compose them, and checks coverage, offsets, merge order and results against float64.

Where nvcc is present it also compiles csrc/cuda/bn_add_relu.cu (no GPU needed) and checks what
only the compiled code shows: the reductions read 16-byte vectors, their vector loops divide at
most once per group of items rather than per element, and no kernel spills registers."""

import os
import re
import shutil
import subprocess

import pytest

from native_tools import nvcc, run_cpp_simulation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "csrc", "cuda", "bn_add_relu.cu")


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
def test_cuda_reduction_plan_simulated_on_cpu(tmp_path):
    run_cpp_simulation("cuda_reduce_sim", tmp_path, timeout=300)


needs_nvcc = pytest.mark.skipif(nvcc() is None, reason="no CUDA toolkit (nvcc)")


def _nvcc_run(*args):
    result = subprocess.run([nvcc(), "-O3", "-std=c++17", "-I", os.path.join(ROOT, "csrc"),
                             KERNELS, *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def reduce_entries(tmp_path_factory):
    """PTX text of each reduce_partial_kernel entry for sm_90, by mangled name."""
    ptx = tmp_path_factory.mktemp("ptx") / "bn_add_relu.ptx"
    _nvcc_run("-arch=sm_90", "--ptx", "-o", str(ptx))
    entries = re.split(r"\n(?=(?:\.visible |\.weak )?\.entry )", ptx.read_text())
    found = {}
    for text in entries:
        name = re.match(r"(?:\.visible |\.weak )?\.entry (\w+)", text)
        if name and "reduce_partial_kernel" in name.group(1):
            found[name.group(1)] = text
    assert found, "no reduce_partial_kernel in the PTX"
    return found


def _loops(ptx):
    """Bodies of the loops of a PTX function: from a label to a branch back to it."""
    lines = ptx.splitlines()
    labels = {}
    for i, line in enumerate(lines):
        label = re.match(r"^(\$L\w+):$", line.strip())
        if label:
            labels[label.group(1)] = i
        branch = re.search(r"\bbra(?:\.uni)?\s+(\$L\w+);", line)
        if branch and labels.get(branch.group(1), i) < i:
            yield "\n".join(lines[labels[branch.group(1)]:i + 1])


VECTOR_LOAD = re.compile(r"\bld\.global(?:\.nc)?\.v4\.(?:u32|b32|s32|f32)")
DIVISION = re.compile(r"\b(?:div\.(?:rn|full|approx)[.\w]*\.f32|rcp\.[.\w]*f32)")


@needs_nvcc
def test_reductions_read_16_byte_vectors(reduce_entries):
    for dtype in ("6__half", "13__nv_bfloat16", "f"):
        names = [n for n in reduce_entries if re.search(rf"Accumulate(?:I{dtype}E)", n)]
        assert len(names) == 2, (dtype, list(reduce_entries))  # stats and gradient sums
        for name in names:
            assert VECTOR_LOAD.search(reduce_entries[name]), f"{name}: no 16-byte vector loads"


@needs_nvcc
def test_vector_loops_divide_at_most_once_per_group(reduce_entries):
    for name, ptx in reduce_entries.items():
        vector_loops = [body for body in _loops(ptx) if VECTOR_LOAD.search(body)]
        assert vector_loops, f"{name}: no loop over vectors"
        for body in vector_loops:
            assert len(DIVISION.findall(body)) <= 1, f"{name}: a vector loop divides per element"


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_kernels_compile_without_spills(arch):
    log = _nvcc_run(f"-arch={arch}", "-cubin", "-Xptxas", "-v", "-o", os.devnull).stderr
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert spills, log
    assert all(stores == "0" and loads == "0" for stores, loads in spills), log
