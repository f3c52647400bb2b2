"""Loads the compiled extension fused_resnet._C once, and remembers why if it can't.

The package works without it (Triton or the torch reference run instead); the reason is
reported once through `warnings` and in fused_resnet.info(), never on every call.
"""

import importlib
import warnings
from typing import Optional

import torch

_module = None
_error: Optional[str] = None
_loaded = False


def _torch_release(version: str) -> str:
    """'2.14.1+cu130' -> '2.14.1': a local build tag does not change the C++ ABI."""
    return version.split("+")[0]


def load():
    """The _C module, or None (and the reason in error())."""
    global _module, _error, _loaded
    if _loaded:
        return _module
    _loaded = True
    try:
        module = importlib.import_module("fused_resnet._C")
    except ImportError as exc:
        _error = f"fused_resnet._C could not be imported ({exc}); was the package built?"
    else:
        built = getattr(module, "built_with_torch", "unknown")
        if _torch_release(built) != _torch_release(torch.__version__):
            _error = (f"fused_resnet._C was built for torch {built} but torch "
                      f"{torch.__version__} is running; rebuild with pip install .")
        else:
            _module = module
    if _error:
        warnings.warn(f"{_error} Falling back to Triton / PyTorch kernels.", RuntimeWarning,
                      stacklevel=2)
    return _module


def error() -> Optional[str]:
    load()
    return _error


def available() -> bool:
    return load() is not None


def source_stamp() -> Optional[str]:
    """The source stamp compiled into the loaded _C (a hash of the csrc/ and setup.py it was
    built from, fused_resnet/_build_stamp.py), or None: no _C, or one built before stamps."""
    module = load()
    if module is None:
        return None
    from fused_resnet import _build_stamp

    return _build_stamp.read_stamp(module.__file__)


def with_cuda() -> bool:
    module = load()
    return bool(module is not None and module.with_cuda)
