"""The fused BatchNorm is as exact as PyTorch's CPU BatchNorm where fp32 arithmetic is hardest:
channels whose mean is large against their spread (a raw conv output's |mean|/std reaches
10-30; here up to ~4000), over batches large enough that the statistics are merged from many
chunks. PyTorch's CPU BatchNorm accumulates its statistics in double, and so do the fused C++
CPU kernels; every backend applies BN as (x - mean)*scale + bias and takes the fp32 mean's
rounding out of the backward's sums.

Criterion: fused_resnet.verify's, with nothing added: every output and gradient within twice
PyTorch's own error (both against float64) plus ROUNDING_UNITS roundings of the dtype at the
result's scale.
"""

import pytest
import torch

from fused_resnet import backend
from fused_resnet.verify import compare, compare_step, three_batchnorms

# (shape, mean, std): M = N*H*W values per channel
CASES = [
    ((3, 13, 1, 1), 4.4, 0.025),       # the case hypothesis found: M = 3, |mean|/std = 176
    ((16, 8, 32, 32), 100.0, 0.025),   # M = 16384: many chunks merged, |mean|/std = 4000
    ((4, 64, 28, 28), -30.0, 0.5),     # a ResNet layer's width, negative mean
]


def _offset_input(shape, mean, std, channels_last, seed):
    g = torch.Generator().manual_seed(seed)
    per_channel = mean * (1 + 0.1 * torch.rand(shape[1], generator=g)).view(1, -1, 1, 1)
    x = per_channel + std * torch.randn(shape, generator=g)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("backend_name", ["cpp", "triton", "torch"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-mean{c[1]}-std{c[2]}")
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
def test_training_step_as_exact_as_pytorch(backend_name, channels_last, case, residual):
    if backend.why_not(backend_name, "cpu"):
        pytest.skip(backend.why_not(backend_name, "cpu"))
    shape, mean, std = case
    x = _offset_input(shape, mean, std, channels_last, seed=0)
    r = torch.randn(shape) if residual else None
    grad_out = torch.randn(shape)
    bn_fused, bn_torch, bn_64 = three_batchnorms(shape[1], "cpu", training=True)
    with backend.use(backend_name):
        results = compare_step(bn_fused, bn_torch, bn_64, x, r, grad_out)
    bad = [c for c in results if not c.ok]
    assert not bad, "; ".join(f"{c.name}: error {c.error:.3g} > allowed {c.allowed:.3g} "
                              f"(PyTorch's {c.pytorch_error:.3g})" for c in bad)
    for name in ("running_mean", "running_var"):
        c = compare(name, getattr(bn_fused, name), getattr(bn_64, name),
                    getattr(bn_torch, name))
        assert c.ok, f"{name}: error {c.error:.3g} > allowed {c.allowed:.3g} " \
                     f"(PyTorch's {c.pytorch_error:.3g})"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_statistics_merged_in_double(channels_last):
    """The batch mean of a channel with |mean|/std = 4000 over 16384 values is PyTorch's fp32
    mean (within one rounding of the exact one): fp32 merges of the chunk means would drift by
    several ulps."""
    if backend.why_not("cpp", "cpu"):
        pytest.skip(backend.why_not("cpp", "cpu"))
    x = _offset_input((16, 8, 32, 32), 100.0, 0.025, channels_last, seed=1)
    mean, var, _, _ = torch.ops.fused_resnet.bn_stats_cpp(x, None, None, 1e-5)
    var64, mean64 = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    ulp = torch.finfo(torch.float32).eps * mean64.abs()
    assert ((mean.double() - mean64).abs() <= ulp / 2 * 1.01).all(), \
        (mean.double() - mean64).abs() / ulp
    torch.testing.assert_close(var.double(), var64, rtol=1e-5, atol=0)


@pytest.mark.parametrize("channels", [5, 32], ids=["c5", "c32-tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_statistics_when_the_first_rows_are_outliers(channels, dtype):
    """The channels_last statistics sum deviations from the mean of a channel's first 32 rows
    in one pass and subtract the shift's share; here those rows sit 30 standard deviations off
    the other 65504, so that share is ~600x the variance's and the one-pass variance would be
    ~600x less exact: the kernel sums again around the mean and keeps PyTorch's precision."""
    if backend.why_not("cpp", "cpu"):
        pytest.skip(backend.why_not("cpp", "cpu"))
    g = torch.Generator().manual_seed(2)
    x = 3.0 + 0.01 * torch.randn(64, channels, 32, 32, generator=g)
    x = x.contiguous(memory_format=torch.channels_last).to(dtype)
    rows = x.permute(0, 2, 3, 1).reshape(-1, channels)  # a view: rows of the storage
    rows[:32] += 0.3
    assert rows.data_ptr() == x.data_ptr()
    mean, var, _, _ = torch.ops.fused_resnet.bn_stats_cpp(x, None, None, 1e-5)
    var64, mean64 = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), mean64, rtol=2 ** -23, atol=0)
    torch.testing.assert_close(var.double(), var64, rtol=1e-6, atol=0)


def test_nchw_statistics_of_a_plane_led_by_an_outlier():
    """NCHW sums each plane's deviations from its first value in double: an extreme first value
    (1e6 standard deviations off) costs at most log2(plane size) of double's 53 bits."""
    if backend.why_not("cpp", "cpu"):
        pytest.skip(backend.why_not("cpp", "cpu"))
    g = torch.Generator().manual_seed(3)
    x = -7.0 + 0.01 * torch.randn(2, 3, 64, 64, generator=g)
    x[:, :, 0, 0] += 1e4
    mean, var, _, _ = torch.ops.fused_resnet.bn_stats_cpp(x, None, None, 1e-5)
    var64, mean64 = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), mean64, rtol=2 ** -23, atol=0)
    torch.testing.assert_close(var.double(), var64, rtol=2 ** -23, atol=0)
