"""The CUDA kernels cannot run here, but the logic that splits their per-channel reductions
across blocks and lanes (csrc/common/reduce_plan.h) is __host__ __device__: this compiles
tests/cpp/cuda_reduce_sim.cpp, which runs those functions on the CPU exactly as the kernels
compose them, and checks coverage, offsets, merge order and results against float64."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
def test_cuda_reduction_plan_simulated_on_cpu(tmp_path):
    binary = tmp_path / "cuda_reduce_sim"
    subprocess.run(["g++", "-std=c++17", "-O2", "-Wall", "-Werror",
                    "-I", os.path.join(ROOT, "csrc"),
                    os.path.join(ROOT, "tests", "cpp", "cuda_reduce_sim.cpp"), "-o", str(binary)],
                   check=True, capture_output=True, text=True)
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(" 0 failed"), result.stdout
