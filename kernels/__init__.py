"""Triton kernels of fused_resnet, one op family per module. Installed as fused_resnet.kernels;
importing a module here imports triton."""

from ._interpreter import patch_scalar_index

patch_scalar_index()  # Triton 3.6's interpreter with numpy >= 2.5 (see kernels/_interpreter.py)
