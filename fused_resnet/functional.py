"""Differentiable functional API of fused_resnet."""

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fused_resnet import ops  # noqa: F401  (registers torch.ops.fused_resnet)

# float64 runs on the torch reference backend only (for gradcheck); the kernels take the rest.
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def batch_norm_add_relu(input: Tensor, residual: Optional[Tensor], running_mean: Optional[Tensor],
                        running_var: Optional[Tensor], weight: Optional[Tensor] = None,
                        bias: Optional[Tensor] = None, training: bool = False,
                        momentum: Optional[float] = 0.1, eps: float = 1e-5, relu: bool = True,
                        num_batches_tracked: Optional[Tensor] = None, *,
                        batch_mean: Optional[Tensor] = None,
                        batch_var: Optional[Tensor] = None,
                        running_stats_updates: Optional[list] = None) -> Tensor:
    """relu(F.batch_norm(input, ...) + residual) in one fused pass (forward and backward).

    Same semantics as F.batch_norm followed by the add and the ReLU: training normalises with
    the batch mean and biased variance and updates running_mean / running_var in place with
    `momentum` (unbiased variance, as nn.BatchNorm2d); eval uses the running statistics.
    `residual` may be None, `relu=False` skips the ReLU, weight/bias None is affine=False,
    running stats None is track_running_stats=False.

    num_batches_tracked: nn.BatchNorm2d's counter; incremented in training when given.
    momentum=None means a cumulative moving average, 1/num_batches_tracked, as nn.BatchNorm2d.
    batch_mean, batch_var: the batch mean and biased variance of `input` if already computed
    (conv2d_bn_stats computes them in the conv's epilogue); training only. Gradients still
    flow through the batch statistics, as in F.batch_norm.
    running_stats_updates: a list to append the running-statistics update to instead of
    applying it (a fused block applies its BNs' updates once nothing in it can raise).

    An empty batch is nn.BatchNorm2d's: an empty output whose backward gives weight and bias
    zero gradients; in training, running statistics left exactly as they are and
    num_batches_tracked incremented. Nothing is updated when anything raises.
    """
    _check_arguments(input, residual, running_mean, running_var, weight, bias, training,
                     momentum, num_batches_tracked)
    _check_batch_stats(input, batch_mean, batch_var, training)
    input, residual = _autocast_common_dtype(input, residual)
    if input.numel() == 0:
        out, mean, var = _empty_batch(input, residual, weight, bias, relu), None, None
    else:
        out, _, mean, var = ops.bn_add_relu.run(
            input, residual, weight, bias,
            None if training else running_mean, None if training else running_var,
            training, eps, relu, autograd_records(input, residual, weight, bias), batch_mean,
            batch_var)
    if training and running_mean is not None:
        _record(running_stats_update(running_mean, running_var, mean, var, input, momentum,
                                     num_batches_tracked), running_stats_updates)
    return out


def _record(update: "RunningStatsUpdate", running_stats_updates: Optional[list]) -> None:
    """Append the update for the caller to apply, or apply it now (the op's last step: nothing
    left to raise)."""
    if running_stats_updates is None:
        apply_running_stats_updates([update])
    else:
        running_stats_updates.append(update)


def sync_batch_norm_add_relu(input: Tensor, residual: Optional[Tensor],
                             running_mean: Optional[Tensor], running_var: Optional[Tensor],
                             weight: Optional[Tensor], bias: Optional[Tensor],
                             momentum: Optional[float], eps: float, relu: bool,
                             num_batches_tracked: Optional[Tensor], group, *, batch_mean: Tensor,
                             batch_var: Tensor,
                             running_stats_updates: Optional[list] = None) -> Tensor:
    """batch_norm_add_relu in training with nn.SyncBatchNorm's statistics: those of the union of
    every batch in the process group `group` (fused_resnet.ops.sync_bn_add_relu). batch_mean,
    batch_var: this process's own batch statistics of `input` (the conv epilogue's). The
    running statistics get the union's mean and unbiased variance. As nn.SyncBatchNorm, a
    process's own batch may be empty or hold one value per channel."""
    _check_arguments(input, residual, running_mean, running_var, weight, bias, True, momentum,
                     num_batches_tracked, local_batch_size=False)
    _check_batch_stats(input, batch_mean, batch_var, True)
    input, residual = _autocast_common_dtype(input, residual)
    out, mean, var, count = ops.sync_bn_add_relu.sync_bn_add_relu(
        input, residual, weight, bias, batch_mean, batch_var, eps, relu, group)
    if running_mean is not None:
        _record(RunningStatsUpdate(running_mean, running_var, num_batches_tracked, momentum, mean,
                                   var, count), running_stats_updates)
    return out


