"""Functional check of every kernel the dispatcher can pick, against a float64 reference, on
shapes with partial edge tiles and on the batch-256 ResNet-50 layer shapes (the first thing a
GPU visit runs: benchmarks/gpu_session.sh call1).

    python benchmarks/gpu_check.py --out gpu-check.jsonl [--jobs 8] [--time-limit 120]
    python benchmarks/gpu_check.py --dry-run --out check.jsonl   # CPU: interpreter, tiny sizes

What runs, each path forced by name (not left to the tuner, which would run only the winner):
- conv ops, as fused ResNet-50 calls them (layer shapes from torchvision's resnet50): eval
  conv2d_epilogue (bias + ReLU; bias + residual + ReLU; bias alone: the downsample under
  autocast), conv2d_dual_epilogue (conv3 + projection shortcut, bf16/fp16 models), training
  conv2d_bn_stats and bn_relu_conv2d_bn_stats (BN + ReLU prologue). Every candidate of the op's
  dispatch plan (fused_resnet.ops.conv.dispatch_plan): "triton" once per tile configuration
  the tuner would measure (forced through kernels.conv._choose_config), "cutlass", "library"
  (cuDNN + the BN pieces) under the C++ and the Triton BN backend;
- the BN pieces (bn_stats, bn_add_relu_apply, bn_add_relu_grad_reduce, bn_add_relu_grad_apply)
  of both backends (<piece>_cpp: the C++ CUDA kernels; <piece>_triton), NCHW and NHWC, vector
  and scalar paths (odd sizes, a misaligned view), and at every ResNet-50 conv output shape.

Tiers, run in this order (a time limit cuts the last ones; a cut check is reported "not run"):
  0 BN pieces, small odd shapes          1 conv ops at edge-tile shapes (real channel counts,
  2 BN pieces at batch-256 shapes          N*OH*OW = 162: partial 64- and 128-row tiles)
  3 conv ops at batch-256 shapes, bf16   4 the same in fp16
Triton compiles each variant in tier 1; tiers 3-4 reuse them (sizes are run-time arguments).

The comparison is local (one bad tile fails): the output is cut into blocks of 64 rows
(pixels) x 32 channels, finer than any kernel tile, and in each block
    max |got - ref| <= tol * max m,    m = the magnitudes summed into the output
(|conv|, |bias|, |residual|, |output|), with tol = r * 2u + K * 2^-24: r roundings to the
output dtype (u = 2^-8 bf16, 2^-11 fp16, 2^-24 fp32, doubled: a conversion may truncate, as
the CPU interpreter's do; the library path rounds the conv output, then the epilogue's: r = 2;
the dual op's library path r = 3) plus fp32 accumulation over K products. A block 5% off is
caught in bf16, 1% in fp16. Per-channel outputs (BN statistics, backward coefficients) are
checked channel by channel. NaN or Inf where the reference is finite fails. Each output buffer
is poisoned first (the caching allocator's block filled with NaN bits), so an unwritten tile
shows. Conv outputs must also pass fused_resnet.compare.conv_agreement (the tuner's
tile-by-tile measure) against the reference rounded to the output dtype.

Reference: torch's float64 conv and fused_resnet.reference in float64, from the same
low-precision inputs, on the CPU; for batch-256 shapes on the GPU (a CPU float64 conv of every
ResNet-50 layer at batch 256 takes minutes; the GPU's float64 kernels share nothing with the
bf16/fp16 paths under test).

One JSON line per check is appended to --out as it finishes (a cut run keeps what finished);
the last stdout line is "gpu_check: N checks: ..." and the exit status 0 (all passed), 1 (a
check failed or errored), 3 (some not run: time limit). --dry-run (CPU, TRITON_INTERPRET=1):
tiers 0-1 at tiny sizes, fp32/fp16 convs (the interpreter's bf16 tl.dot is broken), CUTLASS
reported skipped.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
import zlib
from typing import Callable, List, Optional

import torch

DRY_RUN = "--dry-run" in sys.argv[1:]
if DRY_RUN or not torch.cuda.is_available():  # before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

import fused_resnet  # noqa: E402,F401  (registers torch.ops.fused_resnet)
from fused_resnet import backend, layout, reference  # noqa: E402
from fused_resnet.ops import bn_relu_conv  # noqa: E402

try:  # the tuner's tile-by-tile agreement measure, applied here too (a second opinion)
    from fused_resnet import compare  # noqa: E402
except ImportError:  # an older tree
    compare = None
from fused_resnet.ops import conv as conv_ops  # noqa: E402

ops = torch.ops.fused_resnet
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}
FP32_U = 2.0 ** -24
# A conversion to the output dtype may truncate rather than round to nearest (Triton's CPU
# interpreter does: errors up to 2u seen there); on the GPU it rounds (u): a factor 2 of room.
TRUNCATION = 2
BLOCK_ROWS, BLOCK_CHANNELS = 64, 32  # finer than every Triton (64x64 up) and CUTLASS tile
# Per-channel reductions in fp32 over up to 256*112*112 = 3.2M elements, accumulated over up
# to ~25,000 row tiles: rounding ~u*sqrt(tiles) ~ 1e-5 relative (random walk); bounds 10x that
# on the statistics (relative to the channel's RMS / second moment) and 100x on the backward
# coefficients (their formulas divide sums that cancel; relative to the channel's value plus
# the vector's RMS). A bad partial sum is caught at the small shapes (a few partials each).
STATS_TOL, COEFF_TOL = 1e-4, 1e-3
EPS = 1e-5
GPU_REFERENCE_NUMEL = 1 << 21  # larger outputs: the float64 reference on the GPU
CONV_PATHS = ("triton", "cutlass", "library")
BN_BACKENDS = ("cpp", "triton")


# ---- the plan -------------------------------------------------------------------------------
@dataclasses.dataclass
class Check:
    """One unit of work: a conv op at one shape and dtype (every path), or one BN shape."""
    tier: int
    name: str
    run: Callable  # run(record) -> None; record(dict) writes one JSON line per check


def resnet50_convs(batch: int, image: int):
    """(name, input shape, weight shape, stride, padding) of every conv of torchvision's
    resnet50 at this batch and image size (meta tensors: nothing is computed)."""
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.resnet50()
    found = []

    def hook(name):
        def record(module, inputs, output):
            found.append((name, tuple(inputs[0].shape), tuple(module.weight.shape),
                          module.stride[0], module.padding[0]))
        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(hook(name))
    model(torch.empty(batch, 3, image, image, device="meta"))
    return found


@dataclasses.dataclass(frozen=True)
class ConvCase:
    flavour: str  # epilogue_relu, epilogue_residual, epilogue_plain, dual, bn_stats, bn_relu_conv
    x: tuple
    w: tuple
    stride: int
    pad: int
    shortcut: Optional[tuple] = None  # dual: (x2 shape, w2 shape, stride2)


# what fused ResNet-50 runs at each conv: eval (BN folded) and training
EVAL_FLAVOUR = {"stem": "epilogue_relu", "conv1": "epilogue_relu", "conv2": "epilogue_relu",
                "conv3": "epilogue_residual", "downsample": "epilogue_plain"}
TRAIN_FLAVOUR = {"stem": "bn_stats", "conv1": "bn_stats", "conv2": "bn_relu_conv",
                 "conv3": "bn_relu_conv", "downsample": "bn_stats"}


def _role(name: str) -> str:
    if name == "conv1":
        return "stem"
    return "downsample" if name.endswith("downsample.0") else name.rsplit(".", 1)[1]


def conv_cases(convs) -> List[ConvCase]:
    """Distinct (flavour, shapes) of the fused ResNet-50's conv op calls."""
    by_name = {c[0]: c for c in convs}
    cases = []
    for name, x, w, s, p in convs:
        role = _role(name)
        for flavour in (EVAL_FLAVOUR[role], TRAIN_FLAVOUR[role]):
            cases.append(ConvCase(flavour, x, w, s, p))
        ds = by_name.get(name.replace("conv3", "downsample.0")) if role == "conv3" else None
        if ds is not None:
            cases.append(ConvCase("dual", x, w, s, p, (ds[1], ds[2], ds[3])))
    return list(dict.fromkeys(cases))


