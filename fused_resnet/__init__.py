"""fused_resnet: fused residual-block kernels for PyTorch ResNets."""

from fused_resnet import functional, ops  # noqa: F401  (ops registers torch.ops.fused_resnet)
from fused_resnet._info import info, __version__
from fused_resnet import models  # noqa: F401
from fused_resnet.modules import FusedBasicBlock, FusedBottleneck, FusedConvBNAct
from fused_resnet.swap import fuse_, unfuse_

__all__ = ["functional", "info", "fuse_", "unfuse_", "models", "FusedBasicBlock",
           "FusedBottleneck",
           "FusedConvBNAct", "__version__"]
