"""The GPU path of a fused ResNet-50, rehearsed on the CPU with fake CUDA tensors.

    python -m fused_resnet.aot --rehearse [--batch 256] [--out DIR]

What a first GPU run would do, without a GPU: a torchvision ResNet-50 is fused (fr.fuse_) and
run as a user runs it, a training step (forward, cross-entropy, backward) and an eval forward,
bf16 under CUDA autocast and fp32, channels_last and NCHW, at batch 256 on 224x224 images, on
fake CUDA tensors (torch's FakeTensorMode: shapes, dtypes and strides, no data); and training
steps with the Triton backend forced (TRITON_BACKEND_COMBINATIONS: its BN kernels). The module
and op code is the real one. Standing in for the GPU:

- every Triton launch is recorded instead of run (capture.recorded_launches), with the grid and
  the arguments its launcher computed; Triton's target is sm_90, the device an H100-sized one
  (SM90_PROPERTIES);
- every call of a C++ kernel op (fused_resnet._C: the CUDA BatchNorm kernels, the CUTLASS conv)
  is recorded and answered by its fake kernel; a CUTLASS conv with the plan its glue launches
  with (_C.cutlass_conv_plan) and the grid CUTLASS derives from that plan;
- a conv op measures nothing: every path its dispatch plan offers and why_path_cannot_run
  allows runs once (and each Triton conv every tile configuration the tuner would measure,
  through tuning.enumerating()), so every launch a real step could make is recorded; the
  library path's output goes on to the next layer;
- backward walks the autograd graph in Python (backward()): PyTorch's autograd engine needs a
  CUDA context for CUDA tensors, which a machine without a GPU cannot create;
- torch.library.wrap_triton is off, as it is on real tensors, so the BN launchers launch
  (are recorded) rather than trace; torch.cuda.device is a no-op (no driver).

Every recorded call and launch is then checked; each check names what it found
(Rehearsal.all_problems()). The C++ CUDA BN kernels index in int64 and clamp their grids on
the host (csrc/common/reduce_plan.h, simulated by tests/test_cuda_logic_on_cpu.py): the grid
and int32 checks cover the Triton kernels and the CUTLASS conv.

  grid       every launch's grid within CUDA's limits (x < 2^31, y and z <= 65535), not empty;
  int32      every index a kernel computes in int32 (KERNEL_MODELS, read from kernels/*.py)
             below 2^31; a launched kernel without a model is a problem too;
  alignment  tensor base pointers 16-byte aligned (Triton's divisibility hint), channel counts
             as launched multiples of 8 (and of BLOCK_K where the conv's hint says so), the
             dense layouts the kernels index by;
  dtype      bf16 model: every activation and conv weight an op or kernel sees is bf16 and no
             op makes an fp32 activation; per-channel vectors (statistics, scales, biases) fp32;
             fp32 model: fp32 everywhere;
  path       every offered path ran and returned what the library path returns (shapes,
             dtypes, strides); each op's output is what its fake kernel says (what torch.compile
             assumes); every CUTLASS call is one its plan accepts; every parameter got a grad;
  fake       every C++ op reached has a fake kernel (torch.compile, torch.export and this
             rehearsal trace with it).
"""

import contextlib
import heapq
import itertools
import os
import types
import unittest.mock
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from fused_resnet.aot import capture
from fused_resnet.aot.capture import TensorSpec

BATCH = 256
IMAGE_SIZE = 224
PRECISIONS = ("bf16", "fp32")  # bf16: fp32 parameters, CUDA autocast to bf16 (AMP)
LAYOUTS = capture.LAYOUTS
MODES = ("train", "eval")
GRID_LIMITS = (2**31 - 1, 65535, 65535)  # CUDA's gridDim.x, .y, .z
INT32_MAX = 2**31 - 1
POINTER_ALIGNMENT = 16  # bytes: Triton specialises pointers on it (16-byte vector access)
CHANNEL_ALIGNMENT = 8  # channels: a 16-byte vector of a 16-bit type
CHECKS = ("grid", "int32", "alignment", "dtype", "path", "fake")
# The device the rehearsal stands for (what launchers ask torch.cuda about): an H100 SXM.
SM90_PROPERTIES = types.SimpleNamespace(
    name="NVIDIA H100 (rehearsed)", major=9, minor=0, multi_processor_count=132,
    total_memory=80 * 2**30, shared_memory_per_block_optin=227 * 1024, warp_size=32)
# CUTLASS conv threadblock tiles (M, N) by the plan's tile (csrc/cutlass_conv/conv_fprop.cu:
# LargeTile 128x128x32, SmallTile 64x64x32) and the swizzle's N (GemmIdentityThreadblockSwizzle<4>)
CUTLASS_TILES = {0: (128, 128), 1: (64, 64)}
CUTLASS_SWIZZLE = 4
GPU_PATHS = ("library", "triton", "cutlass")  # the conv paths ops.conv chooses from on CUDA
# CUTLASS conv ops -> the positions of their weight, stride and padding arguments
CUTLASS_OPS = {"conv2d_bias_act_cutlass": (1, 2, 3), "bn_relu_conv2d_cutlass": (3, 4, 5)}


@dataclass(frozen=True)
class Combination:
    precision: str  # "bf16" (autocast) or "fp32"
    layout: str  # "channels_last" or "nchw"
    mode: str  # "train" (a step: forward, loss, backward) or "eval" (a no-grad forward)
    backend: str = "auto"  # FUSED_RESNET_BACKEND

    def __str__(self) -> str:
        backend = "" if self.backend == "auto" else f" backend={self.backend}"
        return f"{self.mode} {self.layout} {self.precision}{backend}"

    @property
    def activation_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32


COMBINATIONS = tuple(Combination(p, layout, m) for p in PRECISIONS for layout in LAYOUTS
                     for m in MODES)
# The BN kernels a forced Triton backend launches instead of the C++ ones (a training step
# launches all four pieces): each layout and each precision once.
TRITON_BACKEND_COMBINATIONS = (Combination("bf16", "channels_last", "train", "triton"),
                               Combination("fp32", "nchw", "train", "triton"))


@dataclass(frozen=True)
class Problem:
    check: str  # one of CHECKS
    where: str  # the combination, then the op (and path) nesting
    detail: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.where}: {self.detail}"


