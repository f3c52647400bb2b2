"""conv -> BatchNorm (-> + residual) (-> ReLU) with a module pair's own parameters and buffers,
through the fused ops:

- training (or BN without running stats): conv2d_bn_stats (BN statistics in the conv
  epilogue) then batch_norm_add_relu with those statistics; running stats and
  num_batches_tracked updated exactly as nn.BatchNorm2d.
- eval: BN folded into the conv weights (fp32 math), conv2d_epilogue with the shift, the
  residual and the ReLU in the epilogue. Folded weights are cached and recomputed when any
  parameter or buffer they come from changes (optimizer step, load_state_dict, .to()).
"""

from typing import Optional

import torch
from torch import Tensor, nn

from fused_resnet import fold, functional

ops = torch.ops.fused_resnet


def _conv_args(conv: nn.Conv2d):
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        return None
    return list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups


def _autocast(x: Tensor, weight: Tensor):
    """What autocast does to a conv's operands (a custom op is invisible to autocast)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return x.to(dtype), weight.to(dtype)
    return x, weight


def _fold_key(conv: nn.Conv2d, bn: nn.BatchNorm2d):
    tensors = [conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var]
    return tuple((t._version, t.data_ptr(), t.dtype, t.device) if t is not None else None
                 for t in tensors) + (bn.eps,)


def folded_weights(conv: nn.Conv2d, bn: nn.BatchNorm2d, cache: Optional[dict]):
    """(weight * scale, shift) of conv followed by eval-mode bn. Cached in `cache` (keyed by the
    versions of every tensor involved) unless autograd must see the folding (trainable
    parameters under grad mode) or torch.compile is tracing."""
    differentiable = torch.is_grad_enabled() and any(
        p is not None and p.requires_grad for p in (conv.weight, conv.bias, bn.weight, bn.bias))
    if differentiable or cache is None or torch.compiler.is_compiling():
        return fold.fold_conv_bn(conv.weight, conv.bias, *fold.bn_eval_scale_shift(bn))
    key = _fold_key(conv, bn)
    if cache.get("key") != key:
        with torch.no_grad():
            cache["value"] = fold.fold_conv_bn(conv.weight, conv.bias,
                                               *fold.bn_eval_scale_shift(bn))
        cache["key"] = key
    return cache["value"]


def conv_bn_act(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Tensor, residual: Optional[Tensor] = None,
                relu: bool = True, cache: Optional[dict] = None) -> Tensor:
    """relu(bn(conv(x)) + residual) (ReLU and residual optional) with conv's and bn's own
    parameters and buffers, nn.BatchNorm2d semantics in train and eval."""
    args = _conv_args(conv)
    training = bn.training or bn.running_mean is None
    if args is None:  # string or non-zero padding modes: plain conv, fused BN epilogue
        return functional.batch_norm_add_relu(
            conv(x), residual, bn.running_mean, bn.running_var, bn.weight, bn.bias,
            training=training, momentum=bn.momentum, eps=bn.eps, relu=relu,
            num_batches_tracked=bn.num_batches_tracked)
    stride, padding, dilation, groups = args
    if training:
        x, weight = _autocast(x, conv.weight)
        z, mean, var = ops.conv2d_bn_stats(x, weight, stride, padding, dilation, groups)
        if conv.bias is not None:  # a conv bias shifts the batch mean, not the variance
            z = z + conv.bias.to(z.dtype).view(1, -1, 1, 1)
            mean = mean + conv.bias.float()
        if residual is not None and residual.dtype != z.dtype:
            residual = residual.to(z.dtype)
        return functional.batch_norm_add_relu(
            z, residual, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=True,
            momentum=bn.momentum, eps=bn.eps, relu=relu,
            num_batches_tracked=bn.num_batches_tracked, batch_mean=mean, batch_var=var)
    weight, shift = folded_weights(conv, bn, cache)
    x, weight = _autocast(x, weight)
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    if residual is not None and residual.dtype != x.dtype:
        residual = residual.to(x.dtype)
    return ops.conv2d_epilogue(x, weight, stride, padding, dilation, groups, None, shift,
                               residual, relu)


class FusedConvBNAct(nn.Module):
    """conv -> bn (-> ReLU) as one fused step; holds the given modules under the names conv and
    bn (their parameters are shared, not copied)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool = True):
        super().__init__()
        self.conv, self.bn, self.relu = conv, bn, relu
        self._fold_cache: dict = {}

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return conv_bn_act(self.conv, self.bn, x, residual, self.relu, self._fold_cache)
