"""Benchmark of the fused convolution per ResNet-50 conv layer.

    pytest benchmarks/test_bench_conv.py --benchmark-json=out.json
    python benchmarks/report.py out.json

Providers (same run, same inputs):
    eager          library conv (cuDNN / mkldnn) + BatchNorm + add + ReLU in eager PyTorch
    fused-cpp      library conv + this package's fused epilogue kernel
    fused-triton   the Triton implicit-GEMM conv with the epilogue in its tile (GPU only)
    fused-cutlass  the CUTLASS implicit-GEMM conv with the epilogue in its tile (GPU, eval,
                   when built with CUTLASS)
    fused          the automatic choice (measured per shape on a GPU)
Modes: eval (BN folded into the conv: scale/bias + residual + ReLU in the epilogue) and
train_fwd (BN statistics in the conv epilogue, then BN-apply + add + ReLU). Plus the
bottleneck end with its projection shortcut as one GEMM (dual). Each provider's output is
checked against eager before it is timed. Reported: time, images/s, TFLOP/s of the conv(s),
ratio to eager.
"""

import contextlib
import copy

import pytest
import torch

import fused_resnet as fr
from conftest import gpu as _gpu, time_and_record, tiny, with_triton
from fused_resnet import backend, fold
from fused_resnet.ops import conv as conv_ops

ops = torch.ops.fused_resnet

# (name, C_in, C_out, kernel, stride, padding, input H=W): one conv per ResNet-50 stage kind
GPU_LAYERS = [
    ("stem", 3, 64, 7, 2, 3, 224),
    ("layer1.conv2", 64, 64, 3, 1, 1, 56), ("layer1.conv3", 64, 256, 1, 1, 0, 56),
    ("layer2.conv2", 128, 128, 3, 1, 1, 28), ("layer2.conv1", 512, 128, 1, 1, 0, 28),
    ("layer3.conv2", 256, 256, 3, 1, 1, 14), ("layer3.conv3", 256, 1024, 1, 1, 0, 14),
    ("layer4.conv2", 512, 512, 3, 1, 1, 7), ("layer4.conv1", 2048, 512, 1, 1, 0, 7),
]
CPU_LAYERS = [("layer1.conv2", 64, 64, 3, 1, 1, 28), ("layer3.conv3", 256, 1024, 1, 1, 0, 7)]
DUAL = [("layer2.0 conv3+downsample", 128, 512, 256, 2, 56)]  # (name, C_mid, C_out, C_in, s, H)
TINY_LAYERS = [("tiny.conv2", 16, 16, 3, 1, 1, 6)]  # FUSED_RESNET_BENCH_TINY=1
TINY_DUAL = [("tiny conv3+downsample", 16, 32, 16, 2, 8)]


def _providers():
    names = with_triton(["eager", "fused", "fused-cpp"])
    if _gpu() and conv_ops.why_path_cannot_run(
            "cutlass", torch.empty(1, 64, 8, 8, device="cuda", dtype=torch.bfloat16),
            torch.empty(64, 64, 3, 3, device="cuda", dtype=torch.bfloat16), [1, 1], [1, 1],
            [1, 1], 1) is None:
        names.append("fused-cutlass")
    return names


# provider -> (BN-piece backend, conv path) forced; "fused" forces neither
FORCED = {"fused-cpp": ("cpp", "library"), "fused-triton": ("triton", "triton"),
          "fused-cutlass": ("cpp", "cutlass")}


@contextlib.contextmanager
def _forced(provider):
    if provider not in FORCED:
        yield
        return
    backend_name, path = FORCED[provider]
    with backend.use(backend_name), conv_ops.use_path(path):
        yield


def _batch() -> int:
    return 2 if tiny() or not _gpu() else 256


def _time_and_record(benchmark, step, device, provider, layer, mode, flops):
    seconds = time_and_record(benchmark, step, device, _batch(), op="conv", provider=provider,
                              mode=mode, shape=[layer],
                              dtype="bfloat16" if _gpu() else "float32", layout="channels_last")
    if seconds is not None:
        benchmark.extra_info["tflops"] = flops / seconds / 1e12


def _inputs(c_in, c_out, k, s, p, hw, device, dtype):
    n = _batch()
    x = torch.randn(n, c_in, hw, hw, device=device).to(dtype).contiguous(
        memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(c_in, c_out, k, s, p, bias=False).to(device, dtype)
    bn = torch.nn.BatchNorm2d(c_out).to(device)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.2, 0.2), bn.running_var.uniform_(0.5, 1.5)
    oh = (hw + 2 * p - k) // s + 1
    residual = torch.randn(n, c_out, oh, oh, device=device).to(dtype).contiguous(
        memory_format=torch.channels_last)
    return x, conv, bn, residual, 2.0 * n * oh * oh * c_out * c_in * k * k


