"""Which Triton kernels the dispatcher launches, found by running what users run.

1. Op calls: fused torchvision / timm / CIFAR ResNets run on the CPU (C++ backend, small
   batch, real image sizes), in eval and in a training step, NCHW and channels_last, fp32 and
   bf16, under a dispatch mode that records every `torch.ops.fused_resnet` call, nested ones
   included (the pieces a conv op's library path runs, the pieces of the composite ops).
2. Lowering: each recorded call is replayed on meta tensors of the same shapes, strides and
   dtypes (bf16 calls once more as fp16; fp32 convs with TF32 allowed and not) through its
   Triton path: a conv op's "triton" candidate (ops.conv.dispatch_plan /
   ops.bn_relu_conv.dispatch_plan) with every tile configuration the tuner would measure
   (tuning.enumerating), a BN piece through its Triton launcher (kernels.bn_act). Kernel
   launches are recorded instead of run (recorded_launches), with the arguments the launcher
   computed, so the compiled variants are exactly the launchers' own.
"""

import contextlib
import importlib.util
import inspect
import unittest.mock
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

NAMESPACE = "fused_resnet"
BATCH = 2
DTYPES = (torch.float32, torch.bfloat16)
LAYOUTS = ("channels_last", "nchw")


@dataclass(frozen=True)
class TensorSpec:
    """A tensor argument without its data: replayed as a meta tensor."""
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    dtype: torch.dtype
    offset: int = 0  # storage offset, in elements (a view's base pointer is shifted by it)

    def meta(self, dtype_map: Dict[torch.dtype, torch.dtype]) -> torch.Tensor:
        return torch.empty_strided(self.shape, self.stride, dtype=dtype_map.get(self.dtype,
                                                                                 self.dtype),
                                   device="meta")


@dataclass(frozen=True)
class OpCall:
    op: str  # "conv2d_epilogue", "bn_stats_cpp", ...
    args: tuple  # TensorSpec for tensors, plain values (lists as tuples) otherwise
    context: str = field(compare=False, hash=False, default="")


def describe(value):
    """`value` with each tensor in it replaced by its TensorSpec (lists become tuples)."""
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), tuple(value.stride()), value.dtype,
                          value.storage_offset())
    if isinstance(value, (list, tuple)):
        return tuple(describe(v) for v in value)
    return value


def _replay(value, dtype_map):
    if isinstance(value, TensorSpec):
        return value.meta(dtype_map)
    if isinstance(value, tuple):
        return [_replay(v, dtype_map) for v in value]
    return value


def op_call(func, args: tuple, kwargs: dict, context: str) -> OpCall:
    """The OpCall of fused_resnet op `func` called with (args, kwargs), in schema order."""
    schema_args = func._schema.arguments
    ordered = list(args) + [kwargs[a.name] for a in schema_args[len(args):] if a.name in kwargs]
    return OpCall(func._schema.name.split("::")[1], tuple(describe(a) for a in ordered),
                  context)


class OpRecorder(TorchDispatchMode):
    """Records every fused_resnet op call and runs it (run: its CPU implementation), with
    itself active again inside so the calls the op's implementation makes are recorded too.
    Other ops pass through (passthrough)."""

    def __init__(self, context: str):
        super().__init__()
        self.context = context
        self.calls: List[OpCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != NAMESPACE:
            return self.passthrough(func, args, kwargs)
        call = op_call(func, args, kwargs, self.context)
        self.calls.append(call)
        return self.run(func, call, args, kwargs)

    def passthrough(self, func, args: tuple, kwargs: dict):
        return func(*args, **kwargs)

    def run(self, func, call: OpCall, args: tuple, kwargs: dict):
        keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
        with self:
            return func.redispatch(keys, *args, **kwargs)


# ---- the models users fuse --------------------------------------------------------------------
def _models():
    """(name, constructor, image size) of the ResNets fuse_ handles: BasicBlock and
    Bottleneck, the CIFAR zoo (zero-padding and projection shortcuts) and, if installed, a timm
    ResNet with a deep stem (3x3 convs of the 3-channel input) and avg-pool shortcuts."""
    import torchvision

    from fused_resnet import models

    found = [("resnet18", torchvision.models.resnet18, 224),
             ("resnet50", torchvision.models.resnet50, 224),
             ("cifar_resnet20_A", lambda: models.cifar_resnet(20, shortcut="A"), 32),
             ("cifar_resnet20_B", lambda: models.cifar_resnet(20, shortcut="B"), 32)]
    if importlib.util.find_spec("timm") is not None:
        import timm

        found.append(("timm_resnet50d", lambda: timm.create_model("resnet50d"), 224))
    return found


def _run_model(model, image_size, dtype, layout, train):
    memory_format = torch.channels_last if layout == "channels_last" else \
        torch.contiguous_format
    x = torch.randn(BATCH, 3, image_size, image_size, dtype=dtype).contiguous(
        memory_format=memory_format)
    model = model.to(dtype=dtype, memory_format=memory_format).train(train)
    if train:
        model(x).float().sum().backward()
    else:
        with torch.no_grad():
            model(x)


def record_op_calls(models=None) -> List[OpCall]:
    """Distinct fused_resnet op calls of the fused models, eval and training, per dtype and
    layout (C++ backend on the CPU: it must be built)."""
    import fused_resnet as fr
    from fused_resnet import backend

    why = backend.why_not("cpp", "cpu")
    if why:
        raise RuntimeError(f"fused_resnet.aot records op calls on the CPU with the C++ "
                           f"backend, which cannot run: {why}")
    seen: Dict[OpCall, OpCall] = {}
    with backend.use("cpp"):
        for name, build, image_size in (models or _models()):
            torch.manual_seed(0)
            model = fr.fuse_(build())
            for dtype in DTYPES:
                for layout in LAYOUTS:
                    for train in (False, True):
                        context = f"{name} {'train' if train else 'eval'} {layout} " \
                                  f"{str(dtype).replace('torch.', '')}"
                        recorder = OpRecorder(context)
                        with recorder:
                            _run_model(model, image_size, dtype, layout, train)
                        for call in recorder.calls:
                            seen.setdefault(call, call)
    return list(seen.values())


# ---- lowering to Triton launches ---------------------------------------------------------------
@dataclass
class Launch:
    fn: object  # triton JITFunction
    args: tuple
    kwargs: dict
    context: str
    guarded: bool  # launched under devices.on_device (on the tensors' own CUDA device)
    grid: object = None  # as given to kernel[grid]: a tuple, or a callable of the arguments


@contextlib.contextmanager
def recorded_launches(context_of=lambda: ""):
    """Inside, launching a Triton kernel (kernel[grid](...)) records it instead of running it;
    yields the list of Launch records."""
    from triton.runtime.jit import JITFunction

    from fused_resnet import devices

    launches: List[Launch] = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, dict(kwargs), context_of(), devices.guarded(), grid))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