@dataclass
class Call:
    """One op call: a fused_resnet op, or a library convolution (aten)."""
    op: str
    args: tuple  # capture.describe'd, in schema order
    outputs: tuple
    where: str
    offered: Dict[str, Optional[str]] = field(default_factory=dict)  # conv path -> why not
    native: Optional[dict] = None  # a C++ kernel op's launch: CUTLASS plan and grid


@dataclass
class KernelLaunch:
    """One Triton launch: the kernel, its grid, every argument by parameter name (tensors as
    TensorSpec, constexprs as values)."""
    kernel: str
    grid: Tuple[int, ...]
    args: Dict[str, object]
    where: str
    options: Dict[str, object] = field(default_factory=dict)  # num_warps, num_stages
    constexprs: Tuple[str, ...] = ()  # the names of the compile-time parameters


@dataclass
class Rehearsal:
    combinations: Tuple[Combination, ...]
    batch: int
    image_size: int
    calls: List[Call] = field(default_factory=list)
    launches: List[KernelLaunch] = field(default_factory=list)
    problems: List[Problem] = field(default_factory=list)  # found while running
    warnings: List[str] = field(default_factory=list)  # what the code warned while running

    def all_problems(self) -> List[Problem]:
        """Those found while running, then every check of the calls and launches; each once."""
        found = list(self.problems)
        for call in self.calls:
            found += call_problems(call, self._combination(call.where))
        for launch in self.launches:
            found += launch_problems(launch, self._combination(launch.where))
        return list(dict.fromkeys(found))

    def _combination(self, where: str) -> Combination:
        return next(c for c in self.combinations if where.startswith(str(c) + " |"))


# ---- checks -------------------------------------------------------------------------------------
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def grid_problems(grid: Tuple[int, ...]) -> List[str]:
    """What is wrong with a launch grid (CUDA's limits; nothing to launch)."""
    if len(grid) > 3:
        return [f"grid {grid} has more than 3 dimensions"]
    found = []
    for axis, size, limit in zip("xyz", tuple(grid) + (1,) * (3 - len(grid)), GRID_LIMITS):
        if size > limit:
            found.append(f"grid.{axis} = {size:,} exceeds CUDA's limit {limit:,}")
        elif size < 1:
            found.append(f"grid.{axis} = {size}: an empty launch")
    return found


@dataclass(frozen=True)
class Premise:
    """Something a kernel's code assumes of a launch, and whether the launch meets it."""
    check: str  # "int32" or "alignment"
    what: str  # int32: the index; alignment: what is wrong where it does not hold
    holds: bool
    largest: Optional[int] = None  # int32: the largest value the index takes

    def problem(self) -> str:
        if self.check == "int32":
            return f"{self.what} reaches {self.largest:,}, past int32's {INT32_MAX:,}"
        return self.what


def _int32(what: str, largest: int) -> Premise:
    return Premise("int32", what, largest <= INT32_MAX, largest)


def _multiple(what: str, value: int, of: int) -> Premise:
    return Premise("alignment", f"{what} = {value}, not a multiple of {of}", value % of == 0)


def _dense(name: str, spec, shape: Tuple[int, ...], channels_last: Optional[bool]) -> Premise:
    """spec is a dense tensor of `shape` (NCHW-contiguous, channels_last-contiguous, or either
    when channels_last is None): the kernel indexes it by its sizes alone."""
    layouts = ([True, False] if channels_last is None else [channels_last])
    holds = isinstance(spec, TensorSpec) and tuple(spec.shape) == tuple(shape) and any(
        _same_strides(spec, _dense_strides(shape, cl)) for cl in layouts)
    got = (f"{list(spec.shape)} strides {list(spec.stride)}" if isinstance(spec, TensorSpec)
           else repr(spec))
    layout = {True: "channels_last", False: "contiguous", None: "dense"}[channels_last]
    return Premise("alignment", f"{name} is {got}, not a {layout} {list(shape)}", holds)


def _same_strides(spec: TensorSpec, strides: Tuple[int, ...]) -> bool:
    """Whether spec has these strides (a size-1 dimension's stride means nothing)."""
    return all(size == 1 or got == want
               for size, got, want in zip(spec.shape, spec.stride, strides))


def _dense_strides(shape: Tuple[int, ...], channels_last: bool) -> Tuple[int, ...]:
    if channels_last and len(shape) == 4:
        n, c, h, w = shape
        return (h * w * c, 1, w * c, c)
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _conv_kernel_model(a: dict) -> Iterator[Premise]:
    """kernels/conv.py _conv_kernel. int32: the program id, the output pixel index offs_m (it is
    compared with M, so masked lanes count too), the input pixel index (img*H + ih)*W + iw (and
    the shortcut's), the packed-weight offset offs_k*C_out + offs_n, the tile-statistics offset
    offs_n*tiles_m + pid_m; element offsets into activations are int64. Addresses count on
    valid lanes only (a masked lane's wrapped address is never dereferenced). Layout: NHWC input,
    output and residual, [KH, KW, C_in, C_out] weights, all dense; channel runs of whole 16-byte
    vectors; where SMALL_C_IN == 0, tl.multiple_of(k0 % C_in, BLOCK_K) needs BLOCK_K | C_in."""
    n, c_in, c_out = a["N"], a["C_in"], a["C_out"]
    m = n * a["OH"] * a["OW"]
    tiles_m, tiles_n = _cdiv(m, a["BLOCK_M"]), _cdiv(c_out, a["BLOCK_N"])
    k = a["KH"] * a["KW"] * (a["SMALL_C_IN"] or c_in)
    yield _int32("program id", tiles_m * tiles_n - 1)
    yield _int32("output pixel offs_m", tiles_m * a["BLOCK_M"] - 1)
    yield _int32("input pixel (img*H + ih)*W + iw", n * a["H"] * a["W"] - 1)
    yield _int32("packed weight offset offs_k*C_out + offs_n", k * c_out - 1)
    yield _multiple("C_in", c_in, CHANNEL_ALIGNMENT)
    yield _multiple("C_out", c_out, CHANNEL_ALIGNMENT)
    if a["SMALL_C_IN"] == 0:
        yield _multiple("C_in (tl.multiple_of(k0 % C_in, BLOCK_K))", c_in, a["BLOCK_K"])
    else:
        yield Premise("alignment", f"SMALL_C_IN = {a['SMALL_C_IN']} but C_in = {c_in}",
                      a["SMALL_C_IN"] == c_in)
    yield _dense("x", a["x_ptr"], (n, c_in, a["H"], a["W"]), True)
    yield _dense("out", a["out_ptr"], (n, c_out, a["OH"], a["OW"]), True)
    yield _dense("w", a["w_ptr"], (a["KH"], a["KW"], c_in, c_out), False)
    if a["HAS_RESIDUAL"]:
        yield _dense("residual", a["res_ptr"], (n, c_out, a["OH"], a["OW"]), True)
    if a["HAS_SHORTCUT"]:
        yield _int32("shortcut pixel", n * a["H2"] * a["W2"] - 1)
        yield _int32("shortcut weight offset", a["C2"] * c_out - 1)
        yield _multiple("C2", a["C2"], CHANNEL_ALIGNMENT)
        yield _dense("x2", a["x2_ptr"], (n, a["C2"], a["H2"], a["W2"]), True)
        yield _dense("w2", a["w2_ptr"], (1, 1, a["C2"], c_out), False)
    if a["STATS"]:
        yield _int32("tile statistics offset offs_n*tiles_m + pid_m", c_out * tiles_m - 1)


