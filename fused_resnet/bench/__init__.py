"""The benchmark suite behind `fused-resnet bench` (see suite.py)."""
