"""Shared check of the BatchNorm + add + ReLU tests. The error criterion and the PyTorch oracle
are in fused_resnet.verify (also behind `fused-resnet verify`); this adds the assertions and
the running-statistics comparison with nn.BatchNorm2d."""

import torch

from fused_resnet import backend
from fused_resnet.verify import compare_step, make_activation, three_batchnorms


def check_against_pytorch(backend_name, shape, dtype, channels_last, training, *, device="cpu",
                          residual=True, relu=True, affine=True, track_running_stats=True,
                          momentum=0.1, steps=1, bn_dtype=torch.float32):
    """Fused vs PyTorch (same dtype) vs PyTorch float64, forward and backward, for `steps`
    steps; then running stats and num_batches_tracked vs nn.BatchNorm2d."""
    bn_fused, bn_torch, bn_64 = three_batchnorms(
        shape[1], device, training, bn_dtype, affine=affine,
        track_running_stats=track_running_stats, momentum=momentum)
    for step in range(steps):
        x = make_activation(shape, dtype, channels_last, device)
        r = make_activation(shape, dtype, channels_last, device) if residual else None
        g = make_activation(shape, dtype, channels_last, device)
        with backend.use(backend_name):
            results = compare_step(bn_fused, bn_torch, bn_64, x, r, g, relu)
        for c in results:
            assert c.ok, (f"step {step} {c.name}: max error {c.error:.3g} vs float64 exceeds "
                          f"{c.allowed:.3g} (PyTorch's own error in {dtype}: "
                          f"{c.pytorch_error:.3g})")
    if track_running_stats:
        assert bn_fused.running_mean.dtype == bn_dtype
        for name in ("running_mean", "running_var"):
            ours, theirs = getattr(bn_fused, name), getattr(bn_torch, name)
            if bn_dtype == torch.float32:
                # Both compute fp32 statistics of the same values; only the summation order
                # differs.
                tol = dict(rtol=1e-4, atol=1e-5)
            else:
                # fp16/bf16 buffers: we update in fp32 and round once, PyTorch's kernel rounds
                # its intermediate terms; a few units of the buffer dtype at the buffer's scale.
                eps = torch.finfo(bn_dtype).eps
                tol = dict(rtol=2 * eps, atol=2 * eps * theirs.abs().max().item())
            torch.testing.assert_close(ours, theirs, **tol, msg=lambda m: f"{name}: {m}")
        assert bn_fused.num_batches_tracked.item() == bn_torch.num_batches_tracked.item()