def _per_channel_reduction_model(a: dict, grid: Tuple[int, ...], tensors: Iterable[str]):
    """kernels/bn_act.py _stats_partial_kernel, _grad_reduce_partial_kernel: the split and every
    element offset int64; int32: the channel c = pid_c*BLOCK_C + arange and, NCHW, the plane
    position hw0 + arange. The tensors are dense in the layout CHANNELS_LAST names."""
    yield _int32("channel index", grid[0] * a["BLOCK_C"] - 1)
    if not a["CHANNELS_LAST"]:
        yield _int32("plane position", _cdiv(a["inner"], a["BLOCK_HW"]) * a["BLOCK_HW"] - 1)
    for name in tensors:
        spec = a[name]
        yield _dense(name, spec, tuple(spec.shape), bool(a["CHANNELS_LAST"]))


def _elementwise_model(a: dict, grid: Tuple[int, ...], tensors: Iterable[str]):
    """kernels/bn_act.py _apply_kernel, _grad_apply_kernel: offsets from pid.to(int64); the
    channel (offs // inner) % C too. The tensors are dense (either layout, the same one)."""
    yield _int32("program id", grid[0] - 1)
    first = a[next(iter(tensors))]
    for name in tensors:
        yield _dense(name, a[name], tuple(first.shape), None)
        if isinstance(a[name], TensorSpec) and isinstance(first, TensorSpec):
            yield Premise("alignment", f"{name} strides {list(a[name].stride)} differ from "
                          f"{list(first.stride)}", _same_strides(a[name], first.stride))


def _stats_final_model(a: dict, grid: Tuple[int, ...]):
    """kernels/bn_act.py _stats_final_kernel: the channel c (int32); partial offsets int64."""
    yield _int32("channel index", grid[0] * a["BLOCK_C"] - 1)


# kernel name -> premises(arguments by name, grid): what each launched kernel's code assumes
KERNEL_MODELS: Dict[str, Callable[[dict, tuple], Iterable[Premise]]] = {
    "_conv_kernel": lambda a, grid: _conv_kernel_model(a),
    "_stats_partial_kernel": lambda a, grid: _per_channel_reduction_model(a, grid, ["x_ptr"]),
    "_grad_reduce_partial_kernel": lambda a, grid: _per_channel_reduction_model(
        a, grid, ["grad_ptr", "x_ptr"]),
    "_stats_final_kernel": _stats_final_model,
    "_apply_kernel": lambda a, grid: _elementwise_model(
        a, grid, ["x_ptr", "out_ptr"] + (["res_ptr"] if a["HAS_RESIDUAL"] else [])),
    "_grad_apply_kernel": lambda a, grid: _elementwise_model(
        a, grid, ["grad_ptr", "x_ptr", "dx_ptr"] + (["dres_ptr"] if a["RESIDUAL_GRAD"] else [])),
}


def dtype_problems(tensors: Iterable[Tuple[str, object]], combination: Combination
                   ) -> List[str]:
    """What is wrong with the dtypes of (name, TensorSpec) an op or kernel sees: 4-D floating
    tensors (activations, conv weights) in the model's activation dtype, 1-D floating ones
    (per-channel statistics, scales, biases) fp32."""
    found = []
    for name, spec in tensors:
        if not isinstance(spec, TensorSpec) or not spec.dtype.is_floating_point or \
                0 in spec.shape:  # an empty placeholder (an absent output) holds nothing
            continue
        want = {4: combination.activation_dtype, 1: torch.float32}.get(len(spec.shape))
        if want is not None and spec.dtype != want:
            found.append(f"{name} {list(spec.shape)} is {_dtype_name(spec.dtype)}, expected "
                         f"{_dtype_name(want)}")
    return found


def alignment_problems(tensors: Iterable[Tuple[str, object]],
                       alignment: int = POINTER_ALIGNMENT) -> List[str]:
    """Tensors whose base pointer is not `alignment`-byte aligned: a storage offset that is not
    a multiple of it (allocations themselves start on 512-byte boundaries)."""
    found = []
    for name, spec in tensors:
        if isinstance(spec, TensorSpec) and spec.offset * spec.dtype.itemsize % alignment:
            found.append(f"{name} starts {spec.offset} elements into its storage: not "
                         f"{alignment}-byte aligned")
    return found


def launch_problems(launch: KernelLaunch, combination: Combination) -> List[Problem]:
    """Every check of one Triton launch."""
    def problem(check, detail):
        return Problem(check, launch.where, f"{launch.kernel} grid {launch.grid}: {detail}")

    found = [problem("grid", d) for d in grid_problems(launch.grid)]
    model = KERNEL_MODELS.get(launch.kernel)
    if model is None:
        found.append(problem("int32", "no index model in rehearsal.KERNEL_MODELS: read the "
                                      "kernel and add one"))
    else:
        found += [problem(p.check, p.problem()) for p in model(launch.args, launch.grid)
                  if not p.holds]
    tensors = [(k, v) for k, v in launch.args.items() if isinstance(v, TensorSpec)]
    found += [problem("alignment", d) for d in alignment_problems(tensors)]
    found += [problem("dtype", d) for d in dtype_problems(tensors, combination)]
    return found


