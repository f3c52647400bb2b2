"""FusedBasicBlock and FusedBottleneck: torchvision's residual blocks with the same submodules
(shared, not copied: same parameters, buffers and state_dict keys), computed through the fused
ops. `from_block` builds one from a torchvision block; `to_block` gives the original block
back."""

from typing import Optional

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv

from fused_resnet.models import PlainBlock
from fused_resnet.modules.conv_bn_act import conv_bn_act, folded_weights

ops = torch.ops.fused_resnet


def _standard_downsample(downsample: Optional[nn.Module]):
    """(conv, bn) if downsample is torchvision's Sequential(1x1 conv, BatchNorm2d), else None."""
    if isinstance(downsample, nn.Sequential) and len(downsample) == 2 \
            and isinstance(downsample[0], nn.Conv2d) and isinstance(downsample[1], nn.BatchNorm2d):
        return downsample[0], downsample[1]
    return None


class _FusedBlock(nn.Module):
    """Shared machinery: keeps the original block (unregistered, so the state_dict has no
    duplicate keys) and registers its submodules under their own names."""

    block_type: type = nn.Module
    submodules: tuple = ()

    def __init__(self, block: nn.Module):
        super().__init__()
        if not isinstance(block, self.block_type):
            raise TypeError(f"{type(self).__name__}.from_block expects a "
                            f"{self.block_type.__name__}, got {type(block).__name__}")
        self.__dict__["_original"] = block
        for name in self.submodules + ("downsample",):
            setattr(self, name, getattr(block, name, None))
        self.stride = block.stride
        self.train(block.training)
        self._caches = {name: {} for name in ("1", "2", "3", "downsample")}

    @classmethod
    def from_block(cls, block: nn.Module) -> "_FusedBlock":
        return cls(block)

    def to_block(self) -> nn.Module:
        """The original torchvision block, with this module's (shared) submodules and mode."""
        block = self._original
        for name in self.submodules + ("downsample",):
            if hasattr(block, name):
                setattr(block, name, getattr(self, name))
        return block.train(self.training)

    def _identity(self, x: Tensor) -> Tensor:
        if self.downsample is None:
            return x
        pair = _standard_downsample(self.downsample)
        if pair is None:
            return self.downsample(x)
        return conv_bn_act(pair[0], pair[1], x, relu=False, cache=self._caches["downsample"])


class FusedBasicBlock(_FusedBlock):
    """torchvision BasicBlock: relu(bn2(conv2(relu(bn1(conv1(x))))) + identity)."""

    block_type = tv.BasicBlock
    submodules = ("conv1", "bn1", "relu", "conv2", "bn2")

    def forward(self, x: Tensor) -> Tensor:
        identity = self._identity(x)
        out = conv_bn_act(self.conv1, self.bn1, x, cache=self._caches["1"])
        return conv_bn_act(self.conv2, self.bn2, out, residual=identity, cache=self._caches["2"])


class FusedPlainBlock(_FusedBlock):
    """fused_resnet.models.PlainBlock: the BasicBlock without its shortcut."""

    block_type = PlainBlock
    submodules = ("conv1", "bn1", "relu", "conv2", "bn2")

    def forward(self, x: Tensor) -> Tensor:
        out = conv_bn_act(self.conv1, self.bn1, x, cache=self._caches["1"])
        return conv_bn_act(self.conv2, self.bn2, out, cache=self._caches["2"])


class FusedBottleneck(_FusedBlock):
    """torchvision Bottleneck (ResNet-50/101/152, wide, ResNeXt): 1x1 -> 3x3 -> 1x1 + identity.
    In eval mode a projection shortcut (1x1 conv + BN) is fused with conv3 into one GEMM."""

    block_type = tv.Bottleneck
    submodules = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu")

    def forward(self, x: Tensor) -> Tensor:
        out = conv_bn_act(self.conv1, self.bn1, x, cache=self._caches["1"])
        out = conv_bn_act(self.conv2, self.bn2, out, cache=self._caches["2"])
        if self._can_fuse_projection(out, x):
            return self._conv3_with_projection(out, x)
        identity = self._identity(x)
        return conv_bn_act(self.conv3, self.bn3, out, residual=identity, cache=self._caches["3"])

    def _can_fuse_projection(self, out: Tensor, x: Tensor) -> bool:
        pair = _standard_downsample(self.downsample)
        if pair is None or self.bn3.training or pair[1].training:
            return False
        conv_d, conv3 = pair[0], self.conv3
        return (conv3.kernel_size == (1, 1) and conv3.stride == (1, 1) and conv3.groups == 1
                and conv3.bias is None and conv_d.kernel_size == (1, 1) and conv_d.groups == 1
                and conv_d.bias is None and conv_d.stride[0] == conv_d.stride[1]
                and conv_d.padding == (0, 0) and self.bn3.running_mean is not None
                and pair[1].running_mean is not None
                and not torch.is_autocast_enabled(out.device.type)
                and not self._needs_grad(out, x, conv_d, pair[1]))

    def _needs_grad(self, out, x, conv_d, bn_d) -> bool:
        """The one-GEMM projection op is inference-only (no autograd formula)."""
        if not torch.is_grad_enabled():
            return False
        tensors = [out, x, self.conv3.weight, self.bn3.weight, self.bn3.bias, conv_d.weight,
                   bn_d.weight, bn_d.bias]
        return any(t is not None and t.requires_grad for t in tensors)

    def _conv3_with_projection(self, out: Tensor, x: Tensor) -> Tensor:
        conv_d, bn_d = _standard_downsample(self.downsample)
        w3, b3 = folded_weights(self.conv3, self.bn3, self._caches["3"])
        wd, bd = folded_weights(conv_d, bn_d, self._caches["downsample"])
        return ops.conv2d_dual_epilogue(out, w3.to(out.dtype), [1, 1], [0, 0], x.to(out.dtype),
                                        wd.to(out.dtype), conv_d.stride[0], b3 + bd, True)
