"""relu(bn(z) + residual) with the batch statistics of every process in a group: the fused step
of nn.SyncBatchNorm in training.

    sync_bn_add_relu(input, residual?, weight?, bias?, local_mean, local_var, eps, relu, group)
        -> (out, mean, var, count)

`local_mean` / `local_var` are this process's batch mean and biased variance of `input` (the
conv epilogue computed them, fp32). nn.SyncBatchNorm's semantics:

- forward: every process's (mean, var, count) is all-gathered; processes with an empty batch
  are left out; the union's mean and biased variance (Chan's combination, in float64) normalise
  the local batch. `count` is the union's size, for the running-statistics update (unbiased
  variance over the whole group), which the caller applies.
- backward: the two per-channel sums of the BN backward, sum(dz) and sum(dz * (z - mean)), are
  all-reduced over the group before the input gradient is formed from them (every process
  calls this all-reduce, an empty batch with zeros); the weight and bias gradients stay local,
  as nn.SyncBatchNorm's (DDP averages them).

The collectives go through torch.distributed (NCCL, gloo alike), so this is an
autograd.Function rather than a custom op: torch.compile breaks the graph around it, as it does
around nn.SyncBatchNorm's own collectives. The element-wise work runs on the bn_add_relu kernels
(forward apply with the ReLU mask, backward reduce and apply): the same fused passes as the
single-process op, with the statistics and the sums exchanged in between.
"""

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fused_resnet import reference

ops = torch.ops.fused_resnet


def gather_statistics(mean: Tensor, var: Tensor, count: int, group) -> tuple[Tensor, Tensor,
                                                                                 int]:
    """(mean, biased variance, count) of the union of every process's batch, from each
    process's own: one all_gather of [mean, var, count], combined in float64, in `mean`'s
    dtype. A process with count 0 (its statistics NaN) contributes nothing."""
    channels = mean.numel()
    local = torch.cat([mean.double(), var.double(), mean.new_full((1,), count,
                                                                   dtype=torch.float64)])
    if count == 0:
        local[:2 * channels] = 0.0
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered)
    means, variances, counts = table[:, :channels], table[:, channels:-1], table[:, -1:]
    total = counts.sum()
    union_mean = (counts * means).sum(0) / total
    union_var = (counts * (variances + (means - union_mean).square())).sum(0) / total
    return union_mean.to(mean.dtype), union_var.to(var.dtype), int(total.item())


class _SyncBNAddReLU(torch.autograd.Function):
    """Normalises with the union's statistics (already gathered); backward all-reduces."""

    @staticmethod
    def forward(ctx, input, residual, weight, bias, mean, var, count, total, eps, relu, group):
        if count:
            scale, shift = reference.bn_centred_scale_shift(var, weight, bias, eps,
                                                               copy_bias=False)
            out, mask = ops.bn_add_relu_apply(input, residual, scale, shift, relu, True, mean)
        else:  # nothing to normalise here; the other processes' batches were gathered all the same
            out, mask = torch.empty_like(input), input.new_empty(0, dtype=torch.uint8)
        ctx.save_for_backward(input, mask, mean, var, weight)
        ctx.eps, ctx.relu, ctx.group, ctx.count, ctx.total = eps, relu, group, count, total
        ctx.has_residual = residual is not None
        ctx.param_dtypes = tuple(p.dtype if p is not None else None for p in (weight, bias))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        input, mask, mean, var, weight = ctx.saved_tensors
        sum_dz, sum_dz_xhat = _local_sums(ctx, grad_out, input, mask, mean, var, weight)
        grad_input = grad_residual = None
        if ctx.needs_input_grad[0]:  # as nn.SyncBatchNorm: the all-reduce only for the input's
            # xhat = (input - mean) * invstd with the group's statistics, the same on every
            # process: summing sum(dz * xhat) over the group sums sum(dz * (input - mean)) too
            sums = torch.cat([sum_dz, sum_dz_xhat])
            dist.all_reduce(sums, group=ctx.group)
            channels = sum_dz.numel()
            k, b, c, _, _ = reference.bn_backward_coefficients(
                sums[:channels], sums[channels:] * torch.sqrt(var + ctx.eps), var, weight,
                ctx.eps, ctx.total, True)
            grad_input, grad_residual = _input_gradients(ctx, grad_out, input, mask, mean,
                                                         k, b, c)
        elif ctx.needs_input_grad[1]:  # dz alone: the coefficients do not matter
            k, b, c, _, _ = reference.bn_backward_coefficients(
                sum_dz, sum_dz_xhat, var, weight, ctx.eps, ctx.total, False)
            _, grad_residual = _input_gradients(ctx, grad_out, input, mask, mean, k, b, c)
        # weight and bias gradients stay this process's own, as nn.SyncBatchNorm's
        grad_weight = sum_dz_xhat.to(ctx.param_dtypes[0]) if ctx.needs_input_grad[2] else None
        grad_bias = sum_dz.to(ctx.param_dtypes[1]) if ctx.needs_input_grad[3] else None
        return (grad_input, grad_residual if ctx.has_residual else None, grad_weight, grad_bias,
                None, None, None, None, None, None, None)


def _local_sums(ctx, grad_out, input, mask, mean, var, weight):
    """This process's sum(dz) and sum(dz * xhat) per channel, dz the gradient below the ReLU
    (zeros for an empty batch): the bias and weight gradients the reduction kernel returns."""
    if ctx.count == 0:
        return torch.zeros_like(mean), torch.zeros_like(mean)
    _, _, _, grad_weight, grad_bias = ops.bn_add_relu_grad_reduce(
        grad_out, mask, input, mean, var, weight, ctx.eps, ctx.relu, False)
    return grad_bias, grad_weight


def _input_gradients(ctx, grad_out, input, mask, mean, k, b, c):
    if ctx.count == 0:
        return torch.zeros_like(input), torch.zeros_like(input)
    grad_input, grad_residual = ops.bn_add_relu_grad_apply(grad_out, mask, input, mean, k, b, c,
                                                           ctx.relu, ctx.has_residual)
    return grad_input, grad_residual if ctx.has_residual else None


def sync_bn_add_relu(input: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                     bias: Optional[Tensor], local_mean: Tensor, local_var: Tensor, eps: float,
                     relu: bool, group) -> tuple[Tensor, Tensor, Tensor, int]:
    """(out, union mean, union biased variance, union count): see the module docstring. The
    statistics' own gradient is the backward's business (the all-reduced sums), so they are
    gathered outside autograd."""
    count = input.numel() // input.shape[1] if input.shape[1] else 0
    with torch.no_grad():
        mean, var, total = gather_statistics(local_mean, local_var, count, group)
    out = _SyncBNAddReLU.apply(input, residual, weight, bias, mean, var, count, total, eps, relu,
                               group)
    return out, mean, var, total