def call_problems(call: Call, combination: Combination) -> List[Problem]:
    """The dtype checks of one op call (its arguments and outputs); the checks of a CUTLASS
    call's plan and grid."""
    named = list(_named_tensors(call.args, "arg")) + list(_named_tensors(call.outputs, "out"))
    found = [Problem("dtype", call.where, f"{call.op}: {d}")
             for d in dtype_problems(named, combination)]
    if call.native and "cutlass_plan" in call.native:
        plan = call.native["cutlass_plan"]
        if plan["unsupported"] is not None:
            found.append(Problem("path", call.where, f"{call.op} launched on a problem its "
                                 f"plan refuses: {plan['unsupported']}"))
        else:
            found += [Problem("grid", call.where, f"{call.op} grid {call.native['grid']}: {d}")
                      for d in grid_problems(call.native["grid"])]
            channels = (_multiple("padded C_in", plan["padded_c"], CHANNEL_ALIGNMENT),
                        _multiple("C_out", call.native["c_out"], CHANNEL_ALIGNMENT))
            found += [Problem("alignment", call.where, f"{call.op}: {p.what}")
                      for p in channels if not p.holds]
    if call.native is not None:  # a C++ kernel: its operands as the glue receives them
        found += [Problem("alignment", call.where, f"{call.op}: {d}")
                  for d in _native_alignment_problems(call)]
    return found


def _native_alignment_problems(call: Call) -> List[str]:
    """C++ kernel operands whose base pointer misses the alignment of their widest vector
    access (csrc/common/cutlass_conv_plan.h: 32 bytes for the CUTLASS conv's fp32 bias, 16
    for every other operand; the BN kernels' 16-byte vector path): the glue then copies the
    operand first (CUTLASS) or takes the scalar path (BN)."""
    named = list(_named_tensors(call.args, "arg"))
    bias = {"conv2d_bias_act_cutlass": "arg4"}.get(call.op)
    return alignment_problems([(n, t) for n, t in named if n != bias]) + \
        alignment_problems([(n, t) for n, t in named if n == bias], alignment=32)


def _named_tensors(values: tuple, prefix: str) -> Iterator[Tuple[str, TensorSpec]]:
    for i, value in enumerate(values):
        if isinstance(value, TensorSpec):
            yield f"{prefix}{i}", value
        elif isinstance(value, tuple):
            yield from _named_tensors(value, f"{prefix}{i}.")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace(
        "float32", "fp32").replace("float16", "fp16")


# ---- the CUTLASS conv's launch ------------------------------------------------------------------
def cutlass_launch(input: TensorSpec, weight: TensorSpec, stride: int, padding: int) -> dict:
    """The plan the CUTLASS glue launches with (_C.cutlass_conv_plan, its own rule) and the grid
    CUTLASS derives from it: an implicit GEMM of M = N*P*Q rows by K columns in threadblock
    tiles, GemmIdentityThreadblockSwizzle<4> (cutlass/gemm/threadblock/threadblock_swizzle.h:
    get_tiled_shape, get_log_tile, get_grid_shape) folding 2^log_tile column tiles into x."""
    from fused_resnet import _extension

    n, c, h, w = input.shape
    k, _, r, s = weight.shape
    element_bytes = input.dtype.itemsize
    reason, padded_c, p, q, tile = _extension.load().cutlass_conv_plan(
        n, h, w, c, k, r, s, stride, padding, 1, 1, element_bytes)
    plan = {"unsupported": reason, "padded_c": padded_c, "p": p, "q": q, "tile": tile}
    if reason is not None:
        return {"cutlass_plan": plan, "grid": None, "c_out": k}
    tile_m, tile_n = CUTLASS_TILES[tile]
    tiles_m, tiles_n = _cdiv(n * p * q, tile_m), _cdiv(k, tile_n)
    log_tile = 3 if CUTLASS_SWIZZLE >= 8 and tiles_n >= 6 else \
        2 if CUTLASS_SWIZZLE >= 4 and tiles_n >= 3 else \
        1 if CUTLASS_SWIZZLE >= 2 and tiles_n >= 2 else 0
    grid = (tiles_m << log_tile, _cdiv(tiles_n, 1 << log_tile), 1)
    return {"cutlass_plan": plan, "grid": grid, "threadblock": (tile_m, tile_n), "c_out": k}