def _edge_size(kernel: int, stride: int, pad: int, out: int = 9) -> int:
    """An input size giving `out` output rows (2 * 9 * 9 = 162 output pixels: a partial tile
    for every tile height)."""
    return (out - 1) * stride + kernel - 2 * pad


def at_edge_shape(case: ConvCase, batch: int, out: int) -> ConvCase:
    """The same op and channel counts (the variant Triton compiles) at a small odd size."""
    h = _edge_size(case.w[2], case.stride, case.pad, out)
    shortcut = None
    if case.shortcut is not None:
        x2, w2, s2 = case.shortcut
        shortcut = ((batch, x2[1], out * s2, out * s2), w2, s2)
    return dataclasses.replace(case, x=(batch, case.x[1], h, h), shortcut=shortcut)


def _shrink(case: ConvCase, factor: int) -> ConvCase:
    """Dry run: channel counts / factor (at least 8; the stem keeps its 3)."""
    def c(n):
        return n if n == 3 else max(8, n // factor)
    x, w = case.x, case.w
    shortcut = None
    if case.shortcut is not None:
        x2, w2, s2 = case.shortcut
        shortcut = ((x2[0], c(x2[1]), x2[2], x2[3]), (c(w2[0]), c(w2[1]), 1, 1), s2)
    return dataclasses.replace(case, x=(x[0], c(x[1]), x[2], x[3]),
                               w=(c(w[0]), c(w[1]), w[2], w[3]), shortcut=shortcut)


def _dims(shape) -> str:
    return "x".join(str(d) for d in shape)


def _case_id(case: ConvCase, dtype) -> str:
    sc = f"_shortcut{_dims(case.shortcut[0])}s{case.shortcut[2]}" if case.shortcut else ""
    return (f"conv_{case.flavour}_x{_dims(case.x)}_w{_dims(case.w)}_s{case.stride}_p{case.pad}"
            f"{sc}_{_dtype_name(dtype)}")


def _seed(text: str) -> int:
    """The same inputs in every process (str hashes are salted per process)."""
    return zlib.crc32(text.encode())


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def build_plan(dry_run: bool, device: str) -> List[Check]:
    plan: List[Check] = []
    # the interpreter takes ~1 s per BN piece at these sizes: fewer in a dry run
    for shape, offset in BN_DRY_RUN if dry_run else BN_SMALL:
        for dtype in (torch.float32, torch.bfloat16) if dry_run else \
                (torch.float32, torch.float16, torch.bfloat16):
            for cl in (False, True):
                plan.append(_bn_check(0, shape, offset, dtype, cl, device))
    if dry_run:
        # one block of each kind (stem, layer1.0 with its projection, layer2.0 strided), small
        convs = [c for c in resnet50_convs(1, 64)
                 if c[0] == "conv1" or c[0].startswith(("layer1.0.", "layer2.0."))]
        cases = [_shrink(c, 16) for c in conv_cases(convs)]
        for case in cases:
            for dtype in (torch.float16, torch.float32):
                plan.append(_conv_check(1, at_edge_shape(case, 1, 5), dtype, device))
        return plan
    cases = conv_cases(resnet50_convs(256, 224))
    for dtype in (torch.bfloat16, torch.float16):
        for case in cases:
            plan.append(_conv_check(1, at_edge_shape(case, 2, 9), dtype, device))
    outputs = sorted({(256, c.w[0], *_out_hw(c)) for c in cases}, key=lambda s: -s[1])
    for shape in outputs:
        for dtype in (torch.bfloat16, torch.float16):
            plan.append(_bn_check(2, shape, 0, dtype, True, device))
    for tier, dtype in ((3, torch.bfloat16), (4, torch.float16)):
        for case in cases:
            plan.append(_conv_check(tier, case, dtype, device))
    return plan


def _out_hw(case: ConvCase):
    h = (case.x[2] + 2 * case.pad - case.w[2]) // case.stride + 1
    return h, h


# ---- comparison ------------------------------------------------------------------------------
def _rows(t: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N*H*W, C] (pixel rows, as the kernels tile the output)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _block_max(t: torch.Tensor) -> torch.Tensor:
    rows, channels = t.shape
    pr, pc = -rows % BLOCK_ROWS, -channels % BLOCK_CHANNELS
    t = F.pad(t, (0, pc, 0, pr))
    return t.view(t.shape[0] // BLOCK_ROWS, BLOCK_ROWS, t.shape[1] // BLOCK_CHANNELS,
                  BLOCK_CHANNELS).amax(dim=(1, 3))


def local_error(got: torch.Tensor, want: torch.Tensor, magnitude: torch.Tensor):
    """(worst block's max |got - want| / max magnitude, where): 4-D tensors blocked as
    BLOCK_ROWS pixels x BLOCK_CHANNELS channels; non-finite got where want is finite: inf."""
    got = got.to(device=want.device, dtype=torch.float64)
    if got.shape != want.shape:
        return float("inf"), f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.dim() == 1:
        got, want, magnitude = (t.view(1, -1, 1, 1) for t in (got, want, magnitude))
    err = (got - want).abs()
    err = torch.where(torch.isfinite(got) | ~torch.isfinite(want), err,
                      torch.full_like(err, float("inf")))
    err = torch.where(torch.isnan(err), float("inf"), err)
    ratio = _block_max(_rows(err)) / _block_max(_rows(magnitude.abs())).clamp_min(1e-30)
    worst = ratio.max()
    index = int(ratio.argmax())
    rb, cb = divmod(index, ratio.shape[1])
    return float(worst), (f"rows {rb * BLOCK_ROWS}-{(rb + 1) * BLOCK_ROWS - 1}, channels "
                          f"{cb * BLOCK_CHANNELS}-{(cb + 1) * BLOCK_CHANNELS - 1}")


def normwise(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| over the whole output: recorded beside the local error, to show
    what a global check (the tuner's agreement check) would have seen."""
    got = got.to(device=want.device, dtype=torch.float64)
    if got.shape != want.shape:
        return float("inf")
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def tuning_measure(got, want, dtype):
    """fused_resnet.compare.conv_agreement (what the tuner requires of a candidate against the
    library conv) of the outputs against the reference rounded to the output dtype."""
    rounded = [w.to(dtype) if w.dim() == 4 else w.float() for w in want]
    return compare.conv_agreement([g.to(w.device) for g, w in zip(got, want)], rounded)


def channel_error(got: torch.Tensor, want: torch.Tensor, magnitude: torch.Tensor):
    """Per-channel outputs: worst |got - want| / magnitude over channels."""
    got = got.to(device=want.device, dtype=torch.float64)
    if got.shape != want.shape:
        return float("inf"), f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    ratio = (got - want).abs() / magnitude.clamp_min(1e-30)
    ratio = torch.where(torch.isnan(ratio), float("inf"), ratio)
    return float(ratio.max()), f"channel {int(ratio.argmax())}"


def verdict(what: dict, error: float, where: str, tol: float) -> dict:
    return {**what, "status": "pass" if error <= tol else "fail", "error": error, "tol": tol,
            "worst_at": where}


# ---- conv checks -------------------------------------------------------------------------------
def _reference_device(numel: int, device: str) -> str:
    return "cuda" if device == "cuda" and numel > GPU_REFERENCE_NUMEL else "cpu"


class _Offered(Exception):
    def __init__(self, configs):
        super().__init__("tile configurations offered")
        self.configs = configs


def offered_configs(run_on_meta: Callable) -> list:
    """The tile configurations the Triton conv's tuner chooses from for a call, every one some
    problem could measure (run_on_meta: the op's "triton" candidate on meta tensors, as
    fused_resnet.aot enumerates them); nothing is compiled or launched."""
    from fused_resnet import tuning

    original = tuning.tuned_choice

    def offered(key, candidates, *args, **kwargs):
        if isinstance(key, tuple) and key and key[0] == "conv_tile":
            raise _Offered(list(candidates))
        return original(key, candidates, *args, **kwargs)

    tuning.tuned_choice = offered
    try:
        with tuning.enumerating():
            run_on_meta()
    except _Offered as found:
        return found.configs
    finally:
        tuning.tuned_choice = original
    raise RuntimeError("the Triton conv chose a tile configuration without its tuner")


@contextlib.contextmanager
def forced_tile(config):
    """Inside, the Triton conv launches `config` (kernels.conv._choose_config replaced)."""
    from fused_resnet.kernels import conv as kconv

    original, kconv._choose_config = kconv._choose_config, lambda *args, **kwargs: config
    try:
        yield
    finally:
        kconv._choose_config = original


def _poison(nbytes: int, device: str) -> None:
    """Fill a block the caching allocator hands out next with NaN bits (0xFF bytes), so an
    output tile a kernel never writes shows up as NaN."""
    if device == "cuda" and nbytes:
        torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(255)


def _generator(device: str, text: str) -> torch.Generator:
    """Seeded from the check's description: the same inputs in every process and run; drawn
    on the device (batch-256 inputs are ~10^8 values: the CPU would take seconds each)."""
    return torch.Generator(device=device).manual_seed(_seed(text))


def _conv_inputs(case: ConvCase, dtype, device):
    """The op's inputs on the device (4-D ones channels_last), as one dict for the op and the
    reference (which reads them in float64 on its own device)."""
    g = _generator(device, repr(case) + str(dtype))

    def randn(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, device=device) * scale + shift

    cl = torch.channels_last
    fan_in = case.w[1] * case.w[2] * case.w[3]
    t = {"x": randn(*case.x, scale=2.0 if case.flavour == "bn_relu_conv" else 1.0,
                    shift=0.5 if case.flavour == "bn_relu_conv" else 0.0).to(dtype),
         "w": (randn(*case.w) / fan_in ** 0.5).to(dtype), "bias": randn(case.w[0])}
    n, _, oh, ow = case.x[0], None, *_out_hw(case)
    if case.flavour == "epilogue_residual":
        t["residual"] = randn(n, case.w[0], oh, ow).to(dtype)
    if case.shortcut is not None:
        x2, w2, _ = case.shortcut
        t["x2"] = randn(*x2).to(dtype)
        t["w2"] = (randn(*w2) / w2[1] ** 0.5).to(dtype)
    if case.flavour == "bn_relu_conv":
        var, mean = torch.var_mean(t["x"].float(), dim=(0, 2, 3), correction=0)
        t.update(mean=mean, var=var, bn_w=randn(case.x[1], scale=0.2, shift=1.0),
                 bn_b=randn(case.x[1], scale=0.2))
    on_device = {k: v.contiguous(memory_format=cl) if v.dim() == 4 else v for k, v in t.items()}
    return on_device, on_device


def _op_call(case: ConvCase, d):
    """(op name, args) of the dispatcher's op for this case on device tensors d."""
    s, p = [case.stride] * 2, [case.pad] * 2
    if case.flavour.startswith("epilogue"):
        return "conv2d_epilogue", (d["x"], d["w"], s, p, [1, 1], 1, None, d["bias"],
                                   d.get("residual"), case.flavour != "epilogue_plain")
    if case.flavour == "dual":
        return "conv2d_dual_epilogue", (d["x"], d["w"], s, p, d["x2"], d["w2"],
                                        case.shortcut[2], d["bias"], True)
    if case.flavour == "bn_stats":
        return "conv2d_bn_stats", (d["x"], d["w"], s, p, [1, 1], 1)
    return "bn_relu_conv2d_bn_stats", (d["x"], d["bn_w"], d["bn_b"], d["mean"], d["var"], EPS,
                                       d["w"], s, p, [1, 1], 1)


def _plan_of(op, args):
    if op == "bn_relu_conv2d_bn_stats":
        return bn_relu_conv.dispatch_plan(*args)
    return conv_ops.dispatch_plan(op, *args)


def _conv_reference(case: ConvCase, t: dict, dtype, ref_device: str):
    """(outputs, magnitudes, roundings) of the op in float64 on ref_device."""
    def dev(v):
        return v.to(device=ref_device, dtype=torch.float64)

    x, w = dev(t["x"]), dev(t["w"])
    if case.flavour == "bn_relu_conv":  # the prologue as the op computes it, then rounded
        scale, shift = reference.bn_centred_scale_shift(t["var"], t["bn_w"], t["bn_b"], EPS)
        a = torch.relu((x - dev(t["mean"]).view(1, -1, 1, 1)) * dev(scale).view(1, -1, 1, 1)
                       + dev(shift).view(1, -1, 1, 1))
        x = a.to(dtype).to(torch.float64)
    z = F.conv2d(x, w, None, case.stride, case.pad)
    if case.flavour in ("bn_stats", "bn_relu_conv"):
        var, mean = torch.var_mean(z, dim=(0, 2, 3), correction=0)
        square = (z * z).mean(dim=(0, 2, 3))
        return [z, mean, var], [z, square.sqrt(), square], 1
    bias = dev(t["bias"]).view(1, -1, 1, 1)
    magnitude = z.abs() + bias.abs()
    y = z + bias
    roundings = 2
    if case.flavour == "dual":
        z2 = F.conv2d(dev(t["x2"]), dev(t["w2"]), None, case.shortcut[2])
        y, magnitude, roundings = y + z2, magnitude + z2.abs(), 3
    if "residual" in t:
        r = dev(t["residual"])
        y, magnitude = y + r, magnitude + r.abs()
    if case.flavour != "epilogue_plain":
        y = torch.relu(y)
    return [y], [magnitude + y.abs()], roundings


def _conv_tolerances(case: ConvCase, dtype, roundings: int):
    k = case.w[1] * case.w[2] * case.w[3] + (case.shortcut[1][1] if case.shortcut else 0)
    u = TRUNCATION * UNIT_ROUNDOFF[dtype]
    out_tol = roundings * u + k * FP32_U
    if case.flavour in ("bn_stats", "bn_relu_conv"):
        # statistics from the rounded conv output (library, cutlass) or the fp32 accumulator
        # (triton): mean within u * rms, variance within 2u * E[z^2] (z(1 + d), |d| <= u)
        return [out_tol, 2 * u + k * FP32_U + STATS_TOL, 4 * u + k * FP32_U + STATS_TOL]
    return [out_tol]


def _paths(candidates: dict, flavour: str):
    """(path, BN backend, tile config) to run: every candidate of the plan that is a GPU path,
    each Triton tile configuration, the BN-piece paths under each BN backend."""
    for path in CONV_PATHS:
        if path not in candidates:
            continue
        if path == "triton":
            yield path, None, "offered"
        elif path == "library" or flavour == "bn_stats":  # these run BN pieces
            for bk in BN_BACKENDS:
                yield path, bk, None
        else:
            yield path, None, None


def _conv_check(tier: int, case: ConvCase, dtype, device: str) -> Check:
    name = _case_id(case, dtype)

    def run(record):
        t, d = _conv_inputs(case, dtype, device)
        ref_device = _reference_device(t["x"].numel() + _numel_out(case), device)
        want, magnitude, roundings = _conv_reference(case, t, dtype, ref_device)
        tols = _conv_tolerances(case, dtype, roundings)
        op, args = _op_call(case, d)
        candidates, conv = _plan_of(op, args)
        base = {"check": name, "tier": tier, "kind": "conv", "op": op, "flavour": case.flavour,
                "dtype": _dtype_name(dtype), "input": list(case.x), "weight": list(case.w)}
        nbytes = _numel_out(case) * torch.tensor([], dtype=dtype).element_size()
        for path, bk, tiles in _paths(candidates, case.flavour):
            what = {**base, "path": path, "backend": bk}
            why = conv_ops.why_path_cannot_run(path, *conv) or \
                (backend.why_not(bk, device) if bk else None)
            if why is not None:
                record({**what, "status": "skipped", "reason": why})
                continue
            configs = [None]
            if tiles == "offered":
                try:
                    meta = {k: torch.empty_like(v, device="meta") for k, v in d.items()}
                    meta_candidates, _ = _plan_of(*_op_call(case, meta))
                    configs = offered_configs(meta_candidates["triton"])
                except Exception as exc:  # noqa: BLE001
                    record({**what, "status": "error", "reason": f"listing the tile "
                            f"configurations: {type(exc).__name__}: {exc}"[:500]})
                    continue
            for config in configs:
                row = {**what, "config": list(config) if config else None}
                start = time.perf_counter()
                try:
                    _poison(nbytes, device)
                    # use_path: an op the candidate calls inside (the library path of
                    # bn_relu_conv calls conv2d_bn_stats) takes the same path
                    with backend.use(bk or "auto"), conv_ops.use_path(path), \
                            forced_tile(config) if config else contextlib.nullcontext():
                        got = candidates[path]()
                    got = got if isinstance(got, tuple) else (got,)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    results = []
                    for i, (g, w, m, tol) in enumerate(zip(got, want, magnitude, tols)):
                        check = local_error if g.dim() == 4 else channel_error
                        results.append(verdict({"output": i, "normwise": normwise(g, w)},
                                               *check(g, w, m), tol))
                    worst = max(results, key=lambda r: r["error"] / r["tol"])
                    row.update(worst, outputs=len(results))
                    ok = all(r["status"] == "pass" for r in results)
                    if compare is not None:
                        agreement = tuning_measure(got, want, dtype)
                        row.update(agreement=str(agreement), agreement_ratio=agreement.ratio)
                        ok = ok and agreement.ok
                    row["status"] = "pass" if ok else "fail"
                except Exception as exc:  # noqa: BLE001 - a path that raises is a result
                    row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:500])
                row["seconds"] = round(time.perf_counter() - start, 3)
                record(row)
        del t, d, want, magnitude

    return Check(tier, name, run)


def _numel_out(case: ConvCase) -> int:
    oh, ow = _out_hw(case)
    return case.x[0] * case.w[0] * oh * ow


# ---- BN piece checks ----------------------------------------------------------------------------
# (shape, storage offset): (2,3,5,7), (3,130,9,7): numel not a multiple of 8 (scalar path);
# (4,64,16,16): vector path; the same at offset 1: misaligned (scalar path)
BN_SMALL = [((2, 3, 5, 7), 0), ((3, 130, 9, 7), 0), ((4, 64, 16, 16), 0), ((4, 64, 16, 16), 1)]
BN_DRY_RUN = [((2, 3, 5, 7), 0), ((2, 16, 4, 4), 1)]


def _bn_inputs(shape, offset, dtype, channels_last, device):
    g = _generator(device, repr((shape, offset, dtype, channels_last)))
    c = shape[1]
    x = (torch.randn(shape, generator=g, device=device) * 2 + 0.5).to(dtype)
    r, grad = (torch.randn(shape, generator=g, device=device).to(dtype) for _ in range(2))
    w = torch.rand(c, generator=g, device=device) + 0.5
    b = torch.randn(c, generator=g, device=device) * 0.2
    cl = torch.channels_last if channels_last else torch.contiguous_format
    d = {k: v.contiguous(memory_format=cl) for k, v in (("x", x), ("r", r), ("grad", grad))}
    if offset:  # misaligned: the same values and strides, one element into the storage
        view = torch.empty(x.numel() + offset, dtype=dtype, device=device).as_strided(
            shape, d["x"].stride(), offset)
        d["x"] = view.copy_(d["x"])
    d.update(w=w, b=b)
    return d, d


def _bn_check(tier, shape, offset, dtype, channels_last, device) -> Check:
    name = (f"bn_{_dims(shape)}+{offset}_{_dtype_name(dtype)}_"
            f"{'nhwc' if channels_last else 'nchw'}")

    def run(record):
        t, d = _bn_inputs(shape, offset, dtype, channels_last, device)
        ref_device = _reference_device(t["x"].numel(), device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        h = {k: v.to(device=ref_device, dtype=torch.float64).contiguous(memory_format=fmt)
             if v.dim() == 4 else v.to(device=ref_device, dtype=torch.float64)
             for k, v in t.items()}
        base = {"check": name, "tier": tier, "kind": "bn", "shape": list(shape),
                "offset": offset, "dtype": _dtype_name(dtype),
                "layout": "nhwc" if channels_last else "nchw"}
        for bk in BN_BACKENDS:
            why = backend.why_not(bk, device)
            for piece in ("bn_stats", "bn_add_relu_apply", "bn_add_relu_grad_reduce",
                          "bn_add_relu_grad_apply"):
                row = {**base, "piece": piece, "backend": bk}
                if why is not None:
                    record({**row, "status": "skipped", "reason": why})
                    continue
                start = time.perf_counter()
                try:
                    row.update(_bn_piece(piece, getattr(ops, f"{piece}_{bk}"), d, h, dtype,
                                         device))
                except Exception as exc:  # noqa: BLE001
                    row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:500])
                row["seconds"] = round(time.perf_counter() - start, 3)
                record(row)

    return Check(tier, name, run)


