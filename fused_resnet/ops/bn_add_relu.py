"""Custom ops of the fused BatchNorm + residual add + ReLU step, `relu(bn(z) + a)`.

Op structure (all under torch.ops.fused_resnet, each with a fake implementation):

    bn_add_relu(input, residual?, weight?, bias?, running_mean?, running_var?, training, eps, relu,
                save_mask) -> (out, mask, mean, var)      differentiable (register_autograd)
    bn_add_relu_backward(...) -> (grad_input, grad_residual, grad_weight, grad_bias)

built from four kernel-level pieces, each dispatched to a backend (fused_resnet.backend):

    bn_stats                   per channel: batch mean, biased variance (fp32), scale, shift
    bn_add_relu_apply          out = relu((input - mean)*scale + shift + residual) (mean
                               optional: input*scale + shift), packed ReLU mask
    bn_add_relu_grad_reduce    per channel from sum(dz), sum(dz*(input - mean)),
                               sum(input - mean): the coefficients k, b, c and grad_weight,
                               grad_bias

BatchNorm is applied in the centred form (x - mean)*scale + bias, not folded into
x*scale + (bias - mean*scale): on a channel whose |mean| is large against its spread the folded
form's two terms cancel and lose the output's low bits; x - mean does not. Backward corrects
for the fp32 mean's own rounding (reference.bn_backward_coefficients).
    bn_add_relu_grad_apply     grad_input = k*dz + b*(input - mean) + c, grad_residual = dz

The per-channel finishing math runs inside the reductions' last step (one launch each way
instead of a dozen tiny ones).

and their per-backend ops <piece>_cpp (csrc/ops.cpp) and <piece>_triton (kernels/bn_act.py).
Backward reads input, grad and the 1-bit mask twice (reduce, then apply) and writes grad_input
and grad_residual once: no activation is saved for the ReLU.
"""

from typing import Optional

import torch
from torch import Tensor

from fused_resnet import _extension, backend, layout, reference, tracing
from fused_resnet.ops import eager

PIECES = ("bn_stats", "bn_add_relu_apply", "bn_add_relu_grad_reduce", "bn_add_relu_grad_apply")


def _run(piece: str, input: Tensor, *args):
    name = backend.choose(input.device, input.dtype)
    if name == "torch":
        return getattr(reference, piece)(*args)
    if name == "triton" and input.device.type == "cpu" and not tracing.is_plain(input):
        # Traced (fake or functional tensors) under the CPU interpreter, whose kernels cannot
        # be traced into: the piece's opaque dispatching op, which runs the Triton piece later
        # on real tensors
        return getattr(torch.ops.fused_resnet, piece)(*args)
    # Each kernel runs on its tensors' device itself (the C++ glue's CUDAGuard, the Triton
    # launchers' devices.on_device)
    return getattr(torch.ops.fused_resnet, f"{piece}_{name}")(*args)


# ---- fake implementations: shapes, dtypes and strides only ----------------------------------
def _per_channel(input, count):
    return tuple(layout.empty_per_channel(input) for _ in range(count))


def _fake_stats(input, weight, bias, eps):
    return _per_channel(input, 4)


def _fake_apply(input, residual, scale, shift, relu, save_mask, mean=None):
    return layout.empty_like_kernel(input), layout.empty_mask(input, relu and save_mask)


def _fake_grad_reduce(grad, mask, input, mean, var, weight, eps, relu, training):
    return _per_channel(input, 5)


def _fake_grad_apply(grad, mask, input, mean, k, b, c, relu, residual_grad):
    grad_residual = layout.empty_like_kernel(input) if residual_grad else input.new_empty(0)
    return layout.empty_like_kernel(input), grad_residual


_FAKES = dict(zip(PIECES, (_fake_stats, _fake_apply, _fake_grad_reduce, _fake_grad_apply)))


