"""Which implementation runs an op: the C++/CUDA extension ("cpp"), Triton ("triton") or the
PyTorch reference ("torch").

PyTorch's dispatcher already routes the C++ kernels by device; this module decides what the
dispatcher cannot: C++ vs Triton vs reference for the same device.

    auto (default): cpp if its kernels for the device were built, else triton where it can run,
                    else torch.
    cpp | triton | torch: forced; an error names the reason if it cannot run on that device.
                    "cuda" and "cpu" are accepted as names of the cpp backend.

Set it with the environment variable FUSED_RESNET_BACKEND, or per scope with `use(name)`.
"""

import contextlib
import functools
import importlib.util
import os
from typing import Optional

import torch

from fused_resnet import _extension

BACKENDS = ("cpp", "triton", "torch")
_ALIASES = {"cuda": "cpp", "cpu": "cpp", "ext": "cpp"}
_override: Optional[str] = None


def normalize(name: str) -> str:
    name = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"fused_resnet: unknown backend {name!r}; expected auto, cpp (cuda), "
                         f"triton or torch")
    return name


@functools.lru_cache(maxsize=16)
def _normalized_setting(raw: str) -> str:
    """normalize of the environment variable's raw value, remembered: every op call reads the
    variable (it may change at run time) but parses a given value once."""
    return normalize(raw)


def requested() -> str:
    if _override is not None:
        return _override
    return _normalized_setting(os.environ.get("FUSED_RESNET_BACKEND", "auto"))


@contextlib.contextmanager
def use(name: str):
    """Force a backend inside a `with` block (tests, benchmarks)."""
    global _override
    previous, _override = _override, normalize(name)
    try:
        yield
    finally:
        _override = previous


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken install must not break fused_resnet
        return f"triton failed to import: {exc}"
    return None


def why_not(name: str, device_type: str) -> Optional[str]:
    """None if backend `name` can run on `device_type`, else the reason it cannot."""
    if name == "torch":
        return None
    if name == "cpp":
        if not _extension.available():
            return _extension.error()
        if device_type == "cuda" and not _extension.with_cuda():
            return "fused_resnet._C was built without CUDA kernels"
        if device_type not in ("cpu", "cuda"):
            return f"no C++ kernels for device type {device_type}"
        return None
    if name == "triton":
        error = _triton_import_error()
        if error:
            return error
        if device_type == "cpu" and not triton_interpreted():
            return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
        if device_type == "cuda" and triton_interpreted():
            return "TRITON_INTERPRET=1 is set: the interpreter runs CPU tensors only"
        if device_type not in ("cpu", "cuda"):
            return f"Triton does not run on device type {device_type}"
        return None
    raise ValueError(name)


@functools.lru_cache(maxsize=None)
def _cpp_runs(device_type: str) -> bool:
    """Whether the C++ kernels run on this device type: what is built does not change within a
    process."""
    return why_not("cpp", device_type) is None


@functools.lru_cache(maxsize=None)
def _auto_without_cpp(device_type: str, interpreted: bool) -> str:
    """auto's answer where the C++ kernels don't run: what is importable does not change within
    a process; TRITON_INTERPRET can, so it is part of the key."""
    # The Triton interpreter is a correctness tool, far slower than the reference: never auto.
    if device_type == "cuda" and why_not("triton", device_type) is None:
        return "triton"
    return "torch"


def _auto(device_type: str) -> str:
    """auto's answer (choose) for a device type: cpp wherever it runs (TRITON_INTERPRET is
    read only where it could matter, once per op call: these calls are on every op's path)."""
    if _cpp_runs(device_type):
        return "cpp"
    return _auto_without_cpp(device_type, triton_interpreted())


@torch.compiler.assume_constant_result  # traced code takes the answer, not os.environ reads
def choose(device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The backend that runs an op on `device` for input of `dtype`."""
    name = requested()
    if dtype == torch.float64:  # kernels are fp32/fp16/bf16; fp64 (gradcheck) is reference-only
        if name not in ("auto", "torch"):
            raise RuntimeError(f"fused_resnet: backend {name!r} does not support float64 input; "
                               f"float64 runs on the torch backend")
        return "torch"
    if name != "auto":
        reason = why_not(name, device.type)
        if reason:
            raise RuntimeError(f"fused_resnet: backend {name!r} was requested but cannot run on "
                               f"{device.type}: {reason}")
        return name
    return _auto(device.type)
