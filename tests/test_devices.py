"""Kernels run on their tensors' own CUDA device, not on whichever device is current (Triton
launches on the current one). Every Triton launch the dispatcher can make is checked to run
under devices.on_device by the static report (tests/test_aot_report.py, gate "device guard");
here the guard itself, and on a machine with two GPUs, the ops on the second one."""

import pytest
import torch
import torch.nn.functional as F

from fused_resnet import backend, devices
from fused_resnet.ops import conv as conv_ops

ops = torch.ops.fused_resnet


def test_guard_nests_and_reports():
    assert not devices.guarded()
    x = torch.ones(1)
    with devices.on_device(x):
        assert devices.guarded()
        with devices.on_device(x):
            assert devices.guarded()
        assert devices.guarded()
    assert not devices.guarded()
    with pytest.raises(ValueError):
        with devices.on_device(x):
            raise ValueError("the depth is restored on errors too")
    assert not devices.guarded()


def test_launcher_decorator_guards_the_call():
    seen = []

    @devices.launches_on_input_device
    def launcher(scale, x):
        seen.append(devices.guarded())
        return x * scale

    assert torch.equal(launcher(2.0, x=torch.ones(2)), torch.full((2,), 2.0))
    assert seen == [True]


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("path", ["triton", "library"])
def test_ops_on_the_second_gpu(path):
    """Tensors on cuda:1 while cuda:0 is current: same results as on cuda:0."""
    torch.cuda.set_device(0)
    x = torch.randn(4, 64, 14, 14, dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, dtype=torch.bfloat16) / 24
    bias, residual = torch.randn(64), torch.randn(4, 64, 14, 14, dtype=torch.bfloat16)
    results = []
    for device in ("cuda:0", "cuda:1"):
        args = [t.to(device) for t in (x, w, bias, residual)]
        with backend.use("triton"), conv_ops.use_path(path):
            out = ops.conv2d_epilogue(args[0], args[1], [1, 1], [1, 1], [1, 1], 1, None,
                                      args[2], args[3], True)
            z, mean, var = ops.conv2d_bn_stats(args[0], args[1], [1, 1], [1, 1], [1, 1], 1)
        assert out.device == torch.device(device) and z.device == torch.device(device)
        results.append([t.float().cpu() for t in (out, z, mean, var)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    ref = F.conv2d(x.cuda(1).float(), w.cuda(1).float(), None, 1, 1)
    torch.testing.assert_close(results[1][1], ref.cpu(), rtol=2e-2, atol=2e-2)
