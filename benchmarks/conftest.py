"""Benchmark setup: every row records the device, versions and date (pytest-benchmark's
extra_info), so a JSON file stands on its own.

FUSED_RESNET_BENCH_TINY=1: every suite takes tiny shapes instead of its GPU / CPU lists (the
dry run of benchmarks/gpu_session.sh: the same code paths, done in seconds on a CPU)."""

import os

import pytest
import torch

from fused_resnet.bench import environment as env
from fused_resnet.bench.environment import environment


@pytest.fixture(scope="session")
def bench_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def copy_bandwidth_gbps(bench_device):
    """Measured device copy bandwidth (read + write bytes per second), the memory-bound
    ceiling the fused kernels are compared with. GPU only."""
    if bench_device != "cuda":
        return None
    return env.copy_bandwidth_gbps(bench_device)


def gpu() -> bool:
    return torch.cuda.is_available()


def tiny() -> bool:
    """FUSED_RESNET_BENCH_TINY=1: tiny shapes (a smoke run of the suites, not a measurement)."""
    return os.environ.get("FUSED_RESNET_BENCH_TINY", "0") == "1"


def with_triton(names: list) -> list:
    """names, plus the forced Triton provider where a GPU can run it."""
    from fused_resnet import backend

    if gpu() and backend.why_not("triton", "cuda") is None:
        return names + ["fused-triton"]
    return names


def time_and_record(benchmark, step, device: str, images: int, **info):
    """Warm up, time `step` (synchronized on a GPU) with pytest-benchmark, record the
    environment, `info` and images/s in the row. Returns the median seconds (None under
    --benchmark-disable, where the step still ran: a correctness smoke test)."""
    def synced():
        step()
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        synced()
    benchmark.pedantic(synced, rounds=20 if device == "cuda" else 5, iterations=1,
                       warmup_rounds=1)
    if benchmark.stats is None:
        return None
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(environment(device))
    benchmark.extra_info.update(info, images_per_s=images / seconds)
    return seconds
