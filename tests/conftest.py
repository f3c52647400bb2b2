"""Test setup. Everything runs on a GPU-less machine: Triton kernels run under the interpreter
(TRITON_INTERPRET=1 must be set before triton is imported), C++ kernels on the CPU. GPU cases
run where a CUDA device exists and skip with a reason where not."""

import os

import torch

# Whether a GPU is here is torch's answer (device node names vary between machines). Importing
# torch and asking it does not import triton, which reads TRITON_INTERPRET on import: it must
# be set before fused_resnet (which may import triton) comes in.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402
import importlib.util  # noqa: E402

import pytest  # noqa: E402

import fused_resnet  # noqa: E402,F401
from fused_resnet import backend  # noqa: E402

if importlib.util.find_spec("fused_resnet.kernels") is None:
    pytest.exit(f"fused_resnet was imported from {fused_resnet.__file__}, a source tree that was "
                f"never installed (no kernels, no _C). Install it (README) and run `pytest` "
                f"rather than `python -m pytest` from the repository root.", returncode=2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def backend_params(device_type: str):
    """Every backend, skipped with its reason where it can't run on `device_type` here."""
    return [
        pytest.param(name, marks=pytest.mark.skipif(
            backend.why_not(name, device_type) is not None,
            reason=f"{name} backend on {device_type}: {backend.why_not(name, device_type)}"))
        for name in backend.BACKENDS
    ]


def cpu_backend_params():
    return backend_params("cpu")


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def randomise_batchnorms(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial parameters and running statistics for every BatchNorm2d of `model` (the
    defaults are an identity map, which would hide a missing or misplaced BN term)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    return model


def plain_twin(model: torch.nn.Module, cpu: bool = True,
               cpu_channels_last: bool = True) -> torch.nn.Module:
    """A copy of the unfused `model` computing in the layout its fused copy computes in, the
    PyTorch result to hold it to: on the CPU (cpu) fuse_ runs an NCHW model in channels_last
    from its stem on (unless cpu_channels_last=False) and rounds as PyTorch's channels_last
    model does, not as its NCHW one (resnet34, logits of a training step off float64: fused
    1.65e-5, PyTorch channels_last 1.66e-5, PyTorch NCHW 7.0e-6)."""
    twin = copy.deepcopy(model)
    if cpu and cpu_channels_last:
        twin = twin.to(memory_format=torch.channels_last)
    return twin
