"""torch.library custom ops of fused_resnet, one op family per module. Importing this package
registers them all under torch.ops.fused_resnet."""

from fused_resnet.ops import bn_add_relu, bn_relu_conv, conv, sync_bn_add_relu  # noqa: F401