def _per_channel(v):
    return v.view(1, -1, 1, 1)


def _bn_piece(piece, kernel, d, h, dtype, device) -> dict:
    """Run one BN piece on device tensors d; its float64 reference on h (same values)."""
    u = TRUNCATION * UNIT_ROUNDOFF[dtype]
    x = h["x"]
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    square = (x * x).mean(dim=(0, 2, 3))
    scale, shift = reference.bn_centred_scale_shift(var, h["w"], h["b"], EPS)  # shift = bias
    xmu = x - _per_channel(mean)
    pre = xmu * _per_channel(scale) + _per_channel(shift) + h["r"]
    results = []

    def out(got, want, magnitude, tol):
        check = local_error if want.dim() == 4 else channel_error
        results.append(verdict({"output": len(results)}, *check(got, want, magnitude), tol))

    dev = {"device": device, "dtype": torch.float32}
    mask = reference.pack_bits(layout.memory_order(pre > 0, x))  # x: the kernels' layout
    if piece == "bn_stats":
        got = kernel(d["x"], d["w"], d["b"], EPS)
        out(got[0], mean, square.sqrt(), STATS_TOL)
        out(got[1], var, square, 2 * STATS_TOL)
        out(got[2], scale, scale.abs(), STATS_TOL)
        out(got[3], shift, h["b"].abs(), STATS_TOL)
    elif piece == "bn_add_relu_apply":
        _poison(d["x"].numel() * d["x"].element_size(), device)
        got, got_mask = kernel(d["x"], d["r"], scale.to(**dev), shift.to(**dev), True, True,
                               mean.to(**dev))
        want = torch.relu(pre)
        # the kernel subtracts the fp32 mean: x - mean is exact where x is near it, and the
        # mean's own rounding moves every output of the channel by scale * ulp(mean) / 2
        magnitude = (xmu * _per_channel(scale)).abs() + _per_channel(shift).abs() + \
            h["r"].abs() + want.abs() + _per_channel((mean * scale).abs()) * FP32_U / u
        out(got, want, magnitude, u + 4 * FP32_U)
        # ReLU mask bits: equal wherever the pre-activation is not within rounding of 0
        bits = reference.relu_mask(got_mask.to(x.device), x).to(torch.float64)
        clear = (pre.abs() > 2 * (u + 4 * FP32_U) * magnitude).to(torch.float64)
        out(bits * clear, (pre > 0).to(torch.float64) * clear, torch.ones_like(pre), 0.0)
    else:
        mask_d = mask.to(device)
        g = h["grad"]
        dz = g * reference.relu_mask(mask.to(x.device), x)
        if piece == "bn_add_relu_grad_reduce":
            got = kernel(d["grad"], mask_d, d["x"], mean.to(**dev), var.to(**dev), d["w"], EPS,
                         True, True)
            want = reference.bn_add_relu_grad_reduce(g, mask.to(x.device), x, mean, var, h["w"],
                                                     EPS, True, True)
            for got_c, want_c in zip(got, want):
                out(got_c, want_c, want_c.abs() + want_c.pow(2).mean().sqrt(), COEFF_TOL)
        else:
            k, b, c = (torch.randn(x.shape[1], dtype=torch.float64, device=x.device)
                       for _ in range(3))
            _poison(d["x"].numel() * d["x"].element_size(), device)
            got = kernel(d["grad"], mask_d, d["x"], mean.to(**dev), k.to(**dev), b.to(**dev),
                         c.to(**dev), True, True)
            # the kernel's coefficients are the fp32 values: the reference uses the same
            k, b, c = (v.float().double() for v in (k, b, c))
            xmu = x - _per_channel(mean.float().double())
            dx = _per_channel(k) * dz + _per_channel(b) * xmu + _per_channel(c)
            magnitude = (_per_channel(k) * dz).abs() + (_per_channel(b) * xmu).abs() + \
                _per_channel(c).abs() + dx.abs()
            out(got[0], dx, magnitude, u + 8 * FP32_U)
            out(got[1], dz, dz.abs(), u)
    if device == "cuda":
        torch.cuda.synchronize()
    worst = max(results, key=lambda r: r["error"] / r["tol"] if r["tol"] else
                (0.0 if r["error"] == 0 else float("inf")))
    return {**worst, "outputs": len(results),
            "status": "pass" if all(r["status"] == "pass" for r in results) else "fail"}


