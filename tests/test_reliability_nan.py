"""NaN survives every fused path, as it does in PyTorch (torch.relu keeps NaN; users and
GradScaler rely on seeing it): the same output elements are NaN as in the PyTorch composition,
on every backend and conv path usable here. The TF32 setting is read without raising whichever
of PyTorch's two APIs the user (or a library) set it with. Bad input raises before any kernel;
an empty batch's gradients are PyTorch's."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import cpu_backend_params
from fused_resnet import backend
from fused_resnet.ops import conv as conv_ops

ops = torch.ops.fused_resnet
PATHS = [pytest.param(p, marks=pytest.mark.skipif(
    p == "triton" and backend.why_not("triton", "cpu") is not None,
    reason="Triton on CPU needs TRITON_INTERPRET=1")) for p in ("library", "triton")]


def _with_nan(t: torch.Tensor, where=(0, 1, 2, 3)) -> torch.Tensor:
    t = t.clone()
    t[where] = float("nan")
    return t


def _assert_same_nans(got, want):
    assert torch.equal(torch.isnan(got), torch.isnan(want)), \
        f"{int(torch.isnan(got).sum())} NaN vs PyTorch's {int(torch.isnan(want).sum())}"
    assert torch.isnan(want).any()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("nan_in", ["input", "residual", "bias"])
def test_conv2d_epilogue_keeps_nan(path, nan_in):
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    w = torch.randn(24, 16, 3, 3) / 12
    bias, residual = torch.randn(24), torch.randn(2, 24, 6, 6)
    if nan_in == "input":
        x = _with_nan(x)
    elif nan_in == "residual":
        residual = _with_nan(residual)
    else:
        bias[5] = float("nan")
    want = torch.relu(F.conv2d(x, w, None, 1, 1) + bias.view(1, -1, 1, 1) + residual)
    with conv_ops.use_path(path):
        got = ops.conv2d_epilogue(x, w, [1, 1], [1, 1], [1, 1], 1, None, bias, residual, True)
    _assert_same_nans(got, want)


@pytest.mark.parametrize("path", PATHS)
def test_dual_epilogue_keeps_nan(path):
    y = torch.randn(2, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    x = _with_nan(torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last),
                  where=(0, 1, 2, 2))  # a pixel the stride-2 shortcut reads
    w3, wd, b = torch.randn(24, 16, 1, 1), torch.randn(24, 32, 1, 1), torch.randn(24)
    want = torch.relu(F.conv2d(y, w3) + F.conv2d(x, wd, stride=2) + b.view(1, -1, 1, 1))
    with conv_ops.use_path(path):
        got = ops.conv2d_dual_epilogue(y, w3, [1, 1], [0, 0], x, wd, 2, b, True)
    _assert_same_nans(got, want)


@pytest.mark.parametrize("path", PATHS)
def test_bn_relu_prologue_keeps_nan(path):
    """The previous BN + ReLU applied on the conv's operand load (the Triton prologue)."""
    z = _with_nan(torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last))
    mean, var = torch.randn(16) * 0.1, torch.rand(16) + 0.5
    gamma, beta = torch.rand(16) + 0.5, torch.randn(16)
    w = torch.randn(8, 16, 3, 3) / 12
    a = torch.relu(F.batch_norm(z, mean, var, gamma, beta, False, 0.0, 1e-5))
    want = F.conv2d(a, w, None, 1, 1)
    with conv_ops.use_path(path):
        got, _, _ = ops.bn_relu_conv2d_bn_stats(z, gamma, beta, mean, var, 1e-5, w, [1, 1],
                                                [1, 1], [1, 1], 1)
    _assert_same_nans(got, want)


@pytest.mark.parametrize("backend_name", cpu_backend_params())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_bn_add_relu_keeps_nan(backend_name, channels_last):
    z = _with_nan(torch.randn(2, 8, 5, 5))
    if channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    residual = torch.randn(2, 8, 5, 5)
    mean, var = torch.randn(8), torch.rand(8) + 0.5
    want = torch.relu(F.batch_norm(z, mean, var, None, None, False, 0.0, 1e-5) + residual)
    with backend.use(backend_name):
        got = ops.bn_add_relu(z, residual, None, None, mean, var, False, 1e-5, True, False,
                              None, None)[0]
    _assert_same_nans(got, want)


TF32_SCRIPT = """
import torch
from fused_resnet.ops import conv as conv_ops
{setting}
x = torch.randn(1, 8, 5, 5)
w = torch.randn(8, 8, 3, 3)
conv_ops.conv2d_epilogue(x, w, [1, 1], [1, 1], [1, 1], 1, None, None, None, True)
print(conv_ops.allows_tf32())
"""


