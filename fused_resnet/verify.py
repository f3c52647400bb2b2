"""`fused-resnet verify`: checks the fused ops against PyTorch on this machine, and the
comparison machinery the test suite uses too.

Criterion (as flash-attention's tests): the fused result is compared with PyTorch in float64 on
the same input values; its error must be at most twice the error PyTorch itself makes in the
same dtype, plus a few units of rounding of that dtype at the result's scale (the fused op
rounds once from fp32 where PyTorch rounds after BN and again after the add, so either can be
the closer one on a given element).
"""

import copy
from typing import NamedTuple, Optional

import torch

from fused_resnet import backend, functional, layout
from fused_resnet.compare import normwise_error  # noqa: F401 - the tests import it from here

ROUNDING_UNITS = 4


class Comparison(NamedTuple):
    name: str
    error: float          # fused vs float64
    pytorch_error: float  # PyTorch in the same dtype vs float64
    allowed: float

    @property
    def ok(self) -> bool:
        return self.error <= self.allowed

    @property
    def ratio(self) -> float:
        """error / allowed: <= 1 passes."""
        if self.allowed == 0:
            return 0.0 if self.error == 0 else float("inf")
        return self.error / self.allowed


def compare(name: str, got: torch.Tensor, ref64: torch.Tensor, torch_same_dtype: torch.Tensor,
            torch_ref64: Optional[torch.Tensor] = None) -> Comparison:
    """torch_ref64: the float64 reference for PyTorch's result, if not ref64 (see
    compare_step)."""
    torch_ref64 = ref64 if torch_ref64 is None else torch_ref64
    err = (got.double() - ref64).abs().max().item() if got.numel() else 0.0
    err_torch = (torch_same_dtype.double() - torch_ref64).abs().max().item() \
        if got.numel() else 0.0
    scale = (ref64.abs().max().item() if ref64.numel() else 0.0) + 1.0
    allowed = 2 * err_torch + ROUNDING_UNITS * torch.finfo(got.dtype).eps * scale
    return Comparison(name, err, err_torch, allowed)


def make_bn(channels, *, affine=True, track_running_stats=True, momentum=0.1, device="cpu"):
    """An nn.BatchNorm2d with non-trivial parameters and running statistics."""
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
    """relu(bn(x) + residual) through the fused op, with nn.BatchNorm2d's own parameters,
    buffers and train/eval semantics."""
    training = bn.training or bn.running_mean is None
    return functional.batch_norm_add_relu(
        x, residual, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=training,
        momentum=bn.momentum, eps=bn.eps, relu=relu, num_batches_tracked=bn.num_batches_tracked)


def pytorch_step(bn, x, residual, relu=True):
    y = bn(x)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def masked_step(keep):
    """bn(x) + residual with the ReLU's decision fixed to `keep` (a bool tensor): the float64
    reference for an implementation whose ReLU decided `keep`."""
    def step(bn, x, residual, relu=True):
        y = pytorch_step(bn, x, residual, relu=False)
        return y * keep.to(y.dtype) if relu else y
    return step


def forward_backward(step, bn, x, residual, grad_out, relu=True):
    """Returns (output, gradients of x, residual (if any), weight and bias (if affine))."""
    x = x.detach().requires_grad_()
    residual = residual.detach().requires_grad_() if residual is not None else None
    out = step(bn, x, residual, relu)
    wrt = [t for t in (x, residual, bn.weight, bn.bias) if t is not None]
    grads = torch.autograd.grad(out, wrt, grad_out)
    return out.detach(), grads


class StepRuns(NamedTuple):
    """One step of the three BatchNorms (see compare_step): outputs and gradients of the fused
    step, of PyTorch in the same dtype and in float64, and the float64 gradients given each
    one's own ReLU decisions."""
    snapshot: torch.nn.Module  # the float64 BatchNorm as it was before the step
    out: torch.Tensor
    grads: tuple
    out_t: torch.Tensor
    grads_t: tuple
    out_64: torch.Tensor
    grads_64: tuple
    grads_64_t: tuple
    pre_64: Optional[torch.Tensor]  # the float64 pre-activation (with ReLU)