def _empty_batch(input: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                 bias: Optional[Tensor], relu: bool) -> Tensor:
    """relu(bn(input) + residual) of a batch without values, as PyTorch computes it: the kernels'
    statistics of nothing are NaN, and so would be weight's gradient (0 * rsqrt(NaN));
    F.batch_norm returns an empty output that still carries gradients (zeros for weight and
    bias). Training or not makes no difference here: there are no values to normalise."""
    out = F.batch_norm(input, None, None, weight, bias, training=True)
    if residual is not None:
        out = out + residual
    # clamp, not relu: relu keeps its output for backward, and the output of a fused stem is
    # overwritten by the inplace ReLU module that follows it (no values: the same result).
    return out.clamp(min=0) if relu else out


def _check_arguments(input, residual, running_mean, running_var, weight, bias, training,
                     momentum, num_batches_tracked, local_batch_size=True):
    """Every problem found here is raised before any kernel runs, naming the argument."""
    if not isinstance(input, Tensor):
        raise TypeError(f"batch_norm_add_relu: input must be a Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"batch_norm_add_relu: input must be 4-D (N, C, H, W), got "
                         f"{input.dim()}-D with shape {tuple(input.shape)}")
    if input.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"batch_norm_add_relu: unsupported input dtype {input.dtype}; expected "
                        f"float32, float16, bfloat16 (or float64, reference backend only)")
    channels = input.shape[1]
    if residual is not None:
        if residual.shape != input.shape:
            raise ValueError(f"batch_norm_add_relu: residual has shape {tuple(residual.shape)} "
                             f"but input has shape {tuple(input.shape)}")
        if residual.device != input.device:
            raise ValueError(f"batch_norm_add_relu: residual is on {residual.device} but input "
                             f"is on {input.device}")
        if residual.dtype != input.dtype and not _autocast_on(input):
            raise TypeError(f"batch_norm_add_relu: residual has dtype {residual.dtype} but input "
                            f"has dtype {input.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is None:
            continue
        if t.shape != (channels,):
            raise ValueError(f"batch_norm_add_relu: {name} must have shape ({channels},) for an "
                             f"input with {channels} channels, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"batch_norm_add_relu: {name} must be floating point, got {t.dtype}")
        if t.device != input.device:
            raise ValueError(f"batch_norm_add_relu: {name} is on {t.device} but input is on "
                             f"{input.device}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("batch_norm_add_relu: running_mean and running_var must be given "
                         "together (or both None)")
    if running_mean is not None and running_var.dtype != running_mean.dtype:
        raise TypeError(f"batch_norm_add_relu: running_var has dtype {running_var.dtype} but "
                        f"running_mean has dtype {running_mean.dtype} (F.batch_norm refuses "
                        f"them too)")
    if not training and running_mean is None:
        raise RuntimeError("batch_norm_add_relu: running_mean must be defined in evaluation mode")
    if training:
        if local_batch_size:  # not for a synchronised BN: the group's batch is what counts
            verify_batch_size(input)
        if momentum is None and running_mean is not None and num_batches_tracked is None:
            raise ValueError("batch_norm_add_relu: momentum=None (cumulative average) needs "
                             "num_batches_tracked")


def _check_batch_stats(input, batch_mean, batch_var, training):
    if batch_mean is None and batch_var is None:
        return
    if batch_mean is None or batch_var is None:
        raise ValueError("batch_norm_add_relu: batch_mean and batch_var must be given together")
    if not training:
        raise ValueError("batch_norm_add_relu: batch_mean/batch_var are batch statistics; "
                         "eval mode uses the running statistics")
    for name, t in (("batch_mean", batch_mean), ("batch_var", batch_var)):
        if t.shape != (input.shape[1],) or t.device != input.device:
            raise ValueError(f"batch_norm_add_relu: {name} must have shape ({input.shape[1]},) "
                             f"on {input.device}, got {tuple(t.shape)} on {t.device}")


def autograd_records(*tensors) -> bool:
    """Whether autograd will record an op on these tensors (then backward needs what the op
    keeps for it, e.g. the ReLU mask)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def verify_batch_size(input: Tensor) -> None:
    """The error F.batch_norm raises when a channel has a single value in training."""
    values_per_channel = input.numel() // input.shape[1] if input.shape[1] else 0
    if values_per_channel == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input "
                         f"size {input.size()}")


def _autocast_on(input: Tensor) -> bool:
    return torch.is_autocast_enabled(input.device.type)


def _autocast_common_dtype(input: Tensor, residual: Optional[Tensor]):
    """Under autocast, `bn(input) + residual` in PyTorch type-promotes (the add is not an
    autocast op); do the same so the fused op sees one dtype."""
    if residual is None or residual.dtype == input.dtype:
        return input, residual
    common = torch.promote_types(input.dtype, residual.dtype)
    return input.to(common), residual.to(common)


class RunningStatsUpdate(NamedTuple):
    """nn.BatchNorm2d's in-place update of one BN's running statistics for one batch, ready to
    apply. Kept apart from the forward that computes it so that a fused block applies the
    updates of all its BNs only after everything in it that can raise has run: an exception
    then leaves every buffer (and num_batches_tracked) as it was."""
    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Optional[Tensor]
    momentum: Optional[float]
    mean: Optional[Tensor]  # the batch mean and biased variance (fp32); unused when count is 0
    var: Optional[Tensor]
    count: int  # values per channel in the batch


def running_stats_update(running_mean: Tensor, running_var: Tensor, mean: Optional[Tensor],
                         var: Optional[Tensor], input: Tensor, momentum: Optional[float],
                         num_batches_tracked: Optional[Tensor]) -> RunningStatsUpdate:
    """The update for a training batch `input` whose batch mean and biased variance are
    mean, var."""
    count = input.numel() // input.shape[1] if input.shape[1] else 0
    return RunningStatsUpdate(running_mean, running_var, num_batches_tracked, momentum, mean,
                              var, count)


def apply_running_stats_updates(updates) -> None:
    """Apply RunningStatsUpdates in order: in-place tensor ops only (no host sync; traceable
    and CUDA-graph capturable)."""
    with torch.no_grad():
        for update in updates:
            _apply(update)


def with_running_stats_updates(compute: Callable[..., Tensor], *args, **kwargs) -> Tensor:
    """compute(*args, updates=list, **kwargs), then the running-statistics updates it put in
    the list: applied only once all of compute has run, so that an exception anywhere in it
    leaves every BN's buffers as they were."""
    updates: list = []
    out = compute(*args, updates=updates, **kwargs)
    apply_running_stats_updates(updates)
    return out


def _apply(update: RunningStatsUpdate) -> None:
    """nn.BatchNorm2d's update, in fp32, stored in the buffers' own dtype. An empty batch is
    counted (nn.BatchNorm2d increments num_batches_tracked before F.batch_norm) but leaves the
    statistics as they are (F.batch_norm returns before updating them)."""
    if update.num_batches_tracked is not None:
        update.num_batches_tracked.add_(1)
    if update.count == 0:
        return
    if update.momentum is None:  # cumulative average
        factor = 1.0 / update.num_batches_tracked  # a tensor: no host sync, traceable
    else:
        factor = update.momentum
    n = update.count
    _moving_average_(update.running_mean, update.mean, factor)
    _moving_average_(update.running_var, update.var * (n / (n - 1)), factor)  # unbiased


def _moving_average_(buffer: Tensor, value: Tensor, factor) -> None:
    """buffer = (1 - factor) * buffer + factor * value, computed in the wider of the two dtypes
    (fp32 statistics) and stored in the buffer's dtype."""
    if buffer.dtype == value.dtype:  # one kernel
        buffer.lerp_(value, factor)
        return
    acc = torch.promote_types(buffer.dtype, value.dtype)
    buffer.copy_(buffer.to(acc) * (1 - factor) + value * factor)