# ---- the stand-in GPU ---------------------------------------------------------------------------
class _Sm90Driver:
    """Triton's active driver as far as kernel analysis asks: the target is sm_90."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


@contextlib.contextmanager
def _no_driver_device(device=None):
    yield  # torch.cuda.device: no driver to make a device current


@contextlib.contextmanager
def stand_in_gpu():
    """Fake CUDA tensors (yields the FakeTensorMode), Triton targeting sm_90, torch.cuda
    answering for an H100-sized device, wrap_triton off (the launchers launch), the tuning cache
    off (nothing is measured)."""
    import triton
    from torch._library.triton import set_wrap_triton_enabled
    from torch._subclasses.fake_tensor import FakeTensorMode

    previous = triton.runtime.driver.__dict__.get("_active")  # reset_active() would create
    triton.runtime.driver.set_active(_Sm90Driver())  # the default driver: none without a GPU
    try:
        with FakeTensorMode() as mode, set_wrap_triton_enabled(False), \
                unittest.mock.patch.dict(os.environ, {"FUSED_RESNET_TUNING_CACHE": "0"}), \
                unittest.mock.patch.object(torch.cuda, "device", _no_driver_device), \
                unittest.mock.patch.object(torch.cuda, "get_device_properties",
                                           lambda device=None: SM90_PROPERTIES), \
                unittest.mock.patch.object(torch.cuda, "is_current_stream_capturing",
                                           lambda: False):
            yield mode
    finally:
        triton.runtime.driver.set_active(previous)


@contextlib.contextmanager
def cuda_autocast(dtype: Optional[torch.dtype]):
    """CUDA autocast to `dtype` (None: off), set directly: torch.autocast("cuda") turns itself
    off where CUDA is not available."""
    if dtype is None:
        yield
        return
    enabled, previous = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", previous)


# ---- backward without the autograd engine --------------------------------------------------------
_variable_inputs: dict = {}  # autograd.Function node -> which forward inputs were tensors
_not_materialised: set = set()  # autograd.Function nodes that set_materialize_grads(False)


@contextlib.contextmanager
def remembering_function_inputs():
    """Inside, each autograd.Function call remembers which of its inputs were tensors (the
    edges of its backward node, next_functions, are those inputs') and whether it asked for
    its missing gradients as zeros (a flag torch keeps write-only): for backward()."""
    original = torch.autograd.Function.__dict__["apply"]
    set_materialize = torch.autograd.function.FunctionCtx.set_materialize_grads

    def set_materialize_grads(ctx, value: bool):
        (_not_materialised.discard if value else _not_materialised.add)(ctx)
        set_materialize(ctx, value)

    def apply(cls, *args, **kwargs):
        out = original.__get__(None, cls)(*args, **kwargs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        node = next((o.grad_fn for o in outs
                     if isinstance(o, torch.Tensor) and o.grad_fn is not None), None)
        if node is not None:
            _variable_inputs[node] = tuple(isinstance(a, torch.Tensor) for a in args)
        return out

    torch.autograd.Function.apply = classmethod(apply)
    try:
        with unittest.mock.patch.object(torch.autograd.function.FunctionCtx,
                                        "set_materialize_grads", set_materialize_grads):
            yield
    finally:
        torch.autograd.Function.apply = original
        _variable_inputs.clear()
        _not_materialised.clear()


def backward(loss: torch.Tensor) -> None:
    """loss.backward(), as PyTorch's engine computes it, in Python: nodes in dependency order
    (the latest-made first among the ready ones, as the engine does), each called with the sum
    of its incoming gradients, each gradient reduced and cast to what the edge's input expects
    (the engine's validate_outputs); the leaves' AccumulateGrad nodes write .grad. Hooks are not
    run (a fused model registers none). Needs remembering_function_inputs() around the forward."""
    root = loss.grad_fn
    dependencies: dict = {}
    seen, stack = {root}, [root]
    while stack:
        for following, _ in stack.pop().next_functions:
            if following is None:
                continue
            dependencies[following] = dependencies.get(following, 0) + 1
            if following not in seen:
                seen.add(following)
                stack.append(following)
    buffers = {root: [torch.ones_like(loss)]}
    order = itertools.count()
    ready = [(-root._sequence_nr(), next(order), root)]
    with torch.no_grad():
        while ready:
            node = heapq.heappop(ready)[2]
            grads = buffers.pop(node, [])
            grads += [None] * (len(node._input_metadata) - len(grads))
            for (following, slot), grad in zip(node.next_functions, _call_node(node, grads)):
                if following is None:
                    continue
                if grad is not None:
                    expected = following._input_metadata[slot]
                    if tuple(grad.shape) != tuple(expected.shape):
                        grad = grad.sum_to_size(expected.shape)
                    grad = grad.to(expected.dtype)
                    buffer = buffers.setdefault(following, [])
                    buffer += [None] * (slot + 1 - len(buffer))
                    buffer[slot] = grad if buffer[slot] is None else buffer[slot] + grad
                dependencies[following] -= 1
                if dependencies[following] == 0:
                    heapq.heappush(ready, (-following._sequence_nr(), next(order), following))


def _call_node(node, grads: list) -> tuple:
    """A backward node's output gradients, one per edge (next_functions)."""
    if not hasattr(node, "_forward_cls"):  # a C++ node: callable as it is
        out = node(*grads)
        return out if isinstance(out, tuple) else (out,)
    # an autograd.Function's: its backward takes every gradient (materialised as zeros unless
    # it said not to) and returns one per forward input; the edges are the tensor inputs'
    if node not in _not_materialised:
        grads = [g if g is not None else torch.zeros(m.shape, dtype=m.dtype, device=m.device)
                 for g, m in zip(grads, node._input_metadata)]
    out = node.apply(*grads)
    out = out if isinstance(out, tuple) else (out,)
    tensors = _variable_inputs[node]
    out += (None,) * (len(tensors) - len(out))
    return tuple(g for g, is_tensor in zip(out, tensors) if is_tensor)


# ---- recording ----------------------------------------------------------------------------------
_LIBRARY_CONVS = ("conv2d.default", "convolution.default", "convolution_backward.default")


def _python_op(func) -> bool:
    """Whether a fused_resnet op's implementation is Python (torch.library.custom_op /
    triton_op), which runs on the fake tensors as it would on CUDA ones; else a C++ kernel."""
    from torch._library.custom_ops import OPDEFS

    return func._schema.name in OPDEFS


def _has_fake(func) -> bool:
    """Whether fake tensors can run op `func`: a fake (Python register_fake) or Meta kernel, or
    a CompositeExplicitAutograd one (it runs on the meta tensors inside)."""
    from torch._library.simple_registry import singleton

    name = func._schema.name
    return singleton.find(name).fake_impl.kernel is not None or any(
        torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
        for key in ("Meta", "CompositeExplicitAutograd"))


def _outputs(out) -> tuple:
    """An op's output(s), describe'd, as a tuple."""
    return capture.describe(tuple(out) if isinstance(out, (tuple, list)) else (out,))


def _same_layout(got, want) -> bool:
    """Whether two describe'd values have the same structure, shapes, dtypes and strides (a
    stride of a size-1 dimension means nothing: [N, C, 1, 1] is NCHW and NHWC at once)."""
    if isinstance(got, TensorSpec) and isinstance(want, TensorSpec):
        return (got.shape, got.dtype) == (want.shape, want.dtype) and \
            _same_strides(got, want.stride)
    if isinstance(got, tuple) and isinstance(want, tuple):
        return len(got) == len(want) and all(map(_same_layout, got, want))
    return not isinstance(got, (TensorSpec, tuple)) and not isinstance(want, (TensorSpec, tuple))


@dataclass
class _Frame:
    op: str
    path: Optional[str] = None
    offered: Dict[str, Optional[str]] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.op if self.path is None else f"{self.op}[{self.path}]"


class _Recorder(capture.OpRecorder):
    """Records every fused_resnet op call, runs a Python op's body as on CUDA, answers a C++ op
    with its fake kernel; watches the library convs and every op's outputs for dtypes."""

    def __init__(self, rehearsal: Rehearsal, combination: Combination, parameter_shapes: set):
        super().__init__(str(combination))
        self.rehearsal = rehearsal
        self.combination = combination
        self.parameter_shapes = parameter_shapes
        self.trail: List[_Frame] = []

    def where(self) -> str:
        return f"{self.combination} | " + (" > ".join(str(f) for f in self.trail) or "model")

    def problem(self, check: str, detail: str) -> None:
        self.rehearsal.problems.append(Problem(check, self.where(), detail))

    def passthrough(self, func, args, kwargs):
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[1] + "." + func._overloadname
        if name in _LIBRARY_CONVS:
            self.rehearsal.calls.append(Call(
                f"aten.{name.split('.')[0]}", capture.op_call(func, args, kwargs, "").args,
                _outputs(out), self.where()))
        elif self.combination.precision == "bf16":
            self._fp32_activations(f"aten.{name}", out)
        return out

    def _fp32_activations(self, op: str, out) -> None:
        """An fp32 activation made in the bf16 model: batch-sized 4-D, neither a parameter's
        shape (a weight gradient cast back to its fp32 parameter is expected) nor a
        per-channel vector's view ([C, 1, 1, 1], C may equal the batch)."""
        for _, spec in _named_tensors(_outputs(out), "out"):
            if spec.dtype == torch.float32 and len(spec.shape) == 4 and \
                    spec.shape[0] == self.rehearsal.batch and tuple(spec.shape[1:]) != (1, 1, 1) \
                    and tuple(spec.shape) not in self.parameter_shapes:
                self.problem("dtype", f"{op} made an fp32 activation {list(spec.shape)}")

    def run(self, func, call, args, kwargs):
        frame = _Frame(call.op)
        self.trail.append(frame)
        where = self.where()
        try:
            if _python_op(func):
                out = self._python(func, call, args, kwargs)
                native = None
            else:
                out, native = self._native(func, call, args, kwargs)
        finally:
            self.trail.pop()
        self.rehearsal.calls.append(Call(call.op, call.args, _outputs(out), where,
                                         frame.offered, native))
        return out

    def _python(self, func, call, args, kwargs):
        """The op's body on the fake CUDA tensors; its output checked against its fake."""
        expected = func(*args, **kwargs)  # the recorder is off here: FakeTensorMode's answer
        keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
        with self:
            out = func.redispatch(keys, *args, **kwargs)
        got, want = capture.describe(out), capture.describe(expected)
        if not _same_layout(got, want):
            self.problem("path", f"{call.op} returned {show_value(got)}, its fake kernel says "
                                 f"{show_value(want)}")
        return out

    def _native(self, func, call, args, kwargs):
        """A C++ kernel op: what it would launch, answered by its fake kernel."""
        native = {}
        if call.op in CUTLASS_OPS:
            native = cutlass_launch(call.args[0], *(call.args[i] for i in CUTLASS_OPS[call.op]))
        if _has_fake(func):
            return func(*args, **kwargs), native
        self.problem("fake", f"fused_resnet::{call.op} has no fake (meta) kernel: "
                             f"torch.compile, torch.export and this rehearsal cannot trace it")
        if native.get("grid") is None:
            raise RuntimeError(f"fused_resnet.aot.rehearsal: cannot answer fused_resnet::"
                               f"{call.op} without a fake kernel")
        # a CUTLASS conv: its output from the plan, so the rest of the model still runs
        plan = native["cutlass_plan"]
        return torch.empty((call.args[0].shape[0], native["c_out"], plan["p"], plan["q"]),
                           dtype=args[0].dtype, device=args[0].device,
                           memory_format=torch.channels_last), native

    # -- the conv ops' choice: every path offered -------------------------------------------
    def offer_every_path(self, op, candidates, input, weight, stride, padding, dilation, groups,
                         **_measurement_key):
        """ops.conv.choose_path, rehearsed: every candidate that can run here runs once (the
        forced backend's own choice only, as choose_path does), the library path last, whose
        output goes on; each's output is compared with the library path's. What else
        choose_path takes only keys its measurement."""
        from fused_resnet import backend
        from fused_resnet.ops import conv as conv_ops

        conv = (input, weight, stride, padding, dilation, groups)
        frame = self.trail[-1]
        offered = {name: conv_ops.why_path_cannot_run(name, *conv) for name in candidates}
        offered.update({name: f"the {op} op does not offer it here" for name in GPU_PATHS
                        if name not in candidates})
        allowed = conv_ops.allowed_paths()
        if allowed is not None:
            offered = {name: why if name in allowed or name == "library" else
                       f"not in {conv_ops.CONV_PATHS_ENV}" for name, why in offered.items()}
        if backend.requested() != "auto":
            chosen = conv_ops.conv_path(*conv, cutlass="cutlass" in candidates)
            offered = {name: why if name in ("library", chosen) or why is not None else
                       f"not chosen under backend {backend.requested()}"
                       for name, why in offered.items()}
        frame.offered.update({name if name not in frame.offered else f"{op}:{name}": why
                              for name, why in offered.items()})
        outputs = {}
        for name in sorted(candidates, key=lambda name: name == "library"):
            if offered[name] is not None:  # cannot run here
                continue
            frame.path = name
            try:
                outputs[name] = capture.describe(candidates[name]())
            except Exception as exc:  # noqa: BLE001 - an offered path that cannot run
                self.problem("path", f"{op}: the {name} path was offered and raised "
                                     f"{type(exc).__name__}: {exc}")
        frame.path = "library"
        for name, got in outputs.items():
            if "library" in outputs and not _same_layout(got, outputs["library"]):
                self.problem("path", f"{op}: the {name} path returns {show_value(got)}, the "
                                     f"library path {show_value(outputs['library'])}")
        return "library"


# ---- running the model --------------------------------------------------------------------------
def fused_resnet50(layout: str) -> torch.nn.Module:
    """A fused torchvision ResNet-50 on the (fake) CUDA device, its conv weights in `layout`
    (what model.to(memory_format=...) does; FakeTensors cannot be swapped into modules)."""
    import torchvision

    import fused_resnet as fr

    with torch.device("cuda"):
        model = torchvision.models.resnet50()
    return fr.fuse_(in_layout(model, layout))


def in_layout(model: torch.nn.Module, layout: str) -> torch.nn.Module:
    """model.to(memory_format=torch.channels_last) for "channels_last", done by hand:
    Module.to cannot swap fake tensors into a module."""
    if layout == "channels_last":
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and p.dim() == 4:
                    module._parameters[name] = torch.nn.Parameter(
                        p.contiguous(memory_format=torch.channels_last),
                        requires_grad=p.requires_grad)
    return model


def _inputs(combination: Combination, batch: int, image_size: int):
    """A batch of images in the combination's layout (fp32, as a data loader gives them) and
    class targets."""
    memory_format = torch.channels_last if combination.layout == "channels_last" else \
        torch.contiguous_format
    x = torch.empty(batch, 3, image_size, image_size, device="cuda").contiguous(
        memory_format=memory_format)
    return x, torch.zeros(batch, dtype=torch.long, device="cuda")


def _run(model, combination: Combination, x, target) -> Optional[str]:
    """A training step or an eval forward, as a user writes it; returns what is wrong with the
    gradients afterwards (None: every parameter has one)."""
    autocast = combination.activation_dtype if combination.precision == "bf16" else None
    if combination.mode == "eval":
        with torch.no_grad(), cuda_autocast(autocast):
            model.eval()(x)
        return None
    model.train()
    with cuda_autocast(autocast):
        loss = torch.nn.functional.cross_entropy(model(x), target)
    backward(loss)
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    return f"no gradient reached {missing[:5]} ({len(missing)} parameters)" if missing else None


def rehearse(combinations: Iterable[Combination] = COMBINATIONS, batch: int = BATCH,
             image_size: int = IMAGE_SIZE,
             build: Callable[[str], torch.nn.Module] = fused_resnet50) -> Rehearsal:
    """Runs the combinations on the stand-in GPU and records every call and launch. build:
    the model for a layout ("channels_last", "nchw"), made on the stand-in GPU (default: a
    fused torchvision ResNet-50), one per layout."""
    from fused_resnet import backend, tuning
    from fused_resnet.ops import conv as conv_ops

    result = Rehearsal(tuple(combinations), batch, image_size)
    current: dict = {"recorder": None}
    launches: list = []
    with warnings.catch_warnings(record=True) as warned, stand_in_gpu(), \
            remembering_function_inputs(), tuning.enumerating(), \
            capture.recorded_launches(lambda: current["recorder"].where()) as launches:
        warnings.simplefilter("always")
        models = {}
        for combination in result.combinations:
            if combination.layout not in models:
                models[combination.layout] = build(combination.layout)
            model = models[combination.layout]
            for p in model.parameters():
                p.grad = None
            x, target = _inputs(combination, batch, image_size)
            shapes = {tuple(p.shape) for p in model.parameters()}
            recorder = current["recorder"] = _Recorder(result, combination, shapes)
            with backend.use(combination.backend), recorder, unittest.mock.patch.object(
                    conv_ops, "choose_path", recorder.offer_every_path):
                missing = _run(model, combination, x, target)
            if missing:
                result.problems.append(Problem("path", f"{combination} | model", missing))
    result.launches = [_kernel_launch(launch) for launch in launches]
    result.warnings = list(dict.fromkeys(
        f"{w.category.__name__}: {w.message} ({_package_path(w.filename)}:{w.lineno})"
        for w in warned if _package_path(w.filename)))
    return result


def _package_path(filename: str) -> Optional[str]:
    """The path of `filename` in the package (fused_resnet/..., kernels/...), or None for
    another file (torch's notes about its own internals are not the rehearsal's business; nor
    is this module)."""
    import importlib.util

    filename = os.path.abspath(filename)
    if filename == os.path.abspath(__file__):
        return None
    for package in ("fused_resnet", "fused_resnet.kernels"):
        for root in importlib.util.find_spec(package).submodule_search_locations or []:
            if filename.startswith(os.path.abspath(root) + os.sep):
                return os.path.join(os.path.basename(root), os.path.relpath(filename, root))
    return None


def _kernel_launch(launch: capture.Launch) -> KernelLaunch:
    values, options = capture.bind(launch.fn, launch.args, launch.kwargs)
    grid = launch.grid(values) if callable(launch.grid) else launch.grid
    name = getattr(launch.fn, "__name__", None) or launch.fn.fn.__name__
    return KernelLaunch(name, tuple(int(g) for g in grid),
                        {k: capture.describe(v) for k, v in values.items()}, launch.context,
                        options, tuple(p.name for p in launch.fn.params if p.is_constexpr))


# ---- the report ---------------------------------------------------------------------------------
def _layout_name(spec: TensorSpec) -> str:
    if _same_strides(spec, _dense_strides(spec.shape, False)):
        return ""
    if len(spec.shape) == 4 and _same_strides(spec, _dense_strides(spec.shape, True)):
        return " channels_last"
    return f" strides {list(spec.stride)}"


def show_value(value) -> str:
    """A recorded argument as the report shows it: a tensor as dtype, shape and layout."""
    if isinstance(value, TensorSpec):
        offset = f" +{value.offset}" if value.offset else ""
        return (f"{_dtype_name(value.dtype)} {'x'.join(map(str, value.shape)) or 'scalar'}"
                f"{_layout_name(value)}{offset}")
    if isinstance(value, tuple):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    return repr(value)


def _combination_of(where: str) -> Tuple[str, str]:
    combination, _, trail = where.partition(" | ")
    return combination, trail


def _grouped(items: Iterable, key: Callable, row: Callable) -> List[dict]:
    """One row per distinct key(item): row(item) of its first item, with the number of items
    and the combinations and nestings they came from."""
    rows: Dict[object, dict] = {}
    for item in items:
        combination, trail = _combination_of(item.where)
        entry = rows.get(key(item))
        if entry is None:
            entry = rows[key(item)] = {**row(item), "count": 0, "combinations": [], "from": []}
        entry["count"] += 1
        for name, value in (("combinations", combination), ("from", trail)):
            if value not in entry[name]:
                entry[name].append(value)
    return list(rows.values())


def call_rows(rehearsal: Rehearsal) -> List[dict]:
    """Distinct op calls: the op, its arguments, the conv paths it offered (None where the path
    can run, else why not), a C++ kernel op's launch (CUTLASS: plan and grid)."""
    def key(call):
        return call.op, call.args, tuple(call.offered.items()), repr(call.native)

    def row(call):
        return {"op": call.op, "args": [show_value(a) for a in call.args if a is not None],
                "outputs": [show_value(o) for o in call.outputs], "offered": dict(call.offered),
                "native": call.native}

    return _grouped(rehearsal.calls, key, row)


def _constexprs(launch: KernelLaunch) -> Dict[str, object]:
    """The launch's compile-time arguments and options."""
    return {**{k: launch.args[k] for k in launch.constexprs}, **launch.options}


def int32_rows(rehearsal: Rehearsal) -> List[dict]:
    """Per kernel and int32 index: the largest value it takes in any launch, and where."""
    rows: Dict[Tuple[str, str], dict] = {}
    for launch in rehearsal.launches:
        model = KERNEL_MODELS.get(launch.kernel)
        for premise in model(launch.args, launch.grid) if model else ():
            if premise.check != "int32":
                continue
            row = rows.setdefault((launch.kernel, premise.what), {
                "kernel": launch.kernel, "index": premise.what, "largest": -1, "where": ""})
            if premise.largest > row["largest"]:
                row.update(largest=premise.largest, where=launch.where)
    return sorted(rows.values(), key=lambda row: -row["largest"])


def launch_rows(rehearsal: Rehearsal) -> List[dict]:
    """Distinct Triton launches: kernel, grid, constexprs and options, tensor arguments."""
    def key(launch):
        return launch.kernel, launch.grid, tuple(launch.args.items()), \
            tuple(sorted(launch.options.items()))

    def row(launch):
        tensors = {k: show_value(v) for k, v in launch.args.items()
                   if isinstance(v, TensorSpec)}
        return {"kernel": launch.kernel, "grid": list(launch.grid),
                "constexprs": {k: v for k, v in _constexprs(launch).items()},
                "tensors": tensors}

    return _grouped(rehearsal.launches, key, row)


def summary(rehearsal: Rehearsal) -> Dict[str, dict]:
    """Per combination: how many op calls, Triton launches and C++ kernel op calls, which
    kernels and ops."""
    out = {str(c): {"op_calls": 0, "triton_launches": 0, "native_calls": 0, "ops": [],
                    "kernels": [], "native_ops": []} for c in rehearsal.combinations}
    for call in rehearsal.calls:
        entry = out[_combination_of(call.where)[0]]
        kind = "native" if call.native is not None else "op"
        entry[f"{kind}_calls"] += 1
        names = entry["native_ops" if kind == "native" else "ops"]
        if call.op not in names:
            names.append(call.op)
    for launch in rehearsal.launches:
        entry = out[_combination_of(launch.where)[0]]
        entry["triton_launches"] += 1
        if launch.kernel not in entry["kernels"]:
            entry["kernels"].append(launch.kernel)
    return out


def to_json(rehearsal: Rehearsal, problems: Optional[List[Problem]] = None) -> dict:
    problems = rehearsal.all_problems() if problems is None else problems
    return {"batch": rehearsal.batch, "image_size": rehearsal.image_size,
            "combinations": [str(c) for c in rehearsal.combinations],
            "problems": [{"check": p.check, "where": p.where, "detail": p.detail}
                         for p in problems],
            "warnings": rehearsal.warnings, "summary": summary(rehearsal),
            "int32": int32_rows(rehearsal), "calls": call_rows(rehearsal),
            "launches": launch_rows(rehearsal)}


def _cell(value) -> str:
    return str(value).replace("|", "\\|")


def _offered_cell(offered: Dict[str, Optional[str]]) -> str:
    return "; ".join(name if why is None else f"~~{name}~~ ({why})"
                     for name, why in offered.items())


def _native_cell(native: Optional[dict]) -> str:
    if not native:
        return ""
    plan = native["cutlass_plan"]
    if plan["unsupported"]:
        return f"refused: {plan['unsupported']}"
    return (f"C padded to {plan['padded_c']}, {plan['p']}x{plan['q']} out, tile "
            f"{'x'.join(map(str, native['threadblock']))}, grid {native['grid']}")


def markdown(rehearsal: Rehearsal, problems: Optional[List[Problem]] = None) -> str:
    """The report: problems, then every distinct op call (with the paths it offered and why a
    path was refused), every distinct Triton launch (grid, constexprs) and C++ kernel op call."""
    problems = rehearsal.all_problems() if problems is None else problems
    lines = [f"# GPU rehearsal: fused ResNet-50, batch {rehearsal.batch}, "
             f"{rehearsal.image_size}x{rehearsal.image_size}, sm_90",
             "", "Fake CUDA tensors on the CPU: nothing ran, every kernel launch was recorded "
             "(fused_resnet.aot.rehearsal).", "",
             "| combination | op calls | Triton launches | C++ / CUTLASS calls |",
             "|---|---|---|---|"]
    for name, entry in summary(rehearsal).items():
        lines.append(f"| {name} | {entry['op_calls']} | {entry['triton_launches']} | "
                     f"{entry['native_calls']} |")
    by_check = {check: [p for p in problems if p.check == check] for check in CHECKS}
    lines += ["", f"## Problems: {len(problems) or 'none'}", ""]
    lines += [f"- {check}: {len(found) or 'none'}" for check, found in by_check.items()]
    for check, found in by_check.items():
        lines += [f"  - [{check}] {p.where}: {p.detail}" for p in found]
    if rehearsal.warnings:
        lines += ["", "## Warnings the code gave", ""] + [f"- {w}" for w in rehearsal.warnings]
    lines += ["", "## int32 indices: the largest value each takes", "",
              "| kernel | index | largest | of 2^31 - 1 | in |", "|---|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['index']} | {r['largest']:,} | "
              f"{r['largest'] / INT32_MAX:.2%} | {_cell(r['where'])} |"
              for r in int32_rows(rehearsal)]
    lines += ["", "## Op calls", "",
              "Paths: offered and able to run; ~~struck~~: offered, cannot run here (why).", "",
              "| op | arguments | paths | C++ / CUTLASS launch | calls | combinations | from |",
              "|---|---|---|---|---|---|---|"]
    for row in call_rows(rehearsal):
        lines.append("| " + " | ".join(_cell(v) for v in (
            row["op"], ", ".join(row["args"]), _offered_cell(row["offered"]),
            _native_cell(row["native"]), row["count"], len(row["combinations"]),
            row["from"][0] + (f" (+{len(row['from']) - 1})" if len(row["from"]) > 1 else "")))
            + " |")
    lines += ["", "## Triton launches", "",
              "| kernel | grid | constexprs | tensors | launches | combinations |",
              "|---|---|---|---|---|---|"]
    for row in launch_rows(rehearsal):
        constexprs = " ".join(f"{k}={v}" for k, v in row["constexprs"].items())
        tensors = ", ".join(f"{k}: {v}" for k, v in row["tensors"].items())
        lines.append("| " + " | ".join(_cell(v) for v in (
            row["kernel"], tuple(row["grid"]), constexprs, tensors, row["count"],
            len(row["combinations"]))) + " |")
    return "\n".join(lines) + "\n"
