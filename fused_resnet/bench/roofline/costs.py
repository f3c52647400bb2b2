"""The byte/FLOP cost model of the roofline table: the peaks a floor is measured against, and
for each fused op (and each library pass and autograd step around it) the FLOPs it does and
the fewest bytes it must move, under ASSUMPTIONS (which the report repeats in its header)."""

from typing import NamedTuple

from fused_resnet import layout
from fused_resnet.bench.roofline.shapes import Activation, Conv

PEAK_FLOPS = 790e12          # dense bf16 matmul rate measured on the lent H100s
BANDWIDTH = 3.0e12           # copy bandwidth measured on the lent H100s (3.0-3.35 TB/s)
ELEMENT_SIZES = {"bf16": 2, "fp16": 2, "fp32": 4}
FP32 = 4  # per-channel vectors (statistics, scale, shift, BN parameters) are fp32

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

