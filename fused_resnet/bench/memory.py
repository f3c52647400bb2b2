"""Memory measurements: peak memory of a piece of work (CUDA allocator peak; on a CPU the
process's peak resident set, reset through /proc/self/clear_refs) and the bytes autograd keeps
for backward (deterministic, any device)."""

import ctypes
from typing import Callable, Optional

import torch


def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _return_freed_memory_to_os() -> None:
    """glibc keeps freed heap pages; without trimming them a step that reuses them shows no
    growth of the resident set at all."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_cpu_peak() -> bool:
    """Linux: writing 5 to clear_refs resets the peak resident set (VmHWM) to the current."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes(fn: Callable[[], object], device: str) -> Optional[int]:
    """Peak memory while fn runs. CUDA: torch.cuda.max_memory_allocated (everything allocated,
    model and inputs included). CPU: peak resident set minus the resident set before (what fn
    added at its peak, freed heap returned to the OS first); None where the OS can't say."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    _return_freed_memory_to_os()
    before = _proc_status_kib("VmRSS")
    if before is None or not _reset_cpu_peak():
        return None
    fn()
    peak = _proc_status_kib("VmHWM")
    return None if peak is None else max(peak - before, 0) * 1024


def saved_activation_bytes(model: torch.nn.Module, *inputs) -> int:
    """Bytes autograd keeps for backward after model(*inputs): distinct storages of the saved
    tensors, the model's parameters and buffers excluded."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*inputs)
    state = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    return sum(n for ptr, n in storages.items() if ptr not in state)