@pytest.mark.parametrize("mode", ["eval", "train_fwd"])
@pytest.mark.parametrize("layer", TINY_LAYERS if tiny() else GPU_LAYERS if _gpu() else CPU_LAYERS,
                         ids=lambda v: v[0])
@pytest.mark.parametrize("provider", _providers())
def test_conv_layer(benchmark, provider, layer, mode, bench_device):
    name, c_in, c_out, k, s, p, hw = layer
    dtype = torch.bfloat16 if _gpu() else torch.float32
    x, conv, bn, residual, flops = _inputs(c_in, c_out, k, s, p, hw, bench_device, dtype)
    if provider == "fused-cutlass" and mode != "eval":
        pytest.skip("the CUTLASS conv has the inference epilogue only (training: next step)")
    stride, padding = [s, s], [p, p]

    if mode == "eval":
        bn.eval()
        weight, bias = fold.fold_conv_bn(conv.weight, None, *fold.bn_eval_scale_shift(bn))

        def run():
            with torch.no_grad():
                if provider == "eager":
                    return torch.relu(bn(conv(x)) + residual)
                with _forced(provider):
                    return ops.conv2d_epilogue(x, weight, stride, padding, [1, 1], 1, None, bias,
                                               residual, True)
    else:
        bn.train()

        def run():
            with torch.no_grad():
                if provider == "eager":
                    return torch.relu(bn(conv(x)) + residual)
                with _forced(provider):
                    z, mean, var = ops.conv2d_bn_stats(x, conv.weight, stride, padding, [1, 1], 1)
                    return fr.functional.batch_norm_add_relu(
                        z, residual, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                        training=True, batch_mean=mean, batch_var=var)

    with torch.no_grad():  # train mode: batch statistics, the same for every call
        expected = torch.relu(copy.deepcopy(bn)(conv(x)) + residual)
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(run().float(), expected.float(), rtol=tol, atol=tol,
                               msg=f"{provider} disagrees with eager")

    _time_and_record(benchmark, run, bench_device, provider, name, mode, flops)


@pytest.mark.parametrize("layer", TINY_DUAL if tiny() else DUAL, ids=lambda v: v[0])
@pytest.mark.parametrize("provider", _providers())
def test_bottleneck_end_with_projection(benchmark, provider, layer, bench_device):
    """relu(bn3(conv3(y)) + bn_d(conv_d(x))) in eval: eager vs one fused GEMM."""
    name, c_mid, c_out, c_in, s, hw = layer
    if not _gpu() and not tiny():
        hw = 14
    dtype = torch.bfloat16 if _gpu() else torch.float32
    n = _batch()
    dev = bench_device
    y = torch.randn(n, c_mid, hw // s, hw // s, device=dev).to(dtype).contiguous(
        memory_format=torch.channels_last)
    x = torch.randn(n, c_in, hw, hw, device=dev).to(dtype).contiguous(
        memory_format=torch.channels_last)
    conv3 = torch.nn.Conv2d(c_mid, c_out, 1, bias=False).to(dev, dtype)
    conv_d = torch.nn.Conv2d(c_in, c_out, 1, s, bias=False).to(dev, dtype)
    bn3, bn_d = torch.nn.BatchNorm2d(c_out).to(dev).eval(), torch.nn.BatchNorm2d(c_out).to(dev).eval()
    w3, b3 = fold.fold_conv_bn(conv3.weight, None, *fold.bn_eval_scale_shift(bn3))
    wd, bd = fold.fold_conv_bn(conv_d.weight, None, *fold.bn_eval_scale_shift(bn_d))
    if provider == "fused-cutlass":
        pytest.skip("conv3 + projection as one GEMM: Triton or library (CUTLASS: next step)")

    def run():
        with torch.no_grad():
            if provider == "eager":
                return torch.relu(bn3(conv3(y)) + bn_d(conv_d(x)))
            with _forced(provider):
                return ops.conv2d_dual_epilogue(y, w3, [1, 1], [0, 0], x, wd, s, b3 + bd, True)

    tol = 5e-2 if dtype == torch.bfloat16 else 1e-3
    with torch.no_grad():
        expected = torch.relu(bn3(conv3(y)) + bn_d(conv_d(x)))
    torch.testing.assert_close(run().float(), expected.float(), rtol=tol, atol=tol)
    flops = 2.0 * n * (hw // s) ** 2 * c_out * (c_mid + c_in)

    _time_and_record(benchmark, run, bench_device, provider, name, "eval_dual", flops)
