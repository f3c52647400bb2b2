"""Block-level benchmark: the first (projection shortcut) and second (identity) bottleneck of
each ResNet-50 stage, eager PyTorch vs torch.compile vs the fused block, eval forward and
training forward + backward.

    pytest benchmarks/test_bench_blocks.py --benchmark-json=out.json
    python benchmarks/report.py out.json

Each provider's output (and in training its input gradient) is checked against eager before
it is timed. Reported: time, images/s, ratio to eager.
"""

import copy

import pytest
import torch
from torchvision.models import resnet50

import fused_resnet as fr
from conftest import gpu as _gpu, time_and_record, tiny, with_triton
from fused_resnet import backend
from fused_resnet.verify import normwise_error

# (stage, block index, input H=W on a GPU)
BLOCKS = [("layer1", 0, 56), ("layer1", 1, 56), ("layer2", 0, 56), ("layer2", 1, 28),
          ("layer3", 0, 28), ("layer3", 1, 14), ("layer4", 0, 14), ("layer4", 1, 7)]
CPU_BLOCKS = [("layer1", 1, 14), ("layer3", 0, 7)]
TINY_BLOCKS = [("layer1", 1, 4)]  # FUSED_RESNET_BENCH_TINY=1


def _block(stage, index, device):
    torch.manual_seed(0)
    block = getattr(resnet50(), stage)[index].to(device).to(memory_format=torch.channels_last)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.running_var.uniform_(0.5, 1.5)
    return block


def _module(provider, block):
    if provider == "eager":
        return block
    if provider == "compiled":
        return torch.compile(block)
    return fr.fuse_(torch.nn.Sequential(copy.deepcopy(block)))


@pytest.mark.parametrize("mode", ["eval_fwd", "train_fwdbwd"])
@pytest.mark.parametrize("cfg", TINY_BLOCKS if tiny() else BLOCKS if _gpu() else CPU_BLOCKS,
                         ids=lambda c: f"{c[0]}.{c[1]}")
@pytest.mark.parametrize("provider", with_triton(["eager", "compiled", "fused"]))
def test_block(benchmark, provider, cfg, mode, bench_device):
    stage, index, hw = cfg
    n = 2 if tiny() else 256 if _gpu() else 4
    block = _block(stage, index, bench_device)
    c_in = block.conv1.in_channels
    x = torch.randn(n, c_in, hw, hw, device=bench_device).contiguous(
        memory_format=torch.channels_last)
    dtype = torch.bfloat16 if _gpu() else torch.float32
    module = _module(provider, copy.deepcopy(block))
    forced = provider.split("-", 1)[1] if "-" in provider else "auto"
    training = mode == "train_fwdbwd"
    module.train(training), block.train(training)
    xg = x.clone().requires_grad_(training)

    def run(model):
        xg.grad = None
        with backend.use(forced), torch.autocast(bench_device, dtype=dtype, enabled=_gpu()), \
                torch.set_grad_enabled(training):
            out = model(xg)
        if training:
            out.float().square().mean().backward()
            return out, xg.grad
        return out, None

    out, grad = run(module)
    want, want_grad = run(copy.deepcopy(block))
    tol = 5e-2 if _gpu() else 1e-3
    torch.testing.assert_close(out.float(), want.float(), rtol=tol, atol=tol)
    if training:
        err = normwise_error(grad, want_grad)
        assert err < (5e-2 if _gpu() else 1e-3), f"{provider} input gradient off by {err:.1e}"

    time_and_record(benchmark, lambda: run(module), bench_device, n, op="resnet50 block",
                    provider=provider, mode=mode, shape=[f"{stage}.{index} {n}x{c_in}x{hw}x{hw}"],
                    dtype=str(dtype).replace("torch.", ""), layout="channels_last")
