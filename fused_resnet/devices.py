"""Running on the tensors' own CUDA device.

Triton launches a kernel on the *current* CUDA device and stream, and CUDA events time the
current device, whatever device the tensors are on: with tensors on cuda:1 and the current
device 0, a launch would read another GPU's addresses. Every Triton launcher and every timed
measurement therefore runs under on_device(tensor). `guarded()` says whether the code runs
under it (checked, on the CPU, for every launch the static report records: tests).
"""

import contextlib
import functools
import threading

import torch

from fused_resnet import tracing

_state = threading.local()


@contextlib.contextmanager
def on_device(tensor: torch.Tensor):
    """Make `tensor`'s CUDA device current inside (nothing to do for other devices)."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        if tensor.is_cuda:
            with torch.cuda.device(tensor.device):
                yield
        else:
            yield
    finally:
        _state.depth -= 1


def guarded() -> bool:
    return getattr(_state, "depth", 0) > 0


def launches_on_input_device(launcher):
    """Decorator of a kernel launcher: runs it on its first tensor argument's device. Not while
    tracing (fake or functional tensors: torch.compile tracing into a triton_op): nothing is
    launched then, and the traced launch records its tensors' device itself."""
    @functools.wraps(launcher)
    def run(*args, **kwargs):
        first = next(a for a in list(args) + list(kwargs.values())
                     if isinstance(a, torch.Tensor))
        if not tracing.is_plain(first):
            return launcher(*args, **kwargs)
        with on_device(first):
            return launcher(*args, **kwargs)
    return run
