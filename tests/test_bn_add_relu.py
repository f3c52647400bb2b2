"""fused_resnet.functional.batch_norm_add_relu on every backend usable on this machine, against
PyTorch's F.batch_norm + add + ReLU (same dtype) and float64."""

import pytest
import torch

from bn_cases import check_against_pytorch
from conftest import backend_params, cpu_backend_params, requires_cuda
from fused_resnet import backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# C=3 (stem), N=1 with 7x7, H*W not a multiple of 8, C not a multiple of 8, large C.
SHAPES = [(2, 3, 5, 7), (1, 7, 7, 7), (4, 16, 8, 8), (2, 130, 3, 5), (2, 1024, 2, 3)]
LAYOUTS = pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
MODES = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])


@pytest.mark.parametrize("backend_name", cpu_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@LAYOUTS
@MODES
def test_matches_pytorch(backend_name, dtype, shape, channels_last, training):
    check_against_pytorch(backend_name, shape, dtype, channels_last, training)


VARIANTS = {
    "momentum_none": dict(momentum=None),
    "affine_false": dict(affine=False),
    "no_running_stats": dict(track_running_stats=False),
    "no_residual": dict(residual=False),
    "no_relu": dict(relu=False),
}


@pytest.mark.parametrize("backend_name", cpu_backend_params())
@pytest.mark.parametrize("variant", VARIANTS)
@LAYOUTS
@MODES
def test_variants_over_steps(backend_name, variant, channels_last, training):
    """Three steps: outputs, gradients, running stats and num_batches_tracked vs
    nn.BatchNorm2d, for each nn.BatchNorm2d configuration the op must express."""
    check_against_pytorch(backend_name, (3, 6, 5, 4), torch.float32, channels_last, training,
                          steps=3, **VARIANTS[variant])


@pytest.mark.parametrize("backend_name", cpu_backend_params())
def test_low_precision_running_stats(backend_name):
    """fp16 input with fp32 BN buffers (autocast-style), several steps."""
    check_against_pytorch(backend_name, (4, 8, 6, 6), torch.float16, True, True, steps=3)


@pytest.mark.parametrize("backend_name", cpu_backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@MODES
def test_low_precision_model(backend_name, dtype, training):
    """model.half() / .bfloat16(): parameters and running stats in the low dtype, updated in
    that dtype as nn.BatchNorm2d does; gradients of weight and bias in that dtype."""
    check_against_pytorch(backend_name, (4, 8, 6, 6), dtype, False, training, steps=3,
                          bn_dtype=dtype)


@pytest.mark.parametrize("backend_name", cpu_backend_params())
@pytest.mark.parametrize("make_strided", [
    lambda t: t[:, ::2, :, 1:-1],          # channel slice and width slice: no dense layout
    lambda t: t.transpose(2, 3),           # dense but neither NCHW nor NHWC
    lambda t: t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)[:, :, ::2],
], ids=["sliced", "transposed", "nhwc_strided"])
def test_non_contiguous_input(backend_name, make_strided):
    import torch.nn.functional as F

    import fused_resnet as fr

    base = torch.randn(2, 8, 6, 8)
    x = make_strided(base)
    r = make_strided(torch.randn_like(base))
    c = x.shape[1]
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    rm, rv = torch.zeros(c), torch.ones(c)
    with backend.use(backend_name):
        out = fr.functional.batch_norm_add_relu(x, r, rm.clone(), rv.clone(), w, b,
                                                training=True)
    ref = torch.relu(F.batch_norm(x, rm.clone(), rv.clone(), w, b, training=True) + r)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend_name", cpu_backend_params())
def test_residual_in_other_layout(backend_name):
    """input channels_last, residual NCHW (and the reverse): converted, never misread."""
    check_layouts = [(True, False), (False, True)]
    import torch.nn.functional as F

    import fused_resnet as fr

    for x_cl, r_cl in check_layouts:
        x = torch.randn(2, 5, 4, 3)
        r = torch.randn(2, 5, 4, 3)
        if x_cl:
            x = x.contiguous(memory_format=torch.channels_last)
        if r_cl:
            r = r.contiguous(memory_format=torch.channels_last)
        rm, rv = torch.zeros(5), torch.ones(5)
        with backend.use(backend_name):
            out = fr.functional.batch_norm_add_relu(x, r, rm, rv, training=False)
        ref = torch.relu(F.batch_norm(x, rm, rv, training=False) + r)
        torch.testing.assert_close(out, ref)


# ---- GPU: every backend on CUDA in all three dtypes --------------------------------------------
def cuda_backend_params():
    return backend_params("cuda")


GPU_SHAPES = SHAPES + [(32, 256, 56, 56), (32, 2048, 7, 7), (8, 64, 112, 112)]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend_name", cuda_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@LAYOUTS
@MODES
def test_matches_pytorch_cuda(backend_name, dtype, shape, channels_last, training):
    check_against_pytorch(backend_name, shape, dtype, channels_last, training, device="cuda")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend_name", cuda_backend_params())
@pytest.mark.parametrize("variant", VARIANTS)
@LAYOUTS
def test_variants_cuda(backend_name, variant, channels_last):
    check_against_pytorch(backend_name, (3, 6, 5, 4), torch.float32, channels_last, True,
                          device="cuda", steps=3, **VARIANTS[variant])


@pytest.mark.skipif(backend.why_not("cpp", "cpu") is not None, reason="fused_resnet._C is not built")
@LAYOUTS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_steps_are_the_python_path(monkeypatch, channels_last, dtype):
    """On the CPU, plain eager training runs each fused op's step as one C++ call
    (csrc/cpu/training_steps.cpp: bn_add_relu_step[_backward], bn_relu_conv2d_bn_stats_step
    [_backward]); the same kernels on the same operands in the same order, so a fused
    Bottleneck's output, every gradient and every running statistic are bitwise those of the
    Python path (forced here by turning the steps off), for a training step and for an eval
    BN + add + ReLU under autograd; and the steps really ran (the profiler sees their ops), with
    the same library conv (conv2d_cpu: GEMMs for the 1x1 convs in channels_last)."""
    import copy

    import torchvision

    import fused_resnet as fr
    from fused_resnet.ops import eager

    torch.manual_seed(0)
    block = torchvision.models.resnet.Bottleneck(
        32, 16, stride=2, downsample=torch.nn.Sequential(torch.nn.Conv2d(32, 64, 1, 2,
                                                                         bias=False),
                                                         torch.nn.BatchNorm2d(64)))
    x = torch.randn(4, 32, 10, 10)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bn = torch.nn.BatchNorm2d(32).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)

    def run(model):
        xs = x.detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = model(xs)
            eval_out = fr.functional.batch_norm_add_relu(xs, xs, bn.running_mean, bn.running_var,
                                                         bn.weight, bn.bias)
        grads = torch.autograd.grad((out.float().square().sum(), eval_out.float().sum()),
                                    [xs, *model.parameters(), bn.weight, bn.bias])
        return [out, eval_out, *grads, *model.buffers()]

    model = fr.fuse_(torch.nn.Sequential(copy.deepcopy(block))).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    with torch.profiler.profile() as prof:
        stepped = run(model)
    names = {e.key for e in prof.key_averages()}
    assert {"fused_resnet::bn_add_relu_step", "fused_resnet::bn_add_relu_step_backward",
            "fused_resnet::bn_relu_conv2d_bn_stats_step",
            "fused_resnet::bn_relu_conv2d_bn_stats_step_backward"} <= names, sorted(names)
    # channels_last: the 1x1 convs over 25 pixels ran as GEMMs (csrc/cpu/conv_gemm.cpp), in
    # bf16 where oneDNN has native bf16 kernels
    gemm_dtype = dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert ("aten::mm" in names) == (channels_last and gemm_dtype), sorted(names)
    monkeypatch.setattr(eager, "cpu_step", lambda *args: False)
    python = run(twin)
    assert len(stepped) == len(python)
    for got, want in zip(stepped, python):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)
