"""fused_resnet: fused residual-block kernels for PyTorch ResNets."""

from fused_resnet import functional, ops  # noqa: F401  (ops registers torch.ops.fused_resnet)
from fused_resnet._info import info, __version__

__all__ = ["functional", "info", "__version__"]
