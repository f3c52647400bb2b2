"""BatchNorm folding for inference: conv(x, W) followed by eval-mode BN equals
conv(x, W * scale) + shift, per output channel. Done in fp32 (fp64 for an fp64 model) whatever
the model dtype, then cast to the weight's dtype."""

from typing import Optional

import torch
from torch import Tensor

from fused_resnet import reference


def bn_eval_scale_shift(bn: torch.nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """(scale, shift) of an eval-mode BatchNorm2d as y = x*scale + shift, fp32."""
    if bn.running_mean is None:
        raise ValueError("fused_resnet.fold: a BatchNorm without running statistics "
                         "(track_running_stats=False) normalises with batch statistics even "
                         "in eval mode and cannot be folded")
    acc = _acc(bn.running_mean)
    return reference.bn_scale_shift(bn.running_mean.to(acc), bn.running_var.to(acc), bn.weight,
                                    bn.bias, bn.eps)


def fold_conv_bn(weight: Tensor, conv_bias: Optional[Tensor], scale: Tensor,
                 shift: Tensor) -> tuple[Tensor, Tensor]:
    """Folded (weight, bias): weight * scale per output channel (in the weight's dtype, computed
    in fp32) and shift + conv_bias * scale (fp32)."""
    acc = _acc(weight)
    folded = (weight.to(acc) * scale.to(acc).view(-1, 1, 1, 1)).to(weight.dtype)
    bias = shift if conv_bias is None else shift + conv_bias.to(acc) * scale
    return folded, bias


def _acc(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)
