"""Helpers for the tests that build native code on this machine: the CUDA toolkit's nvcc, and
the C++ simulations under tests/cpp/ (host-side copies of the CUDA kernels' index logic)."""

import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nvcc():
    """Path of nvcc (CUDA_HOME, else /usr/local/cuda, else PATH), or None."""
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    candidate = os.path.join(home, "bin", "nvcc")
    return candidate if os.path.exists(candidate) else shutil.which("nvcc")


def run_cpp_simulation(name: str, tmp_path, timeout: int) -> str:
    """Compile tests/cpp/<name>.cpp against csrc/ with warnings as errors, run it in tmp_path
    and return its output, asserting it ran clean and reported no failed check."""
    binary = tmp_path / name
    subprocess.run(["g++", "-std=c++17", "-O2", "-Wall", "-Werror",
                    "-I", os.path.join(ROOT, "csrc"),
                    os.path.join(ROOT, "tests", "cpp", f"{name}.cpp"), "-o", str(binary)],
                   check=True, capture_output=True, text=True)
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=timeout,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(" 0 failed"), result.stdout
    return result.stdout
