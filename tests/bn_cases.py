"""Shared helpers of the BatchNorm + add + ReLU tests: inputs, the plain-PyTorch oracle and the
error criterion.

Criterion (as flash-attention's tests): the fused result is compared with PyTorch in float64
on the same input values, and its error must be at most twice the error PyTorch itself makes
in the same dtype, plus a few units of rounding of that dtype at the result's scale (the fused
op rounds once from fp32 where PyTorch rounds after BN and again after the add, so either can
be the closer one on a given element).
"""

import copy

import torch
import torch.nn.functional as F

import fused_resnet as fr
from fused_resnet import backend

ROUNDING_UNITS = 4


def tolerance(dtype: torch.dtype, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item() + 1.0
    return ROUNDING_UNITS * torch.finfo(dtype).eps * scale


def assert_close_to_reference(name, got, ref64, torch_same_dtype):
    err = (got.double() - ref64).abs().max().item()
    err_torch = (torch_same_dtype.double() - ref64).abs().max().item()
    allowed = 2 * err_torch + tolerance(got.dtype, ref64)
    assert err <= allowed, (f"{name}: max error {err:.3g} vs float64 exceeds {allowed:.3g} "
                            f"(PyTorch's own error in {got.dtype}: {err_torch:.3g})")


def make_bn(channels, *, affine=True, track_running_stats=True, momentum=0.1, device="cpu"):
    bn = torch.nn.BatchNorm2d(channels, affine=affine, track_running_stats=track_running_stats,
                              momentum=momentum).to(device)
    with torch.no_grad():
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        if track_running_stats:
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
    return bn


def make_activation(shape, dtype, channels_last, device="cpu"):
    x = (torch.randn(shape, device=device) * 1.5 + 0.3).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def fused_step(bn, x, residual, relu=True):
    """What a fused block does with nn.BatchNorm2d's parameters and buffers."""
    training = bn.training or bn.running_mean is None
    return fr.functional.batch_norm_add_relu(
        x, residual, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=training,
        momentum=bn.momentum, eps=bn.eps, relu=relu, num_batches_tracked=bn.num_batches_tracked)


def pytorch_step(bn, x, residual, relu=True):
    y = bn(x)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def run(step, bn, x, residual, grad_out, relu=True):
    """Forward and backward; returns (out, grads of x, residual, weight, bias)."""
    x = x.detach().requires_grad_()
    residual = residual.detach().requires_grad_() if residual is not None else None
    out = step(bn, x, residual, relu)
    wrt = [t for t in (x, residual, bn.weight, bn.bias) if t is not None]
    grads = torch.autograd.grad(out, wrt, grad_out)
    return out.detach(), grads


def check_against_pytorch(backend_name, shape, dtype, channels_last, training, *, device="cpu",
                          residual=True, relu=True, affine=True, track_running_stats=True,
                          momentum=0.1, steps=1):
    """Fused vs PyTorch (same dtype) vs PyTorch float64, forward and backward, for `steps`
    steps; then running stats and num_batches_tracked vs nn.BatchNorm2d."""
    bn = make_bn(shape[1], affine=affine, track_running_stats=track_running_stats,
                 momentum=momentum, device=device).train(training)
    bn_fused, bn_torch, bn_64 = copy.deepcopy(bn), copy.deepcopy(bn), copy.deepcopy(bn).double()
    for step in range(steps):
        x = make_activation(shape, dtype, channels_last, device)
        r = make_activation(shape, dtype, channels_last, device) if residual else None
        g = make_activation(shape, dtype, channels_last, device)
        with backend.use(backend_name):
            out, grads = run(fused_step, bn_fused, x, r, g, relu)
        out_t, grads_t = run(pytorch_step, bn_torch, x, r, g, relu)
        out_64, grads_64 = run(pytorch_step, bn_64, x.double(), r.double() if residual else None,
                               g.double(), relu)
        assert out.dtype == dtype and out.shape == x.shape
        if channels_last:
            assert out.is_contiguous(memory_format=torch.channels_last)
        assert_close_to_reference(f"step {step} output", out, out_64, out_t)
        names = ["grad input", "grad residual", "grad weight", "grad bias"]
        if not residual:
            names.remove("grad residual")
        for name, got, ref64, ref_t in zip(names, grads, grads_64, grads_t):
            assert got.dtype == ref_t.dtype, name
            assert_close_to_reference(f"step {step} {name}", got, ref64, ref_t)
    if track_running_stats:
        # Both compute fp32 statistics of the same values; only the summation order differs.
        torch.testing.assert_close(bn_fused.running_mean, bn_torch.running_mean, rtol=1e-4,
                                   atol=1e-5)
        torch.testing.assert_close(bn_fused.running_var, bn_torch.running_var, rtol=1e-4,
                                   atol=1e-5)
        assert bn_fused.num_batches_tracked.item() == bn_torch.num_batches_tracked.item()
