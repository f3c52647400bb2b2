"""The library conv of the CPU training paths (csrc/cpu/conv_gemm.cpp, ops.conv.library_conv):
an fp32 channels_last convolution (one group; bf16 too where oneDNN has native bf16) runs as
one GEMM over its output pixels' windows
where it is a 1x1 without padding over at most 2048 output pixels, or a larger window over no
more output pixels than input channels; anything else as oneDNN's conv. Either way its output and both
gradients are as exact as PyTorch's own conv (against float64, verify.compare's criterion), in
the input's memory format, and the weight gradient has the weight's own strides (what
autograd accumulates into without a copy, and what the fakes say). An NCHW weight (an NCHW model computing in
channels_last, fuse_'s cpu_channels_last) takes the GEMM too, through a channels_last copy."""

import pytest
import torch
import torch.nn.functional as F

from fused_resnet import backend
from fused_resnet.ops import conv as conv_ops
from fused_resnet.verify import compare

pytestmark = pytest.mark.skipif(backend.why_not("cpp", "cpu") is not None,
                                reason="fused_resnet._C is not built")

# bf16 convolutions run as GEMMs where oneDNN (and so at::mm) has native bf16 kernels
BF16_GEMM = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())

# (input shape, out channels, kernel, stride, padding, groups, channels_last, dtype, gemm);
# channels_last "input": input and gradient channels_last, the weight NCHW; "weight": the
# reverse
CASES = [
    ((2, 32, 5, 5), 48, 1, 1, 0, 1, True, torch.float32, True),      # a bottleneck's 1x1
    ((2, 32, 4, 6), 48, 1, 1, 0, 1, True, torch.float32, True),      # H != W
    ((2, 16, 32, 32), 24, 1, 1, 0, 1, True, torch.float32, True),    # 2048 pixels: the last
    ((1, 16, 2049, 1), 24, 1, 1, 0, 1, True, torch.float32, False),  # one pixel too many
    ((2, 32, 1, 1), 16, 1, 1, 0, 1, True, torch.float32, True),      # NCHW and NHWC at once
    ((2, 1, 4, 4), 8, 1, 1, 0, 1, True, torch.float32, True),        # one channel: the same
    ((1, 64, 1, 1), 8, 3, 1, 2, 1, True, torch.float32, True),       # 1x1 pixels, 3x3 output
    ((2, 32, 5, 5), 48, 1, 1, 0, 1, False, torch.float32, False),    # NCHW
    ((2, 32, 6, 6), 48, 1, 2, 0, 1, True, torch.float32, True),      # a strided projection
    ((2, 32, 7, 5), 48, 1, 2, 0, 1, True, torch.float32, True),      # odd sizes, stride 2
    ((2, 16, 64, 64), 24, 1, 2, 0, 1, True, torch.float32, True),    # 2048 output pixels
    ((2, 32, 6, 6), 48, 1, 1, 1, 1, True, torch.float32, False),     # padded
    ((2, 32, 5, 5), 48, 3, 1, 1, 1, True, torch.float32, False),     # 3x3, 50 pixels > 32
    ((2, 64, 4, 4), 48, 3, 1, 1, 1, True, torch.float32, True),      # 3x3, 32 pixels <= 64
    ((2, 64, 7, 5), 48, 3, 2, 1, 1, True, torch.float32, True),      # 3x3, stride 2, odd
    ((2, 64, 3, 5), 40, 5, 1, 2, 1, True, torch.float32, True),      # 5x5 wider than the input
    ((1, 64, 8, 8), 16, 7, 2, 3, 1, True, torch.float32, True),      # a 7x7 stem-like window
    ((2, 64, 4, 4), 48, 3, 1, 1, 1, False, torch.float32, False),    # 3x3 NCHW
    ((2, 32, 5, 5), 48, 1, 1, 0, 2, True, torch.float32, False),     # grouped
    ((2, 32, 5, 5), 48, 1, 1, 0, 1, True, torch.bfloat16, BF16_GEMM),  # bf16 1x1
    ((2, 64, 4, 4), 48, 3, 1, 1, 1, True, torch.bfloat16, BF16_GEMM),  # bf16 3x3
    ((2, 32, 5, 5), 48, 3, 1, 1, 1, True, torch.bfloat16, False),      # bf16, 50 px > 32
    ((2, 32, 5, 5), 48, 1, 1, 0, 1, True, torch.float16, False),       # fp16: oneDNN
    ((2, 64, 4, 4), 48, 3, 1, 1, 1, "input", torch.float32, True),   # 3x3, NCHW weight
    ((2, 64, 7, 5), 48, 3, 2, 1, 1, "input", torch.float32, True),   # the same, stride 2
    ((2, 32, 6, 6), 48, 1, 2, 0, 1, "input", torch.float32, True),   # 1x1 (both formats)
    ((2, 32, 5, 5), 48, 3, 1, 1, 1, "input", torch.float32, False),  # oneDNN, NCHW weight
    ((2, 32, 5, 5), 48, 3, 1, 1, 1, "weight", torch.float32, False),  # NCHW input, CL weight
]


