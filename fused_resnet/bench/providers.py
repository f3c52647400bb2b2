"""The implementations a benchmark compares, all built from one set of weights:

    eager          PyTorch eager, NCHW
    eager_cl       PyTorch eager, channels_last (the baseline ratios are taken against)
    compile        torch.compile(eager_cl), default mode
    compile_max    torch.compile(eager_cl, mode="max-autotune") (slow to compile: opt-in)
    compile_freeze torch.compile(eager_cl) with Inductor's freezing: inference graphs take the
                   weights as constants, fold BN into the convs and run oneDNN's fused
                   convolutions with prepacked weights on CPU (the strongest CPU peer; a
                   default provider on CPU). Inference only: freezing does not apply to
                   training graphs, where it would repeat `compile`.
    fused          fr.fuse_(eager_cl), backend auto
    fused_nchw     fr.fuse_(eager): the fused model of an NCHW model, as fuse_ of a torchvision
                   model gives it unless the user converts it (on CPU it computes in
                   channels_last from its stem on; opt-in; compare with eager)
    fused_nchw_kept fr.fuse_(eager, cpu_channels_last=False): NCHW throughout (opt-in)
    fused_compile  torch.compile(fused), default mode
    fused_cuda     fused, forced to the C++/CUDA kernels: BN ops, and the CUTLASS convs
                   wherever they apply (when built with CUTLASS; library convs elsewhere)
    fused_triton   fused, forced to the Triton kernels (conv and BN)

dtype bf16/fp16 runs every provider under torch.autocast (mixed precision: fp32 weights, as
training recipes do). A provider is a Runner: `inference(x)`, `forward_backward(x, target)`
(logits and parameter gradients, for the correctness check) and `train_step(x, target)`
(forward, backward, SGD step).
"""

import contextlib
import copy
from typing import Callable, Optional

import torch
from torch import nn

from fused_resnet import backend

DEFAULT_PROVIDERS = ("eager", "eager_cl", "compile", "fused", "fused_cuda", "fused_triton")
CPU_DEFAULT_PROVIDERS = ("eager", "eager_cl", "compile", "compile_freeze", "fused")
ALL_PROVIDERS = DEFAULT_PROVIDERS + ("compile_freeze", "compile_max", "fused_compile",
                                     "fused_nchw", "fused_nchw_kept")
BASELINE = "eager_cl"


class Runner:
    """One provider's model, its input layout, autocast dtype and backend."""

    def __init__(self, name: str, model: nn.Module, device: str, dtype: torch.dtype,
                 channels_last: bool, backend_name: str = "auto",
                 wrap: Optional[Callable[[nn.Module], nn.Module]] = None):
        self.name, self.device, self.dtype = name, device, dtype
        self.channels_last, self.backend_name = channels_last, backend_name
        self.module = model  # the parameters (an optimizer steps these)
        self.model = wrap(model) if wrap is not None else model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @contextlib.contextmanager
    def context(self):
        autocast = torch.autocast(torch.device(self.device).type, dtype=self.dtype,
                                  enabled=self.dtype != torch.float32)
        with backend.use(self.backend_name), autocast:
            yield

    def inference(self, x: torch.Tensor) -> torch.Tensor:
        self.module.eval()
        with torch.no_grad(), self.context():
            return self.model(x)

    def forward_backward(self, x: torch.Tensor, target: torch.Tensor):
        self.module.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.context():
            logits = self.model(x)
        nn.functional.cross_entropy(logits.float(), target).backward()
        return logits, [p.grad for p in self.module.parameters()]

    def train_step(self, x: torch.Tensor, target: torch.Tensor) -> None:
        self.forward_backward(x, target)
        self.optimizer.step()


def defaults(device: str) -> tuple:
    """The providers a bench runs unless told otherwise: on CPU the forced CUDA and Triton
    providers can't run, and torch.compile with freezing is the peer to beat."""
    return CPU_DEFAULT_PROVIDERS if torch.device(device).type == "cpu" else DEFAULT_PROVIDERS


def unavailable(name: str, device: str, mode: Optional[str] = None) -> Optional[str]:
    """Why provider `name` can't run on `device` (in `mode`, if given); None if it can."""
    device_type = torch.device(device).type
    if name not in ALL_PROVIDERS:
        return f"unknown provider {name!r} (known: {', '.join(ALL_PROVIDERS)})"
    if name == "compile_freeze" and mode == "training":
        return "freezing applies to inference graphs only (training would repeat compile)"
    forced = {"fused_cuda": "cuda", "fused_triton": "triton"}.get(name)
    if forced is None:
        return None
    if device_type != "cuda":
        return f"{forced} backend runs on CUDA devices only"
    return backend.why_not(forced, device_type)


def build(name: str, model: nn.Module, device: str, dtype: torch.dtype) -> Runner:
    """Provider `name` from a copy of `model` (fp32 weights, any device)."""
    import fused_resnet as fr

    model = copy.deepcopy(model).to(device)
    if name == "eager":
        return Runner(name, model, device, dtype, channels_last=False)
    if name in ("fused_nchw", "fused_nchw_kept"):
        fused = fr.fuse_(model, cpu_channels_last=name == "fused_nchw")
        return Runner(name, fused, device, dtype, channels_last=False)
    model = model.to(memory_format=torch.channels_last)
    if name == "eager_cl":
        return Runner(name, model, device, dtype, True)
    # dynamic=False: a static graph for the timing shape, as a fixed serving shape would get
    # (a second shape would otherwise make Dynamo compile a dynamic-batch graph: slower, and on
    # CPU without prepacked oneDNN weights). The suite checks at the timing shape wherever it
    # can, so each compiled provider compiles once per mode (see suite.run).
    if name in ("compile", "compile_max"):
        mode = "max-autotune" if name == "compile_max" else None
        return Runner(name, model, device, dtype, True,
                      wrap=lambda m: torch.compile(m, mode=mode, dynamic=False))
    if name == "compile_freeze":
        return Runner(name, model, device, dtype, True,
                      wrap=lambda m: torch.compile(m, dynamic=False, options={"freezing": True}))
    fused = fr.fuse_(model)
    if name == "fused_compile":
        return Runner(name, fused, device, dtype, True,
                      wrap=lambda m: torch.compile(m, dynamic=False))
    backend_name = {"fused": "auto", "fused_cuda": "cuda", "fused_triton": "triton"}[name]
    return Runner(name, fused, device, dtype, True, backend_name)
