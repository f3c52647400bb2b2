"""fused_resnet.info(): versions, device, and which backends are built and usable."""

import platform

import torch

from fused_resnet import _extension, backend, tuning
from fused_resnet._version import __version__
from fused_resnet.ops import conv_mkldnn


def _triton_version():
    try:
        import triton
    except Exception:
        return None
    return triton.__version__


def _device() -> str:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"cuda:0 {props.name} (sm_{props.major}{props.minor}, {torch.cuda.device_count()} device(s))"
    return f"cpu ({platform.processor() or platform.machine()}, no CUDA device)"


def _ext_entry(device_type: str) -> dict:
    module = _extension.load()
    if device_type == "cpu":
        built = module is not None
    else:
        built = module is not None and bool(module.with_cuda)
    reason = backend.why_not("cpp", device_type)
    if reason is None and device_type == "cuda" and not torch.cuda.is_available():
        reason = "built, but no CUDA device is visible"
    entry = {"built": built, "usable": reason is None}
    if device_type == "cpu" and built:
        entry["isa"] = getattr(module, "cpu_isa", None)  # the kernels' instruction set here
    if reason:
        entry["reason"] = reason
    return entry


def _cutlass_entry() -> dict:
    """The CUTLASS conv kernels: part of _C's CUDA build (see setup.py)."""
    module = _extension.load()
    built = bool(module is not None and getattr(module, "with_cutlass", 0))
    reason = None
    if not built:
        reason = _extension.error() or "fused_resnet._C was built without the CUTLASS conv " \
            "kernels (no CUDA toolkit or headers, or FUSED_RESNET_SKIP_CUTLASS=1)"
    elif not torch.cuda.is_available():
        reason = "built, but no CUDA device is visible"
    entry = {"built": built, "usable": reason is None}
    if reason:
        entry["reason"] = reason
    return entry


def _triton_entry() -> dict:
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    reason = backend.why_not("triton", device_type)
    entry = {"built": _triton_version() is not None,  # JIT-compiled: installed is built
             "usable": reason is None,
             "mode": "interpreter" if backend.triton_interpreted() else "compiled"}
    if reason:
        entry["reason"] = reason
    return entry


def info() -> dict:
    """A dict describing this installation; `fused-resnet info` prints it."""
    default_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        active = backend.choose(default_device)
    except RuntimeError as exc:
        active = f"error: {exc}"
    return {
        "fused_resnet": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "device": _device(),
        "backend_requested": backend.requested(),
        "backend_active": {default_device.type: active},
        "backends": {
            "cpu_ext": _ext_entry("cpu"),
            "cuda_ext": _ext_entry("cuda"),
            "cutlass_conv": _cutlass_entry(),
            "triton": _triton_entry(),
            "torch": {"built": True, "usable": True},
        },
        "cpu_conv": conv_mkldnn.status(),
        "extension_built_with_torch": getattr(_extension.load(), "built_with_torch", None),
        "extension_source_stamp": _extension.source_stamp(),
        "tuning_cache": tuning.cache_path(),
        "tuning_stack": tuning.stack(),  # what a remembered choice must have been measured on
        "conv_choices": tuning.choices(),
    }
