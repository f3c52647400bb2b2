"""Model-level benchmark (pytest-benchmark twin of `fused-resnet bench`): whole torchvision
ResNets through the same providers, checked against eager float64 first
(fused_resnet.bench.check), inference and training step.

    pytest benchmarks/test_bench_models.py --benchmark-json=out.json
    python benchmarks/report.py out.json
"""

import pytest
import torch

from conftest import time_and_record
from fused_resnet.bench import check, memory, providers, suite

MODELS = ["resnet50", "resnet18"] if torch.cuda.is_available() else ["resnet18"]


def _setup(device):
    if device == "cuda":
        return dict(batch=256, image=224, dtype=torch.bfloat16)
    return dict(batch=4, image=64, dtype=torch.float32)


@pytest.mark.parametrize("mode", ["inference", "training"])
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("provider", ["eager_cl", "compiled", "fused"])
def test_model(benchmark, provider, model_name, mode, bench_device):
    cfg = _setup(bench_device)
    name = "compile" if provider == "compiled" else provider
    model = suite._model(model_name, seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(cfg["batch"], 3, cfg["image"], cfg["image"], generator=g)
    target = torch.randint(0, 1000, (cfg["batch"],), generator=g).to(bench_device)
    eager = providers.build("eager", model, bench_device, cfg["dtype"])
    small_x, small_t = x[:4].to(bench_device), target[:4]
    ref = check.reference(model, eager, small_x, small_t, mode)
    runner = providers.build(name, model, bench_device, cfg["dtype"])
    verdict = check.check(runner, ref, small_x, small_t, mode)
    assert verdict["ok"], f"{provider} disagrees with eager float64: {verdict}"
    xb = runner.prepare_input(x)
    if mode == "inference":
        def step():
            runner.inference(xb)
    else:
        def step():
            runner.train_step(xb, target)

    step()
    peak = memory.peak_bytes(step, bench_device)
    time_and_record(benchmark, step, bench_device, cfg["batch"], op="model", provider=provider,
                    mode=mode, shape=[model_name], dtype=str(cfg["dtype"]).replace("torch.", ""),
                    layout="channels_last", peak_memory_bytes=peak)