# ---- running ------------------------------------------------------------------------------------
class Recorder:
    """Appends one JSON line per check to `path` (one write each: shards append concurrently)."""

    def __init__(self, path: str, verbose: bool):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.verbose = verbose

    def __call__(self, row: dict) -> None:
        os.write(self.fd, (json.dumps(row, default=str) + "\n").encode())
        if self.verbose or row["status"] not in ("pass", "skipped"):
            detail = row.get("reason") or f"error {row.get('error', 0):.2e} tol " \
                                          f"{row.get('tol', 0):.1e} at {row.get('worst_at')}"
            print(f"{row['status'].upper():7s} {row['check']} {row.get('path') or row.get('piece')}"
                  f" {row.get('backend') or ''} {row.get('config') or ''}: {detail}", flush=True)


def run_shard(plan: List[Check], shard: int, shards: int, stop_at: float, out: str,
              verbose: bool) -> None:
    record = Recorder(out, verbose)
    for i, check in enumerate(plan):
        if i % shards != shard:
            continue
        if time.time() > stop_at:
            record({"check": check.name, "tier": check.tier, "status": "not run",
                    "reason": "time limit"})
            continue
        try:
            check.run(record)
        except Exception as exc:  # noqa: BLE001 - e.g. its inputs or reference: the next runs
            record({"check": check.name, "tier": check.tier, "status": "error",
                    "reason": f"{type(exc).__name__}: {exc}"[:500]})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def tally(path: str) -> dict:
    counts: dict = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    status = json.loads(line)["status"]
                except (ValueError, KeyError):
                    status = "unreadable"
                counts[status] = counts.get(status, 0) + 1
    return counts


