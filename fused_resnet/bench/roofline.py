"""Roofline table per layer of a torchvision ResNet (ResNet-50 by default): for every fused op
this project runs on every conv (inference, training forward, training backward), its FLOPs,
the fewest bytes it must move, its arithmetic intensity and its time floor
max(FLOPs / peak FLOP/s, bytes / bandwidth); per-block, per-mode and whole-network totals; and,
where benchmark JSON from a matching device is given, the measured time and the fraction of
the floor reached.

    python -m fused_resnet.bench.roofline [--batch-size 256] [--dtype bf16] [--bandwidth 3.0e12]
        [--flops 790e12] [--device-name H100] [--measured JSON ...] [-o out.md] [--json out.json]

Which op runs where follows fused_resnet.modules (blocks.py, stem.py, conv_bn_act.py) and the
ops they call (ops/conv.py, ops/bn_relu_conv.py, ops/bn_add_relu.py). The floors are lower
bounds: see ASSUMPTIONS, which the report repeats in its header. fused_resnet.bench.floors
holds the coarser whole-model floors `fused-resnet bench` reports against; the report shows
them next to this table's totals.
"""

import argparse
import dataclasses
import json
import shlex
from collections import defaultdict
from typing import Iterable, NamedTuple, Optional

import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv

from fused_resnet import layout
from fused_resnet.bench import floors
from fused_resnet.modules.blocks import downsample_parts

PEAK_FLOPS = 790e12          # dense bf16 matmul rate measured on the lent H100s
BANDWIDTH = 3.0e12           # copy bandwidth measured on the lent H100s (3.0-3.35 TB/s)
OTHER_BANDWIDTHS = (3.0e12, 3.35e12, 4.3e12)  # H100 low / high, H200's measured copy rate
ELEMENT_SIZES = {"bf16": 2, "fp16": 2, "fp32": 4}
BENCH_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}  # JSON spelling
FP32 = 4  # per-channel vectors (statistics, scale, shift, BN parameters) are fp32

INFERENCE, TRAIN_FWD, TRAIN_BWD = "inference", "training forward", "training backward"
TRAIN_STEP = "training step"
MODES = (INFERENCE, TRAIN_FWD, TRAIN_BWD)
FUSED, LIBRARY = "fused", "library"
NOT_MEASURED = "not yet measured on GPU"

ASSUMPTIONS = [
    "Each tensor an op reads or writes crosses DRAM exactly once (L2 reuse assumed perfect: a "
    "conv reads its input and its weights once, however many tiles reuse them); activations "
    "and weights in the table's dtype, per-channel vectors (statistics, scale/shift, BN "
    "parameters) in fp32, ReLU masks 1 bit per element.",
    "A strided 1x1 conv reads only the input pixels it samples; its input gradient (dgrad) "
    "is written in full.",
    "FLOPs are the convolutions' multiply-adds, 2 per MAC (what the tensor-core peak bounds; "
    "equal to torch.utils.flop_counter's count); the few per-element BN / ReLU FLOPs of the "
    "epilogues and elementwise passes (CUDA cores) are not counted.",
    "The floor of a mode is the sum of its ops' floors (ops run one after another); the "
    "aggregate max(total FLOPs / peak, total bytes / bandwidth) is shown too, a looser bound "
    "that assumes compute and memory traffic of different ops overlap.",
    "Inference: BN folded into the weights, conv2d_epilogue per conv (shift, residual, ReLU in "
    "the epilogue), conv3 + projection shortcut as one conv2d_dual_epilogue GEMM (the path "
    "FusedBottleneck takes on a bf16 model without autocast; under autocast it runs the "
    "projection as its own conv2d_epilogue, see the note under the totals).",
    "Training: forward as conv_bn_act.conv_bn_relu_chain runs it; backward as the ops' "
    "autograd runs it: cuDNN dgrad and wgrad (one row each, each the forward's FLOPs), the "
    "fused BN(-add-ReLU) backward (reduce and apply: grad, input and mask read twice), the "
    "BN + ReLU recomputed from the saved conv output before conv2 / conv3's backward, and "
    "autograd's sum of the two input-gradient branches of a block. Weight gradients are "
    "counted in the table's dtype (autocast accumulates them into fp32 .grad: not counted).",
    "Rows marked `library` run only on the library-conv path (a separate BN statistics "
    "pass; the BN + ReLU written before the next conv reads it): not in the totals, summed "
    "separately. Not in the table: max pool, average pool, classifier, loss, optimizer step, "
    "the autocast weight casts.",
]


class Peaks(NamedTuple):
    flops: float = PEAK_FLOPS
    bandwidth: float = BANDWIDTH

    def compute_seconds(self, flops: float) -> float:
        return flops / self.flops

    def memory_seconds(self, nbytes: float) -> float:
        return nbytes / self.bandwidth

    def floor_seconds(self, flops: float, nbytes: float) -> float:
        return max(self.compute_seconds(flops), self.memory_seconds(nbytes))

    def bound(self, flops: float, nbytes: float) -> str:
        return "compute" if self.compute_seconds(flops) >= self.memory_seconds(nbytes) \
            else "memory"


class Cost(NamedTuple):
    flops: int
    bytes: int

    def __add__(self, other):  # Cost + Cost: the work of both, one after the other
        return Cost(self.flops + other.flops, self.bytes + other.bytes)


# ---- the convs of the model and their shapes ----------------------------------------------
class Activation(NamedTuple):
    """An NCHW activation (or its gradient): what the elementwise ops stream through."""
    batch: int
    channels: int
    height: int
    width: int

    @property
    def numel(self) -> int:
        return self.batch * self.channels * self.height * self.width

    def __str__(self) -> str:
        return "x".join(map(str, self))


