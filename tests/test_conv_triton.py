"""The Triton implicit-GEMM conv (fused_resnet.kernels.conv, its kernel and launcher called
directly) under the interpreter: every torchvision ResNet conv kind with each epilogue, the
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


def test_grouped_tile_order_covers_every_tile():
    """More row tiles than one group (GROUP_M) and several column tiles, a ragged last group:
    the grouped program order writes every output tile (every element is compared), and the
    channel-major statistics of all row tiles merge to the exact moments."""
    conv = _kernels()
    n, cin, cout, k, s, p, hw = 2, 16, 72, 3, 1, 1, 19  # M = 722: 12 row tiles of 64
    x, w = _inputs(n, cin, cout, k, hw, torch.float32)
    x = x + 2.0
    out, (mean, var) = conv.conv2d_nhwc(x, conv.pack_weight(w), s, p, stats=True)
    z64 = F.conv2d(x.double(), w.double(), stride=s, padding=p)
    torch.testing.assert_close(out.double(), z64, rtol=1e-5, atol=1e-5)
    var64, mean64 = torch.var_mean(z64, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), var64, rtol=1e-4, atol=1e-6)


def test_tile_configs_for_a_problem():
    """The measured configs: nothing wider than C_out needs; K steps that divide C_in = 16/32
    (one tap per step); no 256-wide tile where the epilogue or the prologue keeps more than the
    accumulator in registers (they spill: fused_resnet.aot checks every config)."""
    conv = _kernels()
    assert all(cfg[1] <= 64 for cfg in conv.gpu_configs(64, 64))
    assert any(cfg[1] == 256 for cfg in conv.gpu_configs(64, 256))
    for c_in in (16, 32, 64, 512):
        assert all(c_in % cfg[2] == 0 for cfg in conv.gpu_configs(c_in, 256))
    for kwargs in (dict(prologue=True), dict(residual=True)):
        assert all(max(cfg[:2]) <= 128 for cfg in conv.gpu_configs(64, 256, **kwargs))
    assert all(max(cfg[:2]) <= 128 for cfg in conv.gpu_configs(8, 64))  # the padded stem
    assert all(cfg[2] == 32 for cfg in conv.gpu_configs(64, 256, torch.float32))
    # fp32 with the prologue: the 128-row tiles spill on sm_90 with Triton 3.6
    assert conv.gpu_configs(64, 64, torch.float32, prologue=True) == [(64, 64, 32, 4, 3)]
    assert any(cfg[0] == 128 for cfg in conv.gpu_configs(64, 64, torch.float32))


def test_pixel_index_limit_falls_back():
    """Beyond the kernel's int32 pixel index (input or output) the Triton path is not offered
    (the library conv runs), and the launcher refuses rather than wrap around."""
    from fused_resnet.ops import conv as conv_ops

    conv = _kernels()
    big = torch.empty(2**15, 8, 256, 256, device="meta")  # 2^31 input pixels
    w = torch.empty(8, 8, 3, 3, device="meta")
    assert "2^31" in conv_ops.triton_unsupported(big, w, [2, 2], [1, 1], [1, 1], 1)
    assert conv_ops.triton_unsupported(big[:2**14], w, [2, 2], [1, 1], [1, 1], 1) is None
    with pytest.raises(ValueError, match="input pixels"):
        conv.conv2d_nhwc(big, conv.pack_weight(w), 2, 1, config=conv.INTERPRETER_CONFIG)