def summary_line(counts: dict) -> str:
    order = ["pass", "fail", "error", "skipped", "not run", "unreadable"]
    parts = [f"{counts.get(k, 0)} {k}" for k in order if counts.get(k) or k in ("pass", "fail")]
    return f"gpu_check: {sum(counts.values())} checks: " + ", ".join(parts)


def exit_status(counts: dict, dry_run: bool) -> int:
    bad = counts.get("fail", 0) + counts.get("error", 0) + counts.get("unreadable", 0)
    if not dry_run:
        bad += counts.get("skipped", 0)  # on a GPU every path must run
    if bad:
        return 1
    return 3 if counts.get("not run") else 0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--out", default="gpu-check.jsonl", help="JSON lines, appended")
    p.add_argument("--jobs", type=int, default=1, help="processes (Triton compiles in each)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds: no check starts after this (the rest: not run)")
    p.add_argument("--only", default=None, help="regular expression on check names")
    p.add_argument("--list", action="store_true", help="print the plan's checks and exit")
    p.add_argument("--verbose", action="store_true", help="a line per check, passes too")
    p.add_argument("--shard", default=None, help=argparse.SUPPRESS)  # k/N: a worker
    p.add_argument("--stop-at", type=float, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); --dry-run runs "
              "on the CPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    plan = [c for c in build_plan(args.dry_run, device)
            if args.only is None or re.search(args.only, c.name)]
    if args.list:
        for check in plan:
            print(check.tier, check.name)
        print(f"gpu_check: {len(plan)} checks planned")
        return 0
    stop_at = args.stop_at or (time.time() + args.time_limit if args.time_limit is not None
                               else float("inf"))
    if args.shard:
        shard, shards = (int(v) for v in args.shard.split("/"))
        run_shard(plan, shard, shards, stop_at, args.out, args.verbose)
        return 0
    if os.path.exists(args.out):
        os.unlink(args.out)
    print(f"gpu_check: {len(plan)} checks on {device}, {args.jobs} process(es); "
          f"lines to {args.out}", flush=True)
    if args.jobs <= 1:
        run_shard(plan, 0, 1, stop_at, args.out, args.verbose)
    else:
        _run_workers(args, argv, stop_at)
        record_missing(plan, args.out)
    counts = tally(args.out)
    print(summary_line(counts), flush=True)
    return exit_status(counts, args.dry_run)