@dataclasses.dataclass(frozen=True)
class Conv:
    """One nn.Conv2d of the model with its input and output shapes (NCHW)."""
    name: str
    batch: int
    c_in: int
    height: int
    width: int
    c_out: int
    out_height: int
    out_width: int
    kernel: tuple
    stride: tuple
    padding: tuple
    groups: int

    @property
    def input(self) -> Activation:
        return Activation(self.batch, self.c_in, self.height, self.width)

    @property
    def output(self) -> Activation:
        return Activation(self.batch, self.c_out, self.out_height, self.out_width)

    @property
    def weight_numel(self) -> int:
        return self.c_out * (self.c_in // self.groups) * self.kernel[0] * self.kernel[1]

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.out_height * self.out_width * self.weight_numel

    @property
    def sampled_input_numel(self) -> int:
        """Input elements the conv reads: all of them, unless the kernel is smaller than the
        stride (a strided 1x1 conv skips rows and columns; in NHWC a pixel's channels are one
        contiguous run, so skipping pixels skips their bytes)."""
        return self.batch * self.c_in * _sampled(self.height, self.out_height, self.kernel[0],
                                                 self.stride[0]) \
            * _sampled(self.width, self.out_width, self.kernel[1], self.stride[1])

    @property
    def geometry(self) -> tuple:
        """What test_bench_conv.py names a layer by: (C_in, C_out, kernel, stride, padding,
        input H)."""
        return (self.c_in, self.c_out, self.kernel[0], self.stride[0], self.padding[0],
                self.height)

    def describe(self) -> str:
        return f"{self.input} -> {self.output}, " \
               f"{self.kernel[0]}x{self.kernel[1]}/{self.stride[0]}"


def _sampled(size: int, out: int, kernel: int, stride: int) -> int:
    return size if kernel >= stride else min(size, out * kernel)


def trace_convs(model: nn.Module, batch_size: int, image_size: int) -> dict:
    """{module name: Conv} for every nn.Conv2d, from one forward on the meta device (shapes
    only: nothing is computed or allocated)."""
    names = {module: name for name, module in model.named_modules()}
    convs = {}

    def record(module, inputs, output):
        n, c_in, h, w = inputs[0].shape
        _, c_out, oh, ow = output.shape
        convs[names[module]] = Conv(names[module], n, c_in, h, w, c_out, oh, ow,
                                    module.kernel_size, module.stride, module.padding,
                                    module.groups)

    hooks = [m.register_forward_hook(record) for m in model.modules() if type(m) is nn.Conv2d]
    try:
        with torch.no_grad():
            model.eval()(torch.empty(batch_size, 3, image_size, image_size, device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    return convs


def meta_model(name: str) -> nn.Module:
    with torch.device("meta"):
        return getattr(torchvision.models, name)()


class Block(NamedTuple):
    """A residual block as the fused model runs it: its convs in order (the last one gets the
    residual), the projection shortcut's conv (None for an identity shortcut) and whether
    inference fuses that projection with the last conv into one GEMM."""
    name: str
    convs: list
    shortcut: Optional[Conv]
    dual: bool


def residual_blocks(model: nn.Module, convs: dict) -> list:
    blocks = []
    for name, module in model.named_modules():
        if not isinstance(module, (tv.BasicBlock, tv.Bottleneck)):
            continue
        count = 3 if isinstance(module, tv.Bottleneck) else 2
        chain = [convs[f"{name}.conv{i}"] for i in range(1, count + 1)]
        parts = downsample_parts(module.downsample)
        shortcut = None
        if parts is not None:
            conv_name = next(n for n, m in module.downsample.named_children() if m is parts[1])
            shortcut = convs[f"{name}.downsample.{conv_name}"]
        # FusedBottleneck._can_fuse_projection's static conditions (its other ones are about
        # autocast and autograd, i.e. the inference run this mode models)
        dual = isinstance(module, tv.Bottleneck) and shortcut is not None \
            and chain[-1].kernel == (1, 1) and chain[-1].stride == (1, 1) \
            and shortcut.kernel == (1, 1) and shortcut.padding == (0, 0)
        blocks.append(Block(name, chain, shortcut, dual))
    return blocks


# ---- what each fused op must move ---------------------------------------------------------
def _vectors(channels: int, count: int) -> int:
    return count * channels * FP32


def conv2d_epilogue_cost(conv: Conv, e: int, *, residual: bool) -> Cost:
    """Input (sampled), folded weight, the shift vector, residual if any, output."""
    moved = (conv.sampled_input_numel + conv.weight_numel + conv.output.numel) * e \
        + _vectors(conv.c_out, 1) + (conv.output.numel * e if residual else 0)
    return Cost(conv.flops, moved)


def conv2d_dual_epilogue_cost(conv: Conv, shortcut: Conv, e: int) -> Cost:
    """Both inputs, both weights (one GEMM, K concatenated), the summed shift, one output."""
    moved = (conv.sampled_input_numel + conv.weight_numel + shortcut.sampled_input_numel
             + shortcut.weight_numel + conv.output.numel) * e + _vectors(conv.c_out, 1)
    return Cost(conv.flops + shortcut.flops, moved)


def conv2d_bn_stats_cost(conv: Conv, e: int) -> Cost:
    """Input (sampled), weight, raw output z, and z's mean and variance."""
    moved = (conv.sampled_input_numel + conv.weight_numel + conv.output.numel) * e \
        + _vectors(conv.c_out, 2)
    return Cost(conv.flops, moved)


def bn_relu_conv2d_bn_stats_cost(conv: Conv, e: int) -> Cost:
    """conv2d_bn_stats reading the previous raw conv output instead of its activation, plus
    that BN's mean, variance, weight and bias (applied with the ReLU on load)."""
    return conv2d_bn_stats_cost(conv, e) + Cost(0, _vectors(conv.c_in, 4))


def bn_stats_cost(z: Activation, e: int) -> Cost:
    """The library path's statistics pass: read z, write mean, var, scale, shift."""
    return Cost(0, z.numel * e + _vectors(z.channels, 4))


def bn_relu_apply_cost(z: Activation, e: int, *, mask: bool) -> Cost:
    """relu(bn(z)) written out (the library path before the next conv; the recompute before a
    conv's backward, with the mask): read z, scale, shift; write a (+ 1-bit mask)."""
    return Cost(0, 2 * z.numel * e + _vectors(z.channels, 2)
                + (layout.mask_bytes(z.numel) if mask else 0))


def bn_add_relu_apply_cost(z: Activation, e: int, *, residual: bool, relu: bool,
                           mask: bool) -> Cost:
    """relu(z * scale + shift + residual): read z (+ residual), scale, shift; write out
    (+ the 1-bit ReLU mask when autograd needs it)."""
    moved = (2 + residual) * z.numel * e + _vectors(z.channels, 2)
    return Cost(0, moved + (layout.mask_bytes(z.numel) if relu and mask else 0))


def bn_add_relu_backward_cost(z: Activation, e: int, *, relu: bool,
                              residual_grad: bool) -> Cost:
    """grad_reduce then grad_apply: grad, input (+ mask) read by each pass; grad_input
    (+ grad_residual) written; per channel: reduce reads mean, var, weight and writes k, b, c,
    grad_weight, grad_bias; apply reads mean, k, b, c."""
    per_pass = 2 * z.numel * e + (layout.mask_bytes(z.numel) if relu else 0)
    written = (1 + residual_grad) * z.numel * e
    return Cost(0, 2 * per_pass + written + _vectors(z.channels, 12))


def conv_dgrad_cost(conv: Conv, e: int) -> Cost:
    """Input gradient: read grad_out and the weight, write grad_input (all of it)."""
    return Cost(conv.flops, (conv.output.numel + conv.weight_numel + conv.input.numel) * e)


def conv_wgrad_cost(conv: Conv, e: int) -> Cost:
    """Weight gradient: read grad_out and the (sampled) input, write grad_weight."""
    return Cost(conv.flops,
                (conv.output.numel + conv.sampled_input_numel + conv.weight_numel) * e)


def grad_sum_cost(x: Activation, e: int) -> Cost:
    """Autograd adds a block input's two gradient branches: read both, write the sum."""
    return Cost(0, 3 * x.numel * e)


# ---- rows -----------------------------------------------------------------------------------
class BenchTarget(NamedTuple):
    """A benchmark row that times this op (or a superset of it): which suite, its key, its
    mode, what it times (in words) and the floor cost of what it times."""
    kind: str
    key: tuple
    mode: str
    timed: str
    cost: Cost


@dataclasses.dataclass
class Row:
    block: str
    layer: str
    mode: str
    op: str
    shape: str
    cost: Cost
    path: str = FUSED
    target: Optional[BenchTarget] = None
    measured: Optional[dict] = None  # see _measured, once a benchmark row matched


def conv_target(conv: Conv, mode: str, e: int) -> BenchTarget:
    """test_bench_conv.py's rows: eval times conv2d_epilogue with a residual on every layer;
    train_fwd times conv2d_bn_stats + BN-apply + residual + ReLU (no grad: no mask)."""
    if mode == "eval":
        return BenchTarget("conv", conv.geometry, mode, "test_bench_conv eval (+ residual)",
                           conv2d_epilogue_cost(conv, e, residual=True))
    return BenchTarget("conv", conv.geometry, mode,
                       "test_bench_conv train_fwd (conv2d_bn_stats + apply + residual)",
                       conv2d_bn_stats_cost(conv, e) + bn_add_relu_apply_cost(
                           conv.output, e, residual=True, relu=True, mask=False))


def dual_target(conv: Conv, shortcut: Conv, e: int) -> BenchTarget:
    """test_bench_conv.py's eval_dual rows, keyed (C_mid, C_out, C_in, stride, input H)."""
    key = (conv.c_in, conv.c_out, shortcut.c_in, shortcut.stride[0], shortcut.height)
    return BenchTarget("dual", key, "eval_dual", "test_bench_conv eval_dual",
                       conv2d_dual_epilogue_cost(conv, shortcut, e))


def bn_add_relu_target(z: Activation, mode: str, e: int) -> BenchTarget:
    """test_bench_bn_add_relu.py's rows (always with a residual): train_fwd times the
    statistics pass + apply (no grad: no mask); train_fwdbwd that with the mask, plus the
    backward."""
    key = (z.channels, z.height, z.width)
    if mode == "train_fwd":
        return BenchTarget("bn_add_relu", key, mode,
                           "test_bench_bn_add_relu train_fwd (stats + apply)",
                           bn_stats_cost(z, e) + bn_add_relu_apply_cost(
                               z, e, residual=True, relu=True, mask=False))
    return BenchTarget("bn_add_relu", key, mode, "test_bench_bn_add_relu train_fwdbwd",
                       bn_stats_cost(z, e)
                       + bn_add_relu_apply_cost(z, e, residual=True, relu=True, mask=True)
                       + bn_add_relu_backward_cost(z, e, relu=True, residual_grad=True))


def _conv_with_stats_rows(block: str, conv: Conv, previous: Optional[Conv], e: int) -> list:
    """The training forward of one conv: conv2d_bn_stats on a tensor, or (previous given)
    bn_relu_conv2d_bn_stats applying the previous BN + ReLU on load; with the library path's
    extra passes (the activation written, the statistics pass)."""
    rows = []
    if previous is None:
        op, cost = "conv2d_bn_stats", conv2d_bn_stats_cost(conv, e)
    else:
        op, cost = "bn_relu_conv2d_bn_stats", bn_relu_conv2d_bn_stats_cost(conv, e)
        rows.append(Row(block, conv.name, TRAIN_FWD, "bn_relu apply, a written",
                        str(previous.output), bn_relu_apply_cost(previous.output, e,
                                                                 mask=False), LIBRARY))
    return rows + [
        Row(block, conv.name, TRAIN_FWD, op, conv.describe(), cost,
            target=conv_target(conv, "train_fwd", e)),
        Row(block, conv.name, TRAIN_FWD, "bn_stats", str(conv.output),
            bn_stats_cost(conv.output, e), LIBRARY)]


def _conv_backward_rows(block: str, conv: Conv, e: int, dgrad: bool = True) -> list:
    rows = [Row(block, conv.name, TRAIN_BWD, "conv dgrad", conv.describe(),
                conv_dgrad_cost(conv, e))] if dgrad else []
    return rows + [Row(block, conv.name, TRAIN_BWD, "conv wgrad", conv.describe(),
                       conv_wgrad_cost(conv, e))]


def stem_rows(conv: Conv, e: int) -> list:
    """FusedStem: relu(bn(conv(x))) by conv_bn_act; the image needs no gradient."""
    z = conv.output
    return [
        Row("stem", conv.name, INFERENCE, "conv2d_epilogue (relu)", conv.describe(),
            conv2d_epilogue_cost(conv, e, residual=False), target=conv_target(conv, "eval", e)),
        *_conv_with_stats_rows("stem", conv, None, e),
        Row("stem", conv.name, TRAIN_FWD, "bn_add_relu apply (relu, mask)", str(z),
            bn_add_relu_apply_cost(z, e, residual=False, relu=True, mask=True)),
        Row("stem", conv.name, TRAIN_BWD, "bn_add_relu backward (relu)", str(z),
            bn_add_relu_backward_cost(z, e, relu=True, residual_grad=False)),
        *_conv_backward_rows("stem", conv, e, dgrad=False),
    ]


def inference_rows(block: Block, e: int) -> list:
    """BN folded: one conv2d_epilogue per conv, the residual and ReLU in the last one's
    epilogue; a bottleneck's projection and conv3 as one conv2d_dual_epilogue."""
    *chain, last = block.convs
    rows = [Row(block.name, c.name, INFERENCE, "conv2d_epilogue (relu)", c.describe(),
                conv2d_epilogue_cost(c, e, residual=False), target=conv_target(c, "eval", e))
            for c in chain]
    s = block.shortcut
    if block.dual:
        return rows + [Row(block.name, f"{last.name} + {s.name}", INFERENCE,
                           "conv2d_dual_epilogue (relu)",
                           f"{last.input} + {s.input}/{s.stride[0]} -> {last.output}",
                           conv2d_dual_epilogue_cost(last, s, e),
                           target=dual_target(last, s, e))]
    if s is not None:  # the projection written, then read as the last conv's residual
        rows.append(Row(block.name, s.name, INFERENCE, "conv2d_epilogue (no relu)",
                        s.describe(), conv2d_epilogue_cost(s, e, residual=False),
                        target=conv_target(s, "eval", e)))
    return rows + [Row(block.name, last.name, INFERENCE, "conv2d_epilogue (residual, relu)",
                       last.describe(), conv2d_epilogue_cost(last, e, residual=True),
                       target=conv_target(last, "eval", e))]


def training_forward_rows(block: Block, e: int) -> list:
    """conv_bn_relu_chain: the shortcut first (its BN applied, no ReLU), then the chain; the
    last BN + residual + ReLU in one apply that keeps the mask for backward."""
    rows = []
    s = block.shortcut
    if s is not None:
        rows += _conv_with_stats_rows(block.name, s, None, e)
        rows.append(Row(block.name, s.name, TRAIN_FWD, "bn_add_relu apply (no relu)",
                        str(s.output), bn_add_relu_apply_cost(s.output, e, residual=False,
                                                              relu=False, mask=False)))
    for previous, conv in zip([None] + block.convs, block.convs):
        rows += _conv_with_stats_rows(block.name, conv, previous, e)
    z = block.convs[-1].output
    return rows + [Row(block.name, block.convs[-1].name, TRAIN_FWD,
                       "bn_add_relu apply (residual, relu, mask)", str(z),
                       bn_add_relu_apply_cost(z, e, residual=True, relu=True, mask=True),
                       target=bn_add_relu_target(z, "train_fwd", e))]


def training_backward_rows(block: Block, e: int) -> list:
    """In autograd's order: the last BN-add-ReLU backward; per later conv the BN + ReLU of
    its input recomputed (with the mask), its dgrad and wgrad, then that BN's backward; the
    first conv's dgrad and wgrad; the shortcut's BN backward and conv backward; the sum of
    the block input's two gradient branches."""
    last = block.convs[-1]
    rows = [Row(block.name, last.name, TRAIN_BWD, "bn_add_relu backward (residual, relu)",
                str(last.output), bn_add_relu_backward_cost(last.output, e, relu=True,
                                                            residual_grad=True),
                target=bn_add_relu_target(last.output, "train_fwdbwd", e))]
    for previous, conv in reversed(list(zip(block.convs, block.convs[1:]))):
        z = previous.output
        rows.append(Row(block.name, conv.name, TRAIN_BWD, "bn_relu recompute (a, mask)",
                        str(z), bn_relu_apply_cost(z, e, mask=True)))
        rows += _conv_backward_rows(block.name, conv, e)
        rows.append(Row(block.name, previous.name, TRAIN_BWD, "bn_add_relu backward (relu)",
                        str(z), bn_add_relu_backward_cost(z, e, relu=True,
                                                          residual_grad=False)))
    rows += _conv_backward_rows(block.name, block.convs[0], e)
    s = block.shortcut
    if s is not None:
        rows.append(Row(block.name, s.name, TRAIN_BWD, "bn_add_relu backward (no relu)",
                        str(s.output), bn_add_relu_backward_cost(s.output, e, relu=False,
                                                                 residual_grad=False)))
        rows += _conv_backward_rows(block.name, s, e)
    x = block.convs[0].input
    return rows + [Row(block.name, block.name, TRAIN_BWD, "grad sum (autograd)", str(x),
                       grad_sum_cost(x, e))]


def block_rows(block: Block, e: int) -> list:
    return inference_rows(block, e) + training_forward_rows(block, e) \
        + training_backward_rows(block, e)


# ---- measurements -----------------------------------------------------------------------------
class Measurement(NamedTuple):
    kind: str        # "conv", "dual", "bn_add_relu", "block", "model"
    key: tuple
    mode: str        # the benchmark's own mode name
    seconds: float   # median
    provider: str
    device: str
    dtype: str       # bf16 / fp16 / fp32
    batch: int
    source: str


def _pytest_benchmark_measurement(bench: dict, source: str) -> Optional[Measurement]:
    """One pytest-benchmark row of benchmarks/test_bench_{conv,bn_add_relu,blocks}.py (as they
    record it in extra_info and params), or None for a row this table has no place for."""
    info, params = bench.get("extra_info") or {}, bench.get("params") or {}
    seconds = bench["stats"]["median"]
    common = dict(seconds=seconds, provider=info.get("provider", ""),
                  device=info.get("device", ""),
                  dtype=BENCH_DTYPES.get(info.get("dtype"), info.get("dtype")), source=source)
    op, mode = info.get("op"), info.get("mode")
    if op == "conv" and "layer" in params:
        batch = round(info["images_per_s"] * seconds)  # the suite records images/s, not N
        if mode == "eval_dual":
            _, c_mid, c_out, c_in, stride, hw = params["layer"]
            return Measurement("dual", (c_mid, c_out, c_in, stride, hw), mode, batch=batch,
                               **common)
        _, c_in, c_out, k, stride, padding, hw = params["layer"]
        return Measurement("conv", (c_in, c_out, k, stride, padding, hw), mode, batch=batch,
                           **common)
    if op == "bn_add_relu":
        n, c, h, w = info["shape"]
        return Measurement("bn_add_relu", (c, h, w), mode, batch=n, **common)
    if op == "resnet50 block":
        name, dims = info["shape"][0].split()
        n, c, h, _ = map(int, dims.split("x"))
        return Measurement("block", (name, c, h), mode, batch=n, **common)
    return None


def _suite_measurements(data: dict, source: str) -> list:
    """`fused-resnet bench`'s results.json: whole models, inference and training step."""
    config = data["config"]
    return [Measurement("model", (row["model"], config["image_size"]), row["mode"],
                        row["median_s"], row["provider"], data["environment"]["device"],
                        config["dtype"], config["batch_size"], source)
            for row in data["rows"] if row.get("status") == "ok"]


def load_measurements(path: str) -> list:
    with open(path) as f:
        data = json.load(f)
    if "benchmarks" in data:
        found = (_pytest_benchmark_measurement(b, path) for b in data["benchmarks"])
        return [m for m in found if m is not None]
    if "rows" in data and "config" in data:
        return _suite_measurements(data, path)
    raise ValueError(f"{path}: neither pytest-benchmark JSON nor fused-resnet bench results")


def usable_measurements(measurements: Iterable, device_name: str, dtype: str,
                        batch: int) -> tuple:
    """({(kind, key, mode): fastest fused measurement} on a device whose name contains
    device_name, in dtype, at this batch; {reason: count} of the ones left out). Only the
    project's own providers count (eager and compiled rows time other ops)."""
    best, skipped = {}, defaultdict(int)
    for m in measurements:
        if not m.provider.startswith("fused"):
            continue
        if device_name.lower() not in m.device.lower():
            skipped[f"other device ({m.device})"] += 1
        elif m.dtype != dtype or m.batch != batch:
            skipped[f"other dtype or batch ({m.dtype}, batch {m.batch})"] += 1
        else:
            slot = (m.kind, m.key, m.mode)
            if slot not in best or m.seconds < best[slot].seconds:
                best[slot] = m
    return best, dict(skipped)


def _measured(m: Measurement, timed: str, floor_seconds: float) -> dict:
    return {"seconds": m.seconds, "provider": m.provider, "source": m.source, "timed": timed,
            "timed_floor_seconds": floor_seconds, "fraction_of_floor": floor_seconds / m.seconds}


def attach_measurements(rows: list, best: dict, peaks: Peaks) -> int:
    """Fill row.measured where a measurement of the row's benchmark target exists; returns
    how many rows got one."""
    filled = 0
    for row in rows:
        t = row.target
        m = t and best.get((t.kind, t.key, t.mode))
        if m:
            row.measured = _measured(m, t.timed, peaks.floor_seconds(*t.cost))
            filled += 1
    return filled


# ---- totals -----------------------------------------------------------------------------------
def total_cost(rows: Iterable) -> Cost:
    return sum((row.cost for row in rows), Cost(0, 0))


def summary(rows: list, peaks: Peaks) -> dict:
    """FLOPs, bytes, both aggregate floors, the sum of the ops' floors and the share of that
    sum spent in memory-bound ops."""
    cost = total_cost(rows)
    floors_s = [peaks.floor_seconds(*row.cost) for row in rows]
    memory_bound = sum(f for f, row in zip(floors_s, rows)
                       if peaks.bound(*row.cost) == "memory")
    total = sum(floors_s)
    return {"flops": cost.flops, "bytes": cost.bytes,
            "compute_seconds": peaks.compute_seconds(cost.flops),
            "memory_seconds": peaks.memory_seconds(cost.bytes),
            "aggregate_floor_seconds": peaks.floor_seconds(*cost),
            "floor_seconds": total,
            "memory_bound_share": memory_bound / total if total else 0.0}


def mode_rows(rows: list, mode: str, path: str = FUSED) -> list:
    modes = (TRAIN_FWD, TRAIN_BWD) if mode == TRAIN_STEP else (mode,)
    return [row for row in rows if row.mode in modes and row.path == path]


def block_key(block: Block) -> tuple:
    """What test_bench_blocks.py names a block by: ("layer1.0", C_in, input H)."""
    first = block.convs[0]
    return block.name, first.c_in, first.height


# ---- the report -------------------------------------------------------------------------------
@dataclasses.dataclass
class Report:
    config: dict
    rows: list
    blocks: list            # [{"name", "input", "modes": {mode: summary}, "measured": {}}]
    totals: dict            # {mode: summary}
    totals_measured: dict   # {mode: measured} from fused-resnet bench
    measured: dict          # sources and counts
    notes: dict


def build(model_name: str = "resnet50", batch_size: int = 256, image_size: int = 224,
          dtype: str = "bf16", peaks: Peaks = Peaks(), device_name: str = "H100",
          measured_paths: Iterable = ()) -> Report:
    e = ELEMENT_SIZES[dtype]
    model = meta_model(model_name)
    convs = trace_convs(model, batch_size, image_size)
    blocks = residual_blocks(model, convs)
    rows = stem_rows(convs["conv1"], e)
    for block in blocks:
        rows += block_rows(block, e)

    measurements = [m for path in measured_paths for m in load_measurements(path)]
    best, skipped = usable_measurements(measurements, device_name, dtype, batch_size)
    filled = attach_measurements(rows, best, peaks)
    totals = {mode: summary(mode_rows(rows, mode), peaks) for mode in MODES + (TRAIN_STEP,)}
    block_table = [_block_summary(b, rows, best, peaks) for b in blocks]
    config = {"model": model_name, "batch_size": batch_size, "image_size": image_size,
              "dtype": dtype, "element_size": e, "peak_flops": peaks.flops,
              "bandwidth": peaks.bandwidth, "device_name": device_name}
    measured = {"sources": list(measured_paths), "measurements": len(measurements),
                "used": len(best), "rows_filled": filled, "skipped": skipped}
    notes = {"library_extra": summary([r for r in rows if r.path == LIBRARY], peaks),
             "autocast_projection_extra": _autocast_projection_extra(blocks, e, peaks),
             "bandwidths": _at_bandwidths(rows, peaks),
             "floors_py": _floors_py(model, image_size, batch_size, e, peaks)}
    return Report(config, rows, block_table, totals,
                  _whole_model_measured(best, model_name, image_size, totals), measured, notes)


def _whole_model_measured(best: dict, model_name: str, image_size: int, totals: dict) -> dict:
    """`fused-resnet bench` rows against the sum of the op floors (they also time the pools,
    the classifier, the loss and, in training, the optimizer step: see ASSUMPTIONS)."""
    out = {}
    for bench_mode, mode in (("inference", INFERENCE), ("training", TRAIN_STEP)):
        m = best.get(("model", (model_name, image_size), bench_mode))
        if m:
            out[mode] = _measured(m, "fused-resnet bench, whole model",
                                  totals[mode]["floor_seconds"])
    return out


def _block_summary(block: Block, rows: list, best: dict, peaks: Peaks) -> dict:
    own = [row for row in rows if row.block == block.name]
    modes = {mode: summary(mode_rows(own, mode), peaks) for mode in MODES + (TRAIN_STEP,)}
    measured = {}
    for bench_mode, mode in (("eval_fwd", INFERENCE), ("train_fwdbwd", TRAIN_STEP)):
        m = best.get(("block", block_key(block), bench_mode))
        if m:
            measured[mode] = _measured(m, f"test_bench_blocks {bench_mode}",
                                       modes[mode]["floor_seconds"])
    return {"name": block.name, "input": str(block.convs[0].input), "modes": modes,
            "measured": measured}


def _autocast_projection_extra(blocks: list, e: int, peaks: Peaks) -> dict:
    """Under autocast FusedBottleneck runs the projection as its own conv2d_epilogue and
    conv3's epilogue reads it back as the residual: bytes and floor over the one-GEMM path
    (inference_rows of the same blocks without the dual GEMM, minus with it)."""
    dual = [b for b in blocks if b.dual]
    with_dual = summary([r for b in dual for r in inference_rows(b, e)], peaks)
    without = summary([r for b in dual for r in inference_rows(b._replace(dual=False), e)],
                      peaks)
    return {"bytes": without["bytes"] - with_dual["bytes"],
            "floor_seconds": without["floor_seconds"] - with_dual["floor_seconds"]}


def _at_bandwidths(rows: list, peaks: Peaks) -> list:
    table = []
    for bandwidth in sorted(set(OTHER_BANDWIDTHS) | {peaks.bandwidth}):
        other = Peaks(peaks.flops, bandwidth)
        table.append({"bandwidth": bandwidth, **{
            mode: summary(mode_rows(rows, mode), other)["floor_seconds"]
            for mode in (INFERENCE, TRAIN_STEP)}})
    return table


def _floors_py(model: nn.Module, image_size: int, batch_size: int, e: int,
               peaks: Peaks) -> dict:
    """fused_resnet.bench.floors' whole-model estimate (what `fused-resnet bench` reports its
    fractions against), for comparison with this table's totals. Run on the meta model with
    meta as the default device, so the input image floors.py creates is a meta tensor too:
    shapes only, nothing computed."""
    with torch.device("meta"):
        estimate = floors.floors(model, image_size, batch_size, e)
    return {mode: {**cost, "floor_seconds": peaks.floor_seconds(cost["flops"], cost["bytes"])}
            for mode, cost in estimate.items()}


# ---- rendering --------------------------------------------------------------------------------
def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.3f}"


def _measured_cells(measured: Optional[dict], unit=_us) -> list:
    if not measured:
        return [NOT_MEASURED, "-"]
    return [f"{unit(measured['seconds'])} ({measured['provider']}; {measured['timed']})",
            f"{100 * measured['fraction_of_floor']:.0f}%"]


def _row_cells(row: Row, peaks: Peaks) -> list:
    flops, nbytes = row.cost
    return [row.block, row.layer, row.op + (" **(library path only)**" if row.path == LIBRARY
                                            else ""),
            row.shape, f"{flops / 1e9:,.2f}", f"{nbytes / 1e6:,.2f}",
            f"{flops / nbytes:,.1f}", _us(peaks.floor_seconds(flops, nbytes)),
            peaks.bound(flops, nbytes), *_measured_cells(row.measured)]


def _table(header: list, rows: list) -> list:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] \
        + ["| " + " | ".join(cells) + " |" for cells in rows]


def _header(report: Report, command: str) -> list:
    c = report.config
    title = f"# Roofline: {c['model']}, batch {c['batch_size']}, {c['image_size']}x" \
            f"{c['image_size']}, {c['dtype']}, {c['device_name']}"
    lines = [title, "", f"Generated by `{command}` (from the repository root)", "",
             f"Peaks: **{c['peak_flops'] / 1e12:.0f} TFLOP/s** dense {c['dtype']} and "
             f"**{c['bandwidth'] / 1e12:.2f} TB/s** (the lent H100s measured ~790 TFLOP/s "
             f"bf16 matmul and 3.0-3.35 TB/s copy; an H200 4.3 TB/s). Time floor of an op = "
             f"max(FLOPs / peak FLOP/s, bytes / bandwidth); bound = the larger term.", "",
             "These are lower bounds. Counted and approximated:", ""]
    lines += [f"- {text}" for text in ASSUMPTIONS]
    m = report.measured
    lines += ["", f"Measured: `fraction` = floor of what the benchmark timed (named in the "
              f"cell; where it times more than the row's op, the floor of all it times) / its "
              f"median time; 100% = at the floor. Only the fastest `fused*` provider of a "
              f"row from a device whose name contains \"{c['device_name']}\", in {c['dtype']} "
              f"at batch {c['batch_size']}, is used."]
    if m["sources"]:
        skipped = "; ".join(f"{n} from {why}" for why, n in sorted(m["skipped"].items()))
        lines += ["", f"Measured sources: {', '.join(f'`{s}`' for s in m['sources'])}: "
                  f"{m['measurements']} rows read, {m['used']} used, {m['rows_filled']} table "
                  f"rows filled" + (f"; left out: {skipped}" if skipped else "") + "."]
    else:
        lines += ["", f"No benchmark JSON given: every measured cell says "
                  f"\"{NOT_MEASURED}\" (rerun with `--measured` on a GPU run's JSON)."]
    return lines


def _totals_section(report: Report) -> list:
    t = report.totals
    rows = []
    for mode in MODES + (TRAIN_STEP,):
        s = t[mode]
        rows.append([mode, f"{s['flops'] / 1e9:,.1f}", f"{s['bytes'] / 1e9:,.2f}",
                     _ms(s["compute_seconds"]), _ms(s["memory_seconds"]),
                     _ms(s["aggregate_floor_seconds"]), f"**{_ms(s['floor_seconds'])}**",
                     f"{100 * s['memory_bound_share']:.0f}%",
                     *_measured_cells(report.totals_measured.get(mode), _ms)])
    lines = ["", "## Whole network (stem + residual blocks)", ""]
    lines += _table(["mode", "GFLOP", "GB moved", "compute floor ms", "memory floor ms",
                     "aggregate floor ms", "floor ms (sum of ops)", "memory-bound ops' share",
                     "measured ms", "fraction"], rows)
    lib = report.notes["library_extra"]
    lines += ["", f"- The library-conv path adds {lib['bytes'] / 1e9:,.2f} GB "
              f"({_ms(lib['floor_seconds'])} ms) per training forward: its separate statistics "
              f"passes and the BN + ReLU written before each conv2 / conv3."]
    duals = sum(1 for r in report.rows if r.op.startswith("conv2d_dual_epilogue"))
    if duals:
        extra = report.notes["autocast_projection_extra"]
        lines.append(f"- Under autocast (how `fused-resnet bench` and test_bench_blocks run "
                     f"bf16), the {duals} projection blocks write the shortcut and read it "
                     f"back: +{extra['bytes'] / 1e6:,.1f} MB, +{_ms(extra['floor_seconds'])} ms "
                     f"of inference floor.")
    bands = report.notes["bandwidths"]
    lines += ["", "Floors (sum of ops) at other bandwidths, same FLOP/s peak:", ""]
    lines += _table(["bandwidth TB/s", "inference ms", "training step ms"],
                    [[f"{b['bandwidth'] / 1e12:.2f}", _ms(b[INFERENCE]), _ms(b[TRAIN_STEP])]
                     for b in bands])
    fp = report.notes["floors_py"]
    lines += ["", "For comparison, `fused_resnet.bench.floors` (the whole-model floors "
              "`fused-resnet bench` reports its fractions against: FlopCounterMode FLOPs incl. "
              "the classifier; every conv's input + output, one residual read per block and "
              "the weights; training 3x inference): "
              + "; ".join(f"{mode} {fp[mode]['flops'] / 1e9:,.1f} GFLOP, "
                          f"{fp[mode]['bytes'] / 1e9:,.2f} GB, floor "
                          f"{_ms(fp[mode]['floor_seconds'])} ms" for mode in fp) + "."]
    return lines


def _blocks_section(report: Report) -> list:
    rows = []
    for b in report.blocks:
        modes = b["modes"]
        rows.append([b["name"], b["input"], *(_us(modes[m]["floor_seconds"])
                                              for m in MODES + (TRAIN_STEP,)),
                     *_measured_cells(b["measured"].get(INFERENCE)),
                     *_measured_cells(b["measured"].get(TRAIN_STEP))])
    return ["", "## Per block (floor µs, sum of the block's ops)", ""] + _table(
        ["block", "input", "inference", "training fwd", "training bwd", "training step",
         "measured inference µs", "fraction", "measured training step µs", "fraction"], rows)


ROW_HEADER = ["block", "layer", "op", "shape (in -> out, kxk/stride)", "GFLOP", "MB",
              "FLOP/B", "floor µs", "bound", "measured µs", "fraction"]


def _largest_section(report: Report, peaks: Peaks, count: int = 12) -> list:
    fused = [r for r in report.rows if r.path == FUSED]
    largest = sorted(fused, key=lambda r: -peaks.floor_seconds(*r.cost))[:count]
    return ["", f"## The {count} largest op floors", ""] + _table(
        ["mode"] + ROW_HEADER, [[r.mode] + _row_cells(r, peaks) for r in largest])


def render_markdown(report: Report, command: str) -> str:
    peaks = Peaks(report.config["peak_flops"], report.config["bandwidth"])
    lines = _header(report, command) + _totals_section(report) + _blocks_section(report) \
        + _largest_section(report, peaks)
    for mode in MODES:
        lines += ["", f"## Ops: {mode}", ""]
        lines += _table(ROW_HEADER, [_row_cells(r, peaks) for r in report.rows
                                     if r.mode == mode])
    return "\n".join(lines) + "\n"


def _row_json(row: Row, peaks: Peaks) -> dict:
    return {"block": row.block, "layer": row.layer, "mode": row.mode, "op": row.op,
            "path": row.path, "shape": row.shape, "flops": row.cost.flops,
            "bytes": row.cost.bytes, "intensity": row.cost.flops / row.cost.bytes,
            "floor_seconds": peaks.floor_seconds(*row.cost), "bound": peaks.bound(*row.cost),
            "measured": row.measured}


def render_json(report: Report, command: str) -> str:
    peaks = Peaks(report.config["peak_flops"], report.config["bandwidth"])
    data = {"command": command, "config": report.config, "assumptions": ASSUMPTIONS,
            "totals": report.totals, "totals_measured": report.totals_measured,
            "blocks": report.blocks, "notes": report.notes,
            "measured": report.measured, "rows": [_row_json(r, peaks) for r in report.rows]}
    return json.dumps(data, indent=1) + "\n"


# ---- command line -----------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fused_resnet.bench.roofline",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50",
                        help="a torchvision ResNet constructor name (default resnet50)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dtype", choices=sorted(ELEMENT_SIZES), default="bf16")
    parser.add_argument("--bandwidth", type=float, default=BANDWIDTH,
                        help="bytes/s (3.0e12 and 3.35e12 measured on H100s; 4.3e12 H200)")
    parser.add_argument("--flops", type=float, default=PEAK_FLOPS, help="peak FLOP/s")
    parser.add_argument("--device-name", default="H100",
                        help="measured rows count only from a device whose name contains "
                             "this (case-insensitive); also the title")
    parser.add_argument("--measured", nargs="*", default=[], metavar="JSON",
                        help="pytest-benchmark JSON of benchmarks/test_bench_{conv,"
                             "bn_add_relu,blocks}.py, or fused-resnet bench's results.json")
    parser.add_argument("-o", "--output", help="markdown here (default: stdout)")
    parser.add_argument("--json", help="also the JSON here")
    return parser.parse_args(argv)


def command_line(argv: list) -> str:
    return "python -m fused_resnet.bench.roofline " + shlex.join(argv)


def report_from_args(args: argparse.Namespace) -> Report:
    return build(args.model, args.batch_size, args.image_size, args.dtype,
                 Peaks(args.flops, args.bandwidth), args.device_name, args.measured)


def main(argv=None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    report = report_from_args(args)
    command = command_line(argv)
    text = render_markdown(report, command)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        print(text, end="")
    if args.json:
        with open(args.json, "w") as f:
            f.write(render_json(report, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
