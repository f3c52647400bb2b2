"""Benchmark setup: every row records the device, versions and date (pytest-benchmark's
extra_info), so a JSON file stands on its own."""

import datetime
import platform

import pytest
import torch


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"cpu: {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def environment(device: str) -> dict:
    import fused_resnet

    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "fused_resnet": fused_resnet.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


@pytest.fixture(scope="session")
def bench_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def copy_bandwidth_gbps(bench_device):
    """Measured device copy bandwidth (read + write bytes per second), the memory-bound
    ceiling the fused kernels are compared with. GPU only."""
    if bench_device != "cuda":
        return None
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    reps = 20
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / reps
    return 2 * src.numel() * src.element_size() / seconds / 1e9