# a worker still running this long after the time limit is stuck (a hung kernel): ended
GRACE_S = 60


def _run_workers(args, argv, stop_at: float) -> None:
    """args.jobs processes of this script, each a shard of the plan, appending to one file;
    ended if they outlive the time limit by GRACE_S or this process is interrupted."""
    own = list(sys.argv[1:] if argv is None else argv)
    workers = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *own,
                                 "--shard", f"{k}/{args.jobs}", "--stop-at", str(stop_at)])
               for k in range(args.jobs)]
    record = Recorder(args.out, False)
    try:
        for k, worker in enumerate(workers):
            try:
                worker.wait(timeout=max(1.0, stop_at + GRACE_S - time.time())
                            if stop_at != float("inf") else None)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
            if worker.returncode:
                record({"check": f"worker {k}/{args.jobs}", "status": "error",
                        "reason": f"exit status {worker.returncode} (its unfinished checks: "
                                  f"error, 'worker ended')"})
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()


def record_missing(plan: List[Check], path: str) -> None:
    """An error line for each planned check that has no line (its worker died or was ended
    while it ran): a crash must not read as fewer checks."""
    seen = set()
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    seen.add(json.loads(line)["check"])
                except (ValueError, KeyError):
                    pass
    record = Recorder(path, True)
    for check in plan:
        if check.name not in seen:
            record({"check": check.name, "tier": check.tier, "status": "error",
                    "reason": "worker ended"})


if __name__ == "__main__":
    sys.exit(main())
