"""The Triton implicit-GEMM conv (fused_resnet.kernels.conv, groundwork of the fused-convolution
issue) under the interpreter: every torchvision ResNet conv kind with each epilogue, the
statistics epilogue and the fused projection shortcut, against F.conv2d in the same dtype and
in float64 (error <= 2x PyTorch's own + a few rounding units, fused_resnet.verify.compare)."""

import pytest
import torch
import torch.nn.functional as F

from fused_resnet import backend
from fused_resnet.reference import conv_epilogue
from fused_resnet.verify import compare

pytestmark = pytest.mark.skipif(backend.why_not("triton", "cpu") is not None,
                                reason=f"Triton on CPU: {backend.why_not('triton', 'cpu')}")

# (N, C_in, C_out, kernel, stride, padding, H=W): 1x1 s1/s2, 3x3 s1/s2, the 7x7 C_in=3 stem;
# C_out not a multiple of the tile, odd spatial sizes, N=1.
CONVS = [(2, 16, 24, 1, 1, 0, 7), (2, 32, 20, 1, 2, 0, 8), (1, 16, 40, 3, 1, 1, 7),
         (2, 8, 20, 3, 2, 1, 9), (2, 3, 16, 7, 2, 3, 13), (1, 12, 8, 3, 1, 1, 5)]


def _conv_ids(c):
    return f"n{c[0]}-cin{c[1]}-cout{c[2]}-k{c[3]}s{c[4]}p{c[5]}-hw{c[6]}"


def _kernels():
    from fused_resnet.kernels import conv
    return conv


def _inputs(n, cin, cout, k, hw, dtype):
    x = torch.randn(n, cin, hw, hw).to(dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5).to(dtype)
    return x, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("cfg", CONVS, ids=_conv_ids)
@pytest.mark.parametrize("epilogue", ["plain", "bn_relu", "bn_add_relu"])
def test_conv_epilogues_match_pytorch(cfg, dtype, epilogue):
    conv = _kernels()
    n, cin, cout, k, s, p, hw = cfg
    x, w = _inputs(n, cin, cout, k, hw, dtype)
    scale, bias = torch.rand(cout) + 0.5, torch.randn(cout)
    oh = (hw + 2 * p - k) // s + 1
    residual = torch.randn(n, cout, oh, oh).to(dtype).contiguous(
        memory_format=torch.channels_last) if epilogue == "bn_add_relu" else None
    kwargs = {} if epilogue == "plain" else dict(scale=scale, bias=bias, residual=residual,
                                                 relu=True)
    out, _ = conv.conv2d_nhwc(x, conv.pack_weight(w), s, p, **kwargs)
    assert out.shape == (n, cout, oh, oh) and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)

    def reference(xx, ww, rr):
        z = F.conv2d(xx, ww, stride=s, padding=p)
        if epilogue == "plain":
            return z
        return conv_epilogue(z, scale, bias, rr, True)

    ref64 = reference(x.double(), w.double(), residual.double() if residual is not None else None)
    # PyTorch in the same dtype (CPU half conv computes in fp32 internally: use fp32 math,
    # rounded to the dtype, as the same-precision baseline)
    ref_t = reference(x.float(), w.float(), residual.float() if residual is not None else None)
    c = compare("conv output", out, ref64, ref_t.to(dtype))
    assert c.ok, c


@pytest.mark.parametrize("cfg", CONVS, ids=_conv_ids)
def test_statistics_epilogue(cfg):
    """Per-channel mean and biased variance of the raw conv output, merged from tiles."""
    conv = _kernels()
    n, cin, cout, k, s, p, hw = cfg
    x, w = _inputs(n, cin, cout, k, hw, torch.float32)
    x = x + 3.0  # a large mean: a naive E[x^2] - E[x]^2 would lose the variance
    _, (mean, var) = conv.conv2d_nhwc(x, conv.pack_weight(w), s, p, stats=True)
    z = F.conv2d(x.double(), w.double(), stride=s, padding=p)
    var64, mean64 = torch.var_mean(z, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), var64, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shortcut_stride", [1, 2])
def test_projection_shortcut_as_one_gemm(dtype, shortcut_stride):
    """relu(conv3(y)*s3 + conv_ds(x)*sd + b3 + bd) as one GEMM over the concatenated K, the
    BN scales folded into the packed weights."""
    conv = _kernels()
    n, c_mid, c_in, c_out, hw = 2, 16, 32, 48, 8
    out_hw = hw // shortcut_stride
    y = torch.randn(n, c_mid, out_hw, out_hw).to(dtype).contiguous(
        memory_format=torch.channels_last)
    x = torch.randn(n, c_in, hw, hw).to(dtype).contiguous(memory_format=torch.channels_last)
    w3 = (torch.randn(c_out, c_mid, 1, 1) / c_mid ** 0.5).to(dtype)
    wd = (torch.randn(c_out, c_in, 1, 1) / c_in ** 0.5).to(dtype)
    s3, sd = torch.rand(c_out) + 0.5, torch.rand(c_out) + 0.5
    b = torch.randn(c_out)
    out, _ = conv.conv2d_nhwc(y, conv.pack_weight(w3, s3), 1, 0, bias=b, relu=True,
                              shortcut=(x, conv.pack_weight(wd, sd), shortcut_stride))

    def reference(yy, xx, dt):
        z = F.conv2d(yy, w3.to(dt)) * s3.view(1, -1, 1, 1).to(dt) \
            + F.conv2d(xx, wd.to(dt), stride=shortcut_stride) * sd.view(1, -1, 1, 1).to(dt)
        return torch.relu(z + b.view(1, -1, 1, 1).to(dt))

    ref64 = reference(y.double(), x.double(), torch.float64)
    ref_t = reference(y.float(), x.float(), torch.float32).to(dtype)
    c = compare("dual GEMM output", out, ref64, ref_t)
    assert c.ok, c