@pytest.mark.parametrize("setting, expected", [
    ("", True),  # PyTorch's default: cuDNN convs may use TF32
    ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", True),  # broke the legacy read
    ("torch.backends.cudnn.conv.fp32_precision = 'ieee'", False),
    ("torch.backends.cudnn.allow_tf32 = False", False),
    ("torch.backends.fp32_precision = 'ieee'; torch.backends.cudnn.conv.fp32_precision = 'none'",
     False),
])
def test_tf32_setting_is_read_through_either_api(setting, expected):
    """After the new fp32_precision API was used, reading the legacy allow_tf32 flags raises;
    the ops read the setting without raising and as PyTorch applies it to cuDNN convs. Run in
    a fresh process: the setting is global."""
    if not hasattr(torch.backends, "fp32_precision"):
        pytest.skip("this torch has only the legacy TF32 flags")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", TF32_SCRIPT.format(setting=setting)],
                         capture_output=True, text=True, env=env, timeout=300,
                         cwd=os.path.expanduser("~"))  # the installed package, not the tree
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == str(expected)


@pytest.mark.parametrize("change, message", [
    (dict(shortcut_input=torch.randn(2, 32, 6, 6)), "output is 3x3, conv3's 4x4"),
    (dict(shortcut_input=torch.randn(3, 32, 8, 8)), "batch 3 != 2"),
    (dict(shortcut_weight=torch.randn(20, 32, 1, 1)), "20 output channels"),
    (dict(shortcut_weight=torch.randn(24, 16, 1, 1)), "expects 16 input channels"),
    (dict(input=torch.randn(2, 16, 0, 0), shortcut_input=torch.randn(2, 32, 0, 0)),
     "smaller than its kernel"),
])
def test_dual_epilogue_rejects_a_mismatched_shortcut(change, message):
    """A shortcut that does not produce conv3's grid and channels raises before any kernel
    runs (the fused GEMM would read past the shortcut input), on every path."""
    args = dict(input=torch.randn(2, 16, 4, 4), weight=torch.randn(24, 16, 1, 1),
                shortcut_input=torch.randn(2, 32, 8, 8),
                shortcut_weight=torch.randn(24, 32, 1, 1))
    args.update(change)
    for path in ("library", "triton"):
        if path == "triton" and backend.why_not("triton", "cpu") is not None:
            continue
        with conv_ops.use_path(path), pytest.raises(ValueError, match=message):
            ops.conv2d_dual_epilogue(args["input"], args["weight"], [1, 1], [0, 0],
                                     args["shortcut_input"], args["shortcut_weight"], 2,
                                     torch.zeros(24), True)


@pytest.mark.parametrize("backend_name", cpu_backend_params())
def test_empty_batch_gradients_are_pytorchs(backend_name):
    """N = 0 in training: empty input gradients, and BN weight/bias gradients of exactly 0
    (the batch statistics are NaN: 0 * rsqrt(NaN) must not leak into the weight gradient)."""
    z = torch.randn(0, 6, 4, 4, requires_grad=True)
    weight = torch.rand(6, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    with backend.use(backend_name):
        out = ops.bn_add_relu(z, None, weight, bias, None, None, True, 1e-5, True, True, None,
                              None)[0]
        out.sum().backward()
    assert out.shape == z.shape and z.grad.shape == z.shape
    assert torch.equal(weight.grad, torch.zeros(6)) and torch.equal(bias.grad, torch.zeros(6))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("path", ["library", "triton", "cutlass"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_conv_paths_keep_nan(path, dtype):
    """On the GPU, every conv path (CUTLASS's epilogue ReLU included) keeps NaN."""
    x = _with_nan(torch.randn(4, 64, 14, 14, device="cuda", dtype=dtype).contiguous(
        memory_format=torch.channels_last))
    w = (torch.randn(64, 64, 3, 3, device="cuda") / 24).to(dtype)
    bias = torch.randn(64, device="cuda")
    residual = torch.randn(4, 64, 14, 14, device="cuda", dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    why = conv_ops.why_path_cannot_run(path, x, w, [1, 1], [1, 1], [1, 1], 1)
    if why is not None:
        pytest.skip(why)
    want = torch.relu(F.conv2d(x.float(), w.float(), bias, 1, 1) + residual.float())
    with conv_ops.use_path(path):
        got = ops.conv2d_epilogue(x, w, [1, 1], [1, 1], [1, 1], 1, None, bias, residual, True)
    _assert_same_nans(got.float(), want)
