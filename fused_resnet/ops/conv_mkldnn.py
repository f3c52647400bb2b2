"""The CPU fast path of the fused convolutions: oneDNN's own fused primitives, reached through
PyTorch's mkldnn ops (the ones Inductor's CPU freezing pass emits), never a hand-written CPU
convolution:

    torch.ops.mkldnn._convolution_pointwise          conv + bias (+ ReLU post-op)
    torch.ops.mkldnn._convolution_pointwise.binary   conv + bias + residual (+ ReLU), new output
    torch.ops.mkldnn._convolution_pointwise_.binary  the same, written into the residual
    torch.ops.mkldnn._reorder_convolution_weight     the weight in oneDNN's blocked format, once

fp32 always; bfloat16 where the CPU has native bf16 support (oneDNN says so); inference only
(the ops have no autograd formula). The caller decides when a residual may be overwritten
(`into_residual`): only a tensor nobody else can see (fused_resnet.modules.stage).

NaN: oneDNN's ReLU post-op is max(x, 0) in a form that turns NaN into 0 (torch.relu keeps NaN).
So the post-op is used only where the output before the ReLU is known to be finite: an upper
bound on |conv(x) + bias + residual| from bounds on |x| and |residual| and the weight's gain
(max over output channels of sum |w|) is below SAFE_BOUND. Otherwise the conv runs without the
post-op and torch.relu_ follows, which keeps NaN (and a NaN made inside the conv, e.g. inf * 0
or inf - inf, since the bound of a non-finite input is itself not finite).
"""

import math
from typing import Optional

import torch
from torch import Tensor

from fused_resnet import layout

_DTYPES = (torch.float32, torch.bfloat16)


def _mkldnn_reason() -> Optional[str]:
    """Why oneDNN's fused convolutions are not usable in this process (None if they are)."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    if not torch.backends.mkldnn.enabled:
        return "oneDNN is disabled (torch.backends.mkldnn.enabled is False)"
    if not hasattr(torch.ops.mkldnn, "_convolution_pointwise_"):
        return "this torch build lacks mkldnn._convolution_pointwise_"
    return None


def bf16_supported() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def status() -> dict:
    """What `fused-resnet info` shows about the CPU convolution path."""
    reason = _mkldnn_reason()
    if reason is not None:
        return {"path": "library conv (F.conv2d) + fused_resnet C++ epilogue", "reason": reason}
    return {"path": "oneDNN fused convolutions (BN folded; ReLU, residual add as post-ops; "
                    "weights prepacked)",
            "dtypes": ["float32"] + (["bfloat16"] if bf16_supported() else [])}


def unsupported(input: Tensor, weight: Tensor, dtype: Optional[torch.dtype] = None,
                residual: bool = False) -> Optional[str]:
    """Why the oneDNN path cannot run this convolution (None if it can); dtype: the one both
    operands will be cast to first (autocast), if any; residual: whether a residual is added."""
    reason = _mkldnn_reason()
    if reason is not None:
        return reason
    if input.device.type != "cpu" or weight.device.type != "cpu":
        return "oneDNN fused convolutions run on CPU tensors only"
    if input.dim() != 4 or weight.dim() != 4:
        return "input and weight must be 4-D"
    if dtype is None:
        if weight.dtype != input.dtype:
            return f"input dtype {input.dtype} with weight dtype {weight.dtype}"
        dtype = input.dtype
    if dtype not in _DTYPES:
        return f"dtype {dtype} (float32 or bfloat16)"
    if dtype == torch.bfloat16 and not bf16_supported():
        return "this CPU has no native bfloat16 support for oneDNN"
    if input.numel() == 0:
        return "empty input"
    if residual and dtype != torch.float32 and not layout.is_channels_last(input):
        # NCHW: oneDNN leaves the add + ReLU to ATen's add_relu, which has no bfloat16
        return f"{dtype} residual add on NCHW input"
    return None


def _packable(input: Tensor) -> bool:
    """A prepacked weight makes oneDNN write a channels_last output: used for channels_last
    input only, so the output keeps the input's layout as everywhere else."""
    return layout.is_channels_last(input)


def prepack(weight: Tensor, stride, padding, dilation, groups: int, input: Tensor) -> Tensor:
    """`weight` reordered once into the blocked format oneDNN picks for `input`'s shape (an
    opaque mkldnn tensor), or `weight` itself where prepacking does not apply (NCHW input).
    A prepacked weight stays correct for other input shapes (oneDNN reorders again if its
    choice differs), so a cache may be keyed on the shape only to stay fast."""
    if not _packable(input):
        return weight
    return torch.ops.mkldnn._reorder_convolution_weight(
        weight.contiguous(memory_format=torch.channels_last), list(padding), list(stride),
        list(dilation), groups, list(input.shape))


# Finite operands whose bound is below this give a finite conv output: fp32's largest value is
# ~2**128, and the margin of 2**28 covers the rounding of fp32 (or bf16) accumulation and the
# growth inside oneDNN's algorithms (e.g. Winograd's input transforms) many times over.
SAFE_BOUND = 2.0 ** 100


def max_abs(t: Optional[Tensor]) -> float:
    """max |t| (one pass over t; NaN or inf if t holds a NaN or an inf); 0 for None or empty."""
    if t is None or t.numel() == 0:
        return 0.0
    low, high = torch.aminmax(_in_memory_order(t.detach()))  # both NaN when t holds a NaN
    return torch.maximum(-low, high).item()