def run_step(fused, bn_fused, bn_torch, bn_64, x, residual, grad_out, relu=True) -> StepRuns:
    """The runs compare_step compares; `fused` is the fused step (e.g. fused_step)."""
    snapshot = copy.deepcopy(bn_64)  # state before this step, for the masked references
    x64 = x.double()
    r64 = residual.double() if residual is not None else None
    g64 = grad_out.double()
    out, grads = forward_backward(fused, bn_fused, x, residual, grad_out, relu)
    out_t, grads_t = forward_backward(pytorch_step, bn_torch, x, residual, grad_out, relu)
    out_64, _ = forward_backward(pytorch_step, bn_64, x64, r64, g64, relu)
    pre_64 = None
    if relu:
        pre_64 = pytorch_step(copy.deepcopy(snapshot), x64, r64, relu=False).detach()
        _, grads_64 = forward_backward(masked_step(out > 0), copy.deepcopy(snapshot), x64, r64,
                                       g64)
        _, grads_64_t = forward_backward(masked_step(out_t > 0), copy.deepcopy(snapshot), x64,
                                         r64, g64)
    else:
        _, grads_64 = forward_backward(pytorch_step, copy.deepcopy(snapshot), x64, r64, g64,
                                       relu)
        grads_64_t = grads_64
    return StepRuns(snapshot, out, grads, out_t, grads_t, out_64, grads_64, grads_64_t, pre_64)


def compare_step(bn_fused, bn_torch, bn_64, x, residual, grad_out, relu=True):
    """One training or eval step of the three BatchNorms on the same values; the comparisons
    of output, ReLU decisions and every gradient.

    Where the exact pre-activation is within rounding of zero, the ReLU's decision may go
    either way in low precision (PyTorch's own does), and a gradient there is g or 0. So each
    implementation's gradients are compared with the float64 gradients *given its own ReLU
    decisions*, and those decisions are checked separately: they must match float64's wherever
    the pre-activation is farther from zero than the forward tolerance."""
    runs = run_step(fused_step, bn_fused, bn_torch, bn_64, x, residual, grad_out, relu)
    out, grads, out_t, grads_t, out_64 = runs.out, runs.grads, runs.out_t, runs.grads_t, \
        runs.out_64
    grads_64, grads_64_t, pre_64 = runs.grads_64, runs.grads_64_t, runs.pre_64
    if out.dtype != x.dtype or out.shape != x.shape:
        raise AssertionError(f"output is {out.dtype} {tuple(out.shape)}, input {x.dtype} "
                             f"{tuple(x.shape)}")
    if layout.is_channels_last(x) and not layout.is_channels_last(out):
        raise AssertionError("channels_last input gave an output in another layout")
    names = ["grad input"] + (["grad residual"] if residual is not None else []) \
        + (["grad weight", "grad bias"] if bn_fused.weight is not None else [])
    results = [compare("output", out, out_64, out_t)]
    if relu:
        ambiguous = pre_64.abs() <= results[0].allowed
        wrong = ((out > 0) != (pre_64 > 0)) & ~ambiguous
        results.append(Comparison("relu decisions", float(wrong.sum().item()), 0.0, 0.0))
    for name, got, ref64, ref_t, ref64_t in zip(names, grads, grads_64, grads_t, grads_64_t):
        if got.dtype != ref_t.dtype:
            raise AssertionError(f"{name} is {got.dtype}, PyTorch's is {ref_t.dtype}")
        results.append(compare(name, got, ref64, ref_t, ref64_t))
    return results


def three_batchnorms(channels, device, training, bn_dtype=torch.float32, **bn_kwargs):
    """The same BatchNorm three times: for the fused op and for PyTorch (parameters and
    buffers in `bn_dtype`), and in float64 from those same (rounded) values."""
    bn = make_bn(channels, device=device, **bn_kwargs).train(training).to(bn_dtype)
    return copy.deepcopy(bn), copy.deepcopy(bn), copy.deepcopy(bn).double()


def verify_bn_add_relu(device: Optional[str] = None, verbose: bool = True) -> bool:
    """Every backend usable on `device`, fp32 (and fp16/bf16 on CUDA), NCHW and channels_last,
    train and eval, forward and backward, against PyTorch. Prints a line per case."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if device == "cuda" else [])
    shape = (8, 64, 14, 14) if device == "cuda" else (4, 32, 7, 7)
    names = [b for b in backend.BACKENDS if backend.why_not(b, device) is None]
    all_ok = True
    for name in names:
        for dtype in dtypes:
            for channels_last in (False, True):
                for training in (True, False):
                    bns = three_batchnorms(shape[1], device, training)
                    x, r, g = (make_activation(shape, dtype, channels_last, device)
                               for _ in range(3))
                    with backend.use(name):
                        results = compare_step(*bns, x, r, g)
                    ok = all(c.ok for c in results)
                    all_ok &= ok
                    if verbose:
                        worst = max(results, key=lambda c: c.ratio)
                        print(f"{'ok      ' if ok else 'MISMATCH'} backend={name:6s} "
                              f"{str(dtype).replace('torch.', ''):8s} "
                              f"{'nhwc' if channels_last else 'nchw'} "
                              f"{'train' if training else 'eval '} worst: {worst.name} "
                              f"err {worst.error:.2e} (allowed {worst.allowed:.2e}, "
                              f"PyTorch's own {worst.pytorch_error:.2e})")
    return all_ok