# GEMM 1x1s (channels_last, NCHW-contiguous too, strided), oneDNN's 3x3, GEMM windows (3x3
# over 1x1 pixels, 3x3, 7x7), bf16, a 3x3 with an NCHW weight (GEMM and oneDNN), an NCHW
# input with a channels_last weight (oneDNN)
SOME = [CASES[i] for i in (0, 5, 8, 6, 12, 13, 16, 19, 20, 23, 26, 27)]


def _ids(case):
    shape, out, k, stride, pad, groups, cl, dtype, gemm = case
    return (f"{'x'.join(map(str, shape))}-o{out}-k{k}s{stride}g{groups}-"
            f"{_format_id(cl)}-{str(dtype)[6:]}-{'gemm' if gemm else 'onednn'}")


def _format_id(cl) -> str:
    return {"input": "nhwc-nchw_weight", "weight": "nchw-nhwc_weight"}.get(
        cl, "nhwc" if cl else "nchw")


def _operands(case, seed=0):
    shape, out, k, stride, pad, groups, cl, dtype, _ = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    w = (torch.randn(out, shape[1] // groups, k, k, generator=g) / (shape[1] * k * k) ** 0.5)
    w = w.to(dtype)
    grad = torch.randn(shape[0], out, (shape[2] + 2 * pad - k) // stride + 1,
                       (shape[3] + 2 * pad - k) // stride + 1, generator=g).to(dtype)
    fmt = torch.channels_last if cl in (True, "input") else torch.contiguous_format
    weight_fmt = torch.channels_last if cl in (True, "weight") else torch.contiguous_format
    return (x.contiguous(memory_format=fmt), w.contiguous(memory_format=weight_fmt),
            grad.contiguous(memory_format=fmt), [stride] * 2, [pad] * 2, [1, 1], groups)


def _pytorch(x, w, grad, stride, padding, dilation, groups):
    """PyTorch's conv (forward, grad_input, grad_weight) on these operands, in their dtype."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    z = F.conv2d(x, w, None, stride, padding, dilation, groups)
    z.backward(grad)
    return z.detach(), x.grad, w.grad


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_library_conv_as_exact_as_pytorch(case):
    x, w, grad, stride, padding, dilation, groups = _operands(case)
    with torch.profiler.profile() as prof, torch.no_grad():
        z = conv_ops.library_conv(x, w, stride, padding, dilation, groups)
        grad_x, grad_w = conv_ops.library_conv_backward(grad, x, w, stride, padding, dilation,
                                                        groups, True, True)
    ran = {e.key for e in prof.key_averages()}
    assert ("aten::mm" in ran) == case[-1] and ("aten::mkldnn_convolution" in ran) != case[-1]
    ref64 = _pytorch(x.double(), w.double(), grad.double(), stride, padding, dilation, groups)
    same = _pytorch(x, w, grad, stride, padding, dilation, groups)
    for name, got, r64, r in zip(("output", "grad_input", "grad_weight"), (z, grad_x, grad_w),
                                 ref64, same):
        assert got.dtype == x.dtype and got.shape == r.shape, name
        c = compare(name, got, r64, r)
        assert c.ok, f"{name}: error {c.error:.3g} > allowed {c.allowed:.3g} " \
                     f"(PyTorch's {c.pytorch_error:.3g})"
    # the input's kernel format and the weight's strides, whichever path ran (what the fakes
    # say: aten alone would give channels_last for an NCHW input with a channels_last weight)
    fmt = torch.contiguous_format if x.is_contiguous() else torch.channels_last
    assert z.is_contiguous(memory_format=fmt) and grad_x.is_contiguous(memory_format=fmt)
    assert grad_w.stride() == w.stride()


@pytest.mark.parametrize("case", SOME, ids=_ids)
def test_gradients_not_asked_for_are_left_out(case):
    x, w, grad, stride, padding, dilation, groups = _operands(case)
    with torch.no_grad():
        only_x = conv_ops.library_conv_backward(grad, x, w, stride, padding, dilation, groups,
                                                True, False)
        only_w = conv_ops.library_conv_backward(grad, x, w, stride, padding, dilation, groups,
                                                False, True)
        both = conv_ops.library_conv_backward(grad, x, w, stride, padding, dilation, groups,
                                              True, True)
    assert only_x[1] is None and only_w[0] is None
    assert torch.equal(only_x[0], both[0]) and torch.equal(only_w[1], both[1])


@pytest.mark.parametrize("case", SOME, ids=_ids)
def test_double_backward_through_conv2d_bn_stats(case):
    """conv2d_cpu_backward has no derivative of its own: with create_graph the library path's
    backward is aten's, so a second derivative still matches F.conv2d's."""
    x, w, grad, stride, padding, dilation, groups = _operands(case)
    results = []
    for conv in (lambda a, b: conv_ops.run_conv2d_bn_stats(a, b, stride, padding, dilation,
                                                           groups)[0],
                 lambda a, b: F.conv2d(a, b, None, stride, padding, dilation, groups)):
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        (gw,) = torch.autograd.grad((conv(a, b) * grad).sum(), b, create_graph=True)
        (gx,) = torch.autograd.grad((gw * gw).sum(), a)
        results.append(gx)
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", SOME, ids=_ids)
def test_opcheck_library_conv(case):
    x, w, grad, stride, padding, dilation, groups = _operands(case)
    ops = torch.ops.fused_resnet
    torch.library.opcheck(ops.conv2d_cpu.default, (x, w, stride, padding, dilation, groups))
    torch.library.opcheck(ops.conv2d_cpu_backward.default,
                          (grad, x, w, stride, padding, dilation, groups, True, True))


@pytest.mark.parametrize("shape, weight, stride, padding", [
    ((1, 64, 2, 2), (8, 64, 3, 3), 2, 0),   # a window larger than the padded input
    ((2, 64, 4, 4), (0, 64, 1, 1), 1, 0),   # no output channels
    ((0, 64, 4, 4), (8, 64, 3, 3), 1, 1),   # an empty batch
    ((2, 64, 0, 4), (8, 64, 1, 1), 2, 0),   # no rows
], ids=["window-too-large", "no-out-channels", "empty-batch", "no-rows"])
def test_what_the_gemm_cannot_take_is_aten_s(shape, weight, stride, padding):
    """Shapes outside the GEMM's reach go to aten's conv: its result, or its error."""
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    w = torch.randn(weight).contiguous(memory_format=torch.channels_last)
    args = ([stride] * 2, [padding] * 2, [1, 1], 1)
    try:
        want = F.conv2d(x, w, None, *args)
    except RuntimeError as error:
        with pytest.raises(RuntimeError, match=str(error).split("\n")[0][:40]):
            conv_ops.library_conv(x, w, *args)
        return
    got = conv_ops.library_conv(x, w, *args)
    assert got.shape == want.shape and torch.equal(got, want)


def test_backward_refuses_a_gradient_of_another_shape():
    x, w, grad, stride, padding, dilation, groups = _operands(CASES[1])  # 4x6 pixels
    swapped = grad.transpose(2, 3).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="conv2d_cpu_backward: grad has shape"), \
            torch.no_grad():
        conv_ops.library_conv_backward(swapped, x, w, stride, padding, dilation, groups, True,
                                       True)
