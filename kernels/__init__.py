"""Triton kernels of fused_resnet, one op family per module. Installed as fused_resnet.kernels;
importing a module here imports triton."""