def _in_memory_order(t: Tensor) -> Tensor:
    """t's elements as a 1-D view in memory order where t is dense (a full reduction over a
    channels_last tensor as such takes a path ~50x slower than over its memory)."""
    if t.dim() == 4 and not t.is_contiguous() and \
            t.is_contiguous(memory_format=torch.channels_last):
        t = t.permute(0, 2, 3, 1)
    return t.reshape(-1)


def weight_gain(weight: Tensor) -> float:
    """max over output channels of sum |w|: |conv(x, w)| <= weight_gain(w) * max |x| (zero
    padding included); inf for a prepacked (opaque) weight, whose values are not readable."""
    if weight.is_mkldnn:
        return math.inf
    # fp32 sums (no float64 copy of the weight: under torch.compile this runs on every call):
    # their rounding, 1e-4 relative at worst, is covered by the margin below and is far inside
    # SAFE_BOUND's 2^28 below fp32's overflow; a sum that overflows is inf, which only sends
    # the call down the NaN-keeping path
    gain = weight.detach().float().abs().sum(dim=(1, 2, 3)).max().item()
    return gain * (1.0 + 2.0 ** -10)


def output_bound(input_bound: float, gain: float, bias_bound: float,
                 residual_bound: float = 0.0) -> float:
    """An upper bound on |conv(x, w) + bias + residual| from bounds on |x|, |bias| and
    |residual| (NaN or inf when any of them is not finite)."""
    return input_bound * gain + bias_bound + residual_bound


def keeps_finite(bound: float) -> bool:
    """Whether an output with this bound is surely finite (False for NaN / inf bounds)."""
    return bound < SAFE_BOUND


def _same_dense_layout(residual: Tensor, input: Tensor) -> bool:
    """Whether `residual` is dense in `input`'s memory format (the output written into it then
    has the layout an out-of-place result would have)."""
    return residual.is_contiguous(memory_format=layout.kernel_format(input))


def _single_pixel(t: Optional[Tensor]) -> bool:
    return t is not None and t.dim() == 4 and t.shape[2] * t.shape[3] == 1


def _without_pixel_ambiguity(input: Tensor, residual: Optional[Tensor], weight: Tensor):
    """A 1x1 feature map is dense in both layouts and can carry either stride set (e.g.
    (C, 1, C, C) from a channels_last producer). torch < 2.14's oneDNN ops fail on it ("could
    not create a memory") unless it has NCHW strides and a dense weight is NCHW too, so such
    calls get NCHW-strided views (no copy) and an NCHW weight; a prepacked (opaque) weight
    carries its own format."""
    if not (_single_pixel(input) and input.is_contiguous()):
        return input, residual, weight
    input = input.as_strided(input.shape, _nchw_strides(input.shape))
    if _single_pixel(residual) and residual.is_contiguous():
        residual = residual.as_strided(residual.shape, _nchw_strides(residual.shape))
    if weight.layout == torch.strided:
        weight = weight.contiguous()
    return input, residual, weight


def _nchw_strides(shape) -> tuple:
    n, c, h, w = shape
    return (c * h * w, h * w, w, 1)


def conv2d_act(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation,
               groups: int, residual: Optional[Tensor] = None, relu: bool = True,
               into_residual: bool = False, bound: Optional[float] = None) -> Tensor:
    """relu(conv2d(input, weight) + bias + residual) (bias, residual and ReLU optional) in one
    oneDNN primitive. weight: dense, or prepacked by `prepack` for this input's layout.
    into_residual: write the result into `residual` (same shape and dtype) and return it;
    the caller guarantees nobody else holds it.
    bound: `output_bound` of this call if the caller knows one cheaply; else, with a ReLU, it
    is measured here (one pass over input and residual). The ReLU is a post-op only where the
    bound says the output is finite (module docstring), so NaN and inf come out as from
    torch.relu."""
    if relu and bound is None:
        bound = output_bound(max_abs(input), weight_gain(weight), max_abs(bias),
                             max_abs(residual))
    if relu and not keeps_finite(bound):
        out = conv2d_act(input, weight, bias, stride, padding, dilation, groups, residual,
                         relu=False, into_residual=into_residual)
        return torch.relu_(out)  # ours: a new tensor, or the residual we were given to overwrite
    args = (list(padding), list(stride), list(dilation), groups)
    input, residual, weight = _without_pixel_ambiguity(input, residual, weight)
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()
    if residual is None:
        out = torch.ops.mkldnn._convolution_pointwise(input, weight, bias, *args,
                                                      "relu" if relu else "none", [None], "")
        return layout.dense_like(out, input)
    act = "relu" if relu else None  # the binary ops take no "none"
    if residual.dtype != input.dtype:
        residual = residual.to(input.dtype)
        into_residual = True  # a fresh copy: ours to overwrite
    if bias is not None and input.dtype != torch.float32:
        # oneDNN's binary post-op takes the bias in the input's dtype only (the unary one takes
        # fp32): one bf16 rounding of the shift, no larger than the rounding of the output
        bias = bias.to(input.dtype)
    if input.dtype != torch.float32 and not (into_residual and
                                             _same_dense_layout(residual, input)):
        # the out-of-place binary op has no bf16 add + ReLU: add into a copy of the residual
        residual = residual.clone(memory_format=layout.kernel_format(input))  # one dense copy
        into_residual = True
    if into_residual and _same_dense_layout(residual, input):
        return torch.ops.mkldnn._convolution_pointwise_.binary(
            residual, input, weight, bias, *args, "add", 1.0, act, [None], "")
    out = torch.ops.mkldnn._convolution_pointwise.binary(
        input, residual, weight, bias, *args, "add", 1.0, act, [None], "")
    return layout.dense_like(out, input)