# ---- kernel-level pieces, dispatched to a backend -------------------------------------------
@torch.library.custom_op("fused_resnet::bn_stats", mutates_args=())
def bn_stats(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _run("bn_stats", input, input, weight, bias, eps)


@torch.library.custom_op("fused_resnet::bn_add_relu_apply", mutates_args=())
def bn_add_relu_apply(input: Tensor, residual: Optional[Tensor], scale: Tensor, shift: Tensor,
                      relu: bool, save_mask: bool,
                      mean: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    return _run("bn_add_relu_apply", input, input, residual, scale, shift, relu, save_mask,
                mean)


@torch.library.custom_op("fused_resnet::bn_add_relu_grad_reduce", mutates_args=())
def bn_add_relu_grad_reduce(grad: Tensor, mask: Tensor, input: Tensor, mean: Tensor, var: Tensor,
                            weight: Optional[Tensor], eps: float, relu: bool,
                            training: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _run("bn_add_relu_grad_reduce", input, grad, mask, input, mean, var, weight, eps,
                relu, training)


@torch.library.custom_op("fused_resnet::bn_add_relu_grad_apply", mutates_args=())
def bn_add_relu_grad_apply(grad: Tensor, mask: Tensor, input: Tensor, mean: Tensor, k: Tensor,
                           b: Tensor, c: Tensor, relu: bool,
                           residual_grad: bool) -> tuple[Tensor, Tensor]:
    return _run("bn_add_relu_grad_apply", input, grad, mask, input, mean, k, b, c, relu,
                residual_grad)


# ---- Triton backend: one op per piece (kernels in fused_resnet.kernels.bn_act) --------------
# torch.library.triton_op: torch.compile and torch.export trace into them (each launch a graph
# node Inductor compiles and AOTInductor packages) wherever they are called while tracing: on
# CUDA with the Triton backend, bn_add_relu traces as its pieces (see run and backward). Their
# fakes are the shape functions below (_register_fakes). Called eagerly, and under the CPU
# interpreter (TRITON_INTERPRET=1, whose kernels cannot be traced: they read data pointers),
# they launch as plain functions.
def _triton_kernels():
    from fused_resnet.kernels import bn_act  # imports triton: only when the backend runs
    return bn_act


@torch.library.triton_op("fused_resnet::bn_stats_triton", mutates_args=())
def bn_stats_triton(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _triton_kernels().bn_stats(input, weight, bias, eps)


@torch.library.triton_op("fused_resnet::bn_add_relu_apply_triton", mutates_args=())
def bn_add_relu_apply_triton(input: Tensor, residual: Optional[Tensor], scale: Tensor,
                             shift: Tensor, relu: bool, save_mask: bool,
                             mean: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    return _triton_kernels().bn_add_relu_apply(input, residual, scale, shift, relu, save_mask,
                                               mean)


@torch.library.triton_op("fused_resnet::bn_add_relu_grad_reduce_triton", mutates_args=())
def bn_add_relu_grad_reduce_triton(grad: Tensor, mask: Tensor, input: Tensor, mean: Tensor,
                                   var: Tensor, weight: Optional[Tensor], eps: float, relu: bool,
                                   training: bool) -> tuple[Tensor, Tensor, Tensor, Tensor,
                                                            Tensor]:
    return _triton_kernels().bn_add_relu_grad_reduce(grad, mask, input, mean, var, weight, eps,
                                                     relu, training)


@torch.library.triton_op("fused_resnet::bn_add_relu_grad_apply_triton", mutates_args=())
def bn_add_relu_grad_apply_triton(grad: Tensor, mask: Tensor, input: Tensor, mean: Tensor,
                                  k: Tensor, b: Tensor, c: Tensor, relu: bool,
                                  residual_grad: bool) -> tuple[Tensor, Tensor]:
    return _triton_kernels().bn_add_relu_grad_apply(grad, mask, input, mean, k, b, c, relu,
                                                    residual_grad)


def _register_fakes():
    for piece, fake in _FAKES.items():
        torch.library.register_fake(f"fused_resnet::{piece}")(fake)
        # replaces the triton_op's default fake (its own body), which cannot run under the CPU
        # interpreter; tracing still decomposes the op into its launches
        torch.library.register_fake(f"fused_resnet::{piece}_triton")(fake)
        if _extension.available():
            torch.library.register_fake(f"fused_resnet::{piece}_cpp")(fake)


_register_fakes()


# ---- the differentiable op ------------------------------------------------------------------
@torch.library.custom_op("fused_resnet::bn_add_relu", mutates_args=())
def bn_add_relu(input: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                bias: Optional[Tensor], running_mean: Optional[Tensor],
                running_var: Optional[Tensor], training: bool, eps: float, relu: bool,
                save_mask: bool, batch_mean: Optional[Tensor] = None,
                batch_var: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """relu(batch_norm(input) + residual). Returns (out, mask, mean, var): the batch mean and
    biased variance when training (the caller updates running stats), else fp32 copies of the
    running stats. Running stats are read, never written, here. The ReLU mask is written only
    if save_mask (backward needs it, inference does not). batch_mean/batch_var: the batch
    statistics of `input` when already computed (a conv epilogue, conv2d_bn_stats); training
    only. Backward differentiates through them either way."""
    return _forward_pieces(input, residual, weight, bias, running_mean, running_var, training,
                           eps, relu, save_mask, batch_mean, batch_var)


def _forward_pieces(input, residual, weight, bias, running_mean, running_var, training, eps,
                    relu, save_mask, batch_mean=None, batch_var=None):
    # The pieces run through _run directly, not through their custom ops: one Python dispatch
    # layer less per piece (this op is already opaque to autograd and torch.compile).
    if training and batch_mean is None:
        mean, var, scale, shift = _run("bn_stats", input, input, weight, bias, eps)
    elif eager.cpu_step(input, residual, weight, bias):  # one C++ call, the same pieces
        return torch.ops.fused_resnet.bn_add_relu_step(
            input, residual, weight, bias, batch_mean if training else running_mean,
            batch_var if training else running_var, eps, relu, save_mask)
    else:
        acc = layout.accumulate_dtype(input)
        mean = (batch_mean if training else running_mean).to(acc, copy=True)
        var = (batch_var if training else running_var).to(acc, copy=True)
        scale, shift = reference.bn_centred_scale_shift(var, weight, bias, eps,
                                                           copy_bias=False)
    out, mask = _run("bn_add_relu_apply", input, input, residual, scale, shift, relu, save_mask,
                     mean)
    return out, mask, mean, var


@bn_add_relu.register_fake
def _fake_forward(input, residual, weight, bias, running_mean, running_var, training, eps, relu,
                  save_mask, batch_mean=None, batch_var=None):
    return (layout.empty_like_kernel(input), layout.empty_mask(input, relu and save_mask),
            layout.empty_per_channel(input), layout.empty_per_channel(input))


@torch.library.custom_op("fused_resnet::bn_add_relu_backward", mutates_args=())
def bn_add_relu_backward(grad_out: Tensor, input: Tensor, mask: Tensor, mean: Tensor,
                         var: Tensor, weight: Optional[Tensor], training: bool, eps: float,
                         relu: bool, residual_grad: bool,
                         param_grads: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of bn_add_relu. grad_residual is empty unless residual_grad; grad_weight and
    grad_bias (fp32) are empty unless param_grads."""
    return _backward_pieces(grad_out, input, mask, mean, var, weight, training, eps, relu,
                            residual_grad, param_grads)


def backward(grad_out: Tensor, input: Tensor, mask: Tensor, mean: Tensor, var: Tensor,
             weight: Optional[Tensor], training: bool, eps: float, relu: bool,
             residual_grad: bool, param_grads: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """bn_add_relu_backward, for backward formulas: its implementation called directly in plain
    eager (fused_resnet.ops.eager) and where tracing should see the Triton pieces
    (pieces_traced), else the op itself."""
    if not torch.is_grad_enabled() and eager.cpu_step(input, grad_out, mask, mean, var, weight):
        # _backward_pieces as one C++ call
        return torch.ops.fused_resnet.bn_add_relu_step_backward(
            grad_out, input, mask, mean, var, weight, training, eps, relu, residual_grad,
            param_grads)
    direct = eager.plain_eager_backward(grad_out, input, mask, mean, var, weight) or \
        pieces_traced(input)
    run = _backward_pieces if direct else bn_add_relu_backward
    return run(grad_out, input, mask, mean, var, weight, training, eps, relu, residual_grad,
               param_grads)


def _backward_pieces(grad_out, input, mask, mean, var, weight, training, eps, relu,
                     residual_grad, param_grads):
    if training or param_grads:
        k, b, c, grad_weight, grad_bias = _run("bn_add_relu_grad_reduce", input, grad_out, mask,
                                               input, mean, var, weight, eps, relu, training)
    else:  # eval with frozen parameters: no reduction at all
        k, _ = reference.bn_centred_scale_shift(var, weight, None, eps)
        b, c = torch.zeros_like(k), torch.zeros_like(k)
    grad_input, grad_residual = _run("bn_add_relu_grad_apply", input, grad_out, mask, input,
                                     mean, k, b, c, relu, residual_grad)
    if not param_grads:
        grad_weight, grad_bias = mean.new_empty(0), mean.new_empty(0)
    return grad_input, grad_residual, grad_weight, grad_bias


@bn_add_relu_backward.register_fake
def _fake_backward(grad_out, input, mask, mean, var, weight, training, eps, relu, residual_grad,
                   param_grads):
    grad_residual = layout.empty_like_kernel(input) if residual_grad else input.new_empty(0)
    param = layout.empty_per_channel(input) if param_grads else mean.new_empty(0)
    return layout.empty_like_kernel(input), grad_residual, param, torch.empty_like(param)


# the CPU steps (csrc/cpu/training_steps.cpp) return what bn_add_relu and its backward do
def _fake_step(input, residual, weight, bias, mean, var, eps, relu, save_mask):
    return _fake_forward(input, residual, weight, bias, mean, var, True, eps, relu, save_mask)


def _fake_into_grad(grad, mask, input, mean, k, b, c, relu):
    return grad  # the gradient apply written over `grad` (the training step's own buffer)


if _extension.available():
    torch.library.register_fake("fused_resnet::bn_add_relu_step")(_fake_step)
    torch.library.register_fake("fused_resnet::bn_add_relu_step_backward")(_fake_backward)
    torch.library.register_fake("fused_resnet::bn_add_relu_grad_apply_into_grad_cpp")(
        _fake_into_grad)


def _setup_context(ctx, inputs, output):
    input, residual, weight, bias, _, _, training, eps, relu, save_mask, _, _ = inputs
    _, mask, mean, var = output
    if relu and not save_mask and any(ctx.needs_input_grad[:4]):
        raise RuntimeError("fused_resnet::bn_add_relu: called with save_mask=False on inputs "
                           "that require grad; backward needs the ReLU mask")
    ctx.save_for_backward(input, mask, mean, var, weight)
    ctx.training, ctx.eps, ctx.relu = training, eps, relu
    ctx.has_residual = residual is not None
    ctx.weight_dtype = weight.dtype if weight is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(mask, mean, var)
    # no zero tensors for the gradients of the mask (a byte per 8 elements) and statistics
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_mask, _grad_mean, _grad_var):
    if grad_out is None:  # grads are not materialised (setup_context): nothing flows back
        return (None,) * len(ctx.needs_input_grad)
    input, mask, mean, var, weight = ctx.saved_tensors
    need_input, need_residual, need_weight, need_bias = ctx.needs_input_grad[:4]
    grad_input, grad_residual, grad_weight, grad_bias = backward(
        grad_out, input, mask, mean, var, weight, ctx.training, ctx.eps, ctx.relu,
        ctx.has_residual and need_residual, need_weight or need_bias)
    return (
        grad_input if need_input else None,
        grad_residual if ctx.has_residual and need_residual else None,
        grad_weight.to(ctx.weight_dtype) if need_weight else None,
        grad_bias.to(ctx.bias_dtype) if need_bias else None,
        None, None, None, None, None, None, None, None,
    )


bn_add_relu.register_autograd(_backward, setup_context=_setup_context)
_EAGER = eager.function("BNAddReLU", _forward_pieces, _setup_context, _backward)


def pieces_traced(input: Tensor) -> bool:
    """Whether torch.compile / torch.export, tracing, should see bn_add_relu as its pieces (the
    Triton backend's are triton_ops, whose launches they trace into) rather than as one opaque
    op: on CUDA where the Triton backend runs the pieces. Elsewhere the pieces are C++ or
    reference ops, which gain nothing from being traced one by one."""
    return input.device.type == "cuda" and not eager.plain_eager(input) and \
        backend.choose(input.device, input.dtype) == "triton"


def run(input, residual, weight, bias, running_mean, running_var, training, eps, relu,
        save_mask, batch_mean, batch_var):
    """bn_add_relu(...): the op, or in plain eager mode the same computation without the
    dispatcher's Python layers (fused_resnet.ops.eager); traced as its Triton pieces where
    pieces_traced says so."""
    args = (input, residual, weight, bias, running_mean, running_var, training, eps, relu,
            save_mask, batch_mean, batch_var)
    if pieces_traced(input):
        return _EAGER.apply(*args)
    return eager.call(bn_add_relu, _EAGER, *args)