@contextlib.contextmanager
def _tf32(allowed: bool):
    """fp32 convs with TF32 allowed or not (ops.conv.allows_tf32 reads the setting)."""
    from fused_resnet.ops import conv as conv_ops

    with unittest.mock.patch.object(conv_ops, "allows_tf32", lambda: allowed):
        yield


def _triton_path(op: str, args: list) -> Optional[callable]:
    """The call that runs op `op`'s Triton path on `args`, or None if it has none for them."""
    from fused_resnet.ops import bn_add_relu, bn_relu_conv
    from fused_resnet.ops import conv as conv_ops

    piece = op.removesuffix("_cpp").removesuffix("_triton")
    if piece in bn_add_relu.PIECES:
        from fused_resnet.kernels import bn_act

        return lambda: getattr(bn_act, piece)(*args)
    if op in conv_ops.PLANNED_OPS:
        candidates, conv = conv_ops.dispatch_plan(op, *args)
    elif op == "bn_relu_conv2d_bn_stats":
        candidates, conv = bn_relu_conv.dispatch_plan(*args)
    else:
        return None  # composites (their pieces are recorded where they run), CUTLASS ops
    if "triton" not in candidates or conv_ops.triton_unsupported(*conv) is not None:
        return None
    return candidates["triton"]


def _replays(call: OpCall):
    """(dtype map, TF32 allowed) under which `call` is lowered: as recorded; bf16 calls once
    more as fp16 (fp16 models run on GPUs the same way; the CPU runs fp16 convs too slowly to
    record them); fp32 calls with and without TF32 (the conv's dot precision follows it)."""
    dtypes = {a.dtype for a in call.args if isinstance(a, TensorSpec)}
    yield {}, False
    if torch.bfloat16 in dtypes:
        yield {torch.bfloat16: torch.float16}, False
    if torch.float32 in dtypes:
        yield {}, True


def lower(calls: List[OpCall]) -> List[Launch]:
    """Every Triton launch the recorded op calls can make on a GPU."""
    from fused_resnet import tuning

    current = {"context": ""}
    with recorded_launches(lambda: current["context"]) as launches, tuning.enumerating():
        for call in calls:
            for dtype_map, tf32 in _replays(call):
                args = [_replay(a, dtype_map) for a in call.args]
                run = _triton_path(call.op, args)
                if run is None:
                    continue
                suffix = " as fp16" if dtype_map else (" tf32" if tf32 else "")
                current["context"] = f"{call.op} ({call.context}{suffix})"
                with _tf32(tf32):
                    run()
    return launches


def bind(fn, args: tuple, kwargs: dict):
    """(argument values by parameter name, launch options) of a recorded launch."""
    names = [p.name for p in fn.params]
    bound = inspect.signature(fn.fn).bind(*args, **{k: v for k, v in kwargs.items()
                                                   if k in names})
    bound.apply_defaults()
    options = {k: v for k, v in kwargs.items() if k not in names}
    return dict(bound.arguments), options
