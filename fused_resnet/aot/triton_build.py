"""Compiling a recorded Triton launch for a GPU that is not here.

A launch is turned into the variant Triton's JIT would compile for it on the GPU: the same
specialisation of every argument (ints equal to 1 become constants, ints and pointers that
are multiples of 16 get a divisibility hint, unless the kernel says do_not_specialize), the
same constexprs and launch options. Then triton.compile for the target architecture gives the
PTX and the shared memory, and the ptxas that ships with Triton gives registers and spills.
"""

import hashlib
import importlib
import os
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Tuple

from fused_resnet.aot import ptx as ptx_tools
from fused_resnet.aot.capture import bind


@dataclass(frozen=True)
class KernelSpec:
    module: str
    name: str
    signature: Tuple[Tuple[str, str], ...]  # (parameter, type) in order; "constexpr" for constants
    constexprs: Tuple[Tuple[int, object], ...]  # (parameter index, value)
    divisible: Tuple[int, ...]  # parameter indices compiled as multiples of 16
    num_warps: int
    num_stages: int

    @property
    def digest(self) -> str:
        return hashlib.sha1(repr(self).encode()).hexdigest()[:10]

    def constexpr(self, name: str):
        index = [p for p, _ in self.signature].index(name)
        return dict(self.constexprs).get(index)

    @property
    def dtype(self) -> str:
        """Element type of the first pointer argument (the kernel's main input)."""
        return next((t[1:] for _, t in self.signature if t.startswith("*")), "")


def _specialize(value, param) -> Tuple[str, str]:
    """(type, key) as Triton's JIT specialises a non-constexpr argument; key "D" means
    divisible by 16, type "constexpr" a value compiled in."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:  # older Triton: the same rules, spelled out
        return _specialize_like_triton(value, param)
    ty, key = native_specialize_impl(BaseBackend, value, param.is_const,
                                     not param.do_not_specialize,
                                     not param.do_not_specialize_on_alignment)
    return ty, key if isinstance(key, str) else ""  # a constant's key is its value


def _specialize_like_triton(value, param) -> Tuple[str, str]:
    import torch

    if isinstance(value, bool):
        return "u1", ""
    if isinstance(value, int):
        ty = "i32" if -2**31 <= value < 2**31 else "i64"
        if param.do_not_specialize:
            return ty, ""
        if value == 1:
            return "constexpr", ""
        return ty, "D" if value % 16 == 0 else ""
    if isinstance(value, float):
        return "fp32", ""
    if isinstance(value, torch.Tensor):
        names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                 torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64"}
        aligned = value.data_ptr() % 16 == 0 and not param.do_not_specialize_on_alignment
        return "*" + names[value.dtype], "D" if aligned else ""
    raise TypeError(f"cannot specialise a {type(value).__name__} argument")


def kernel_spec(launch) -> KernelSpec:
    fn = launch.fn
    values, options = bind(fn, launch.args, launch.kwargs)
    signature, constexprs, divisible = [], [], []
    for index, param in enumerate(fn.params):
        value = values[param.name]
        ty, key = ("constexpr", "") if param.is_constexpr else _specialize(value, param)
        if ty == "constexpr":
            constexprs.append((index, value))
        elif "D" in key:
            divisible.append(index)
        signature.append((param.name, ty))
    return KernelSpec(fn.fn.__module__, fn.fn.__name__, tuple(signature), tuple(constexprs),
                      tuple(divisible), options.get("num_warps", 4), options.get("num_stages", 3))


def _ptxas() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def ptxas_arch(capability: int) -> str:
    """Triton compiles sm_90 kernels for the architecture-specific sm_90a (wgmma)."""
    return f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"


def compile_spec(spec: KernelSpec, capability: int) -> dict:
    """PTX, shared memory, registers and spills of one variant. Runs in a worker process:
    Triton must not be in interpreter mode there."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec.module), spec.name)
    source = ASTSource(fn, dict(spec.signature), {(i,): v for i, v in spec.constexprs},
                       {(i,): [["tt.divisibility", 16]] for i in spec.divisible})
    kernel = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                            options={"num_warps": spec.num_warps,
                                     "num_stages": spec.num_stages})
    ptx = kernel.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        report = subprocess.run([_ptxas(), f"-arch={ptxas_arch(capability)}", "-v", f.name,
                                 "-o", os.devnull], capture_output=True, text=True,
                                check=True).stderr
    finally:
        os.unlink(f.name)
    resources = next(iter(ptx_tools.ptxas_resources(report).values()))
    return {"ptx": ptx, "shared": kernel.metadata.shared, **resources}
