"""Drop-in fused modules for torchvision and timm ResNet blocks (see fused_resnet.swap for
fuse_)."""

from fused_resnet.modules.blocks import (  # noqa: F401
    FusedBasicBlock, FusedBottleneck, FusedPlainBlock, FusedTimmBasicBlock, FusedTimmBottleneck)
from fused_resnet.modules.conv_bn_act import FusedConvBNAct, conv_bn_act  # noqa: F401
from fused_resnet.modules.stem import FusedStem, StemBatchNorm, StemFrozenBatchNorm  # noqa: F401
