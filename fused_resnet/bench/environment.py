"""What a benchmark row must carry to stand on its own (device, versions, date) and the
device's measured ceilings (copy bandwidth, matmul rate) that the floors are computed from."""

import datetime
import platform
import time

import torch


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = _cpu_model()
    return f"cpu: {model + ', ' if model else ''}{platform.processor() or platform.machine()} " \
        f"({torch.get_num_threads()} threads)"


def _cpu_model() -> str:
    """The CPU's model name where Linux says it (/proc/cpuinfo), else "": on the same shared
    machine kind, runs landed on AMD and on Intel CPUs, whose numbers do not compare."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def environment(device: str) -> dict:
    from fused_resnet import __version__

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
        "fused_resnet": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def seconds_per_call(fn, device: str, reps: int) -> float:
    """Mean seconds per call of fn over reps calls (CUDA events on a GPU)."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps
    begin = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - begin) / reps


def copy_bandwidth_gbps(device: str) -> float:
    """Measured copy bandwidth, read + write bytes per second (1 GiB on a GPU, 64 MiB on a
    CPU): the memory-bound ceiling."""
    numel = (1 << 28) if device.startswith("cuda") else (1 << 24)
    src = torch.empty(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    seconds = seconds_per_call(lambda: dst.copy_(src), device, 10)
    return 2 * numel * 4 / seconds / 1e9


def matmul_tflops(device: str, dtype: torch.dtype) -> float:
    """Measured dense matmul rate in `dtype` (8192^3 on a GPU, 2048^3 on a CPU): the
    compute-bound ceiling (a library conv may still beat it, then the report shows more than
    100% of the compute floor)."""
    n = 8192 if device.startswith("cuda") else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    synchronize(device)
    seconds = seconds_per_call(lambda: a @ b, device, 5)
    return 2 * n ** 3 / seconds / 1e12
