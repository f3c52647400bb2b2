"""The same differentiable ops, without the dispatcher's Python layers, in plain eager mode.

A call of a Python custom op with a registered autograd formula (torch.library.custom_op +
register_autograd) goes Python -> dispatcher -> the generated autograd.Function -> dispatcher
again -> the Python implementation, with argument normalisation on the way: ~50-100 us of
Python per call, measured at ~16 ms of a ResNet-50 training step's forward on a 2-core CPU
(fused 110 ms vs eager 92 ms, backward equal). In plain eager mode nothing needs those layers:
an autograd.Function made of the op's own implementation, setup_context and backward formula
computes exactly what the op computes. Wherever something traces (torch.compile, torch.export,
torch.jit.trace, FX, fake or functional tensors), the registered op runs as before.
"""

from typing import Callable

import torch
from torch import Tensor

from fused_resnet import backend, tracing


def _plain_tensors(args) -> bool:
    return all(tracing.is_plain(a) for a in args if isinstance(a, Tensor))


def _modes_active() -> bool:
    """Whether a TorchDispatchMode or TorchFunctionMode is active (a profiler, a flop counter,
    fused_resnet.aot's op recorder, make_fx): they expect to see the op."""
    return torch._C._len_torch_dispatch_stack() > 0 or \
        torch._C._is_torch_function_mode_enabled()


def plain_eager(*args) -> bool:
    """Whether an op called with `args` runs in plain eager mode: no torch.compile or
    torch.jit.trace tracing, no dispatch or function mode, and every tensor argument a plain
    torch.Tensor or nn.Parameter (not a fake, functional or other subclass tensor; FX proxies
    are not tensors at all)."""
    return not torch.compiler.is_compiling() and not torch.jit.is_tracing() and \
        _plain_tensors(args) and not _modes_active()


def plain_eager_backward(*args) -> bool:
    """plain_eager for a backward formula: also no double backward (create_graph), where the
    op, which has no formula of its own, must stay the op."""
    return not torch.is_grad_enabled() and plain_eager(*args)


def function(name: str, impl: Callable, setup_context: Callable,
             backward: Callable) -> type:
    """An autograd.Function computing op `name` with its implementation, its setup_context and
    its backward formula (the three functions given to torch.library). The forward takes ctx
    itself and calls setup_context: a Function with a separate setup_context binds its
    arguments with inspect.signature on every call, ~30 us."""
    def forward(ctx, *args):
        output = impl(*args)
        setup_context(ctx, args, output)
        return output

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(backward),
        "impl": staticmethod(impl),
    })


def _records(args) -> bool:
    return torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad
                                           for a in args)


def call(op, eager_function: type, *args):
    """op(*args), through eager_function in plain eager mode (module docstring); with nothing
    for autograd to record, the implementation alone (as the op does: setup_context runs only
    when autograd records)."""
    if not plain_eager(*args):
        return op(*args)
    if _records(args):
        return eager_function.apply(*args)
    return eager_function.impl(*args)


def call_inference(op, impl: Callable, *args):
    """op(*args) for an op without an autograd formula: its implementation alone in plain eager
    mode with nothing for autograd to record, else the op (which then says what it lacks)."""
    if plain_eager(*args) and not _records(args):
        return impl(*args)
    return op(*args)


def cpu_step(input: Tensor, *tensors) -> bool:
    """Whether an op's implementation may run its CPU training step as one C++ call
    (csrc/cpu/training_steps.cpp: the same kernels on the same operands, bitwise the same
    results, without the Python between them): plain eager mode (see plain_eager), CPU tensors
    and the C++ backend for them."""
    return input.device.type == "cpu" and plain_eager(input, *tensors) and \
        backend.choose(input.device, input.dtype) == "cpp"
