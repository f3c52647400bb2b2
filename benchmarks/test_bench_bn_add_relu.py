"""Benchmark of the fused BatchNorm + add + ReLU op against PyTorch eager and torch.compile.

    pytest benchmarks/test_bench_bn_add_relu.py --benchmark-json=out.json
    python benchmarks/report.py out.json

Providers: eager (F.batch_norm + add + relu), compiled (torch.compile of the same), fused (the
auto backend) and each fused backend forced where it runs natively (cpp; triton on CUDA).
Modes: eval_fwd, train_fwd, train_fwdbwd. Every provider's output is checked against eager
before it is timed. GB/s = bytes the fused algorithm must move / time (the same byte count for
every provider, so the ratio between providers is the ratio of times).
"""

import functools

import pytest
import torch
import torch.nn.functional as F

import fused_resnet as fr
from conftest import tiny
from fused_resnet import backend
from fused_resnet.bench.environment import environment

GPU_SHAPES = [(256, 256, 56, 56), (256, 512, 28, 28), (256, 1024, 14, 14), (256, 2048, 7, 7)]
CPU_SHAPES = [(8, 64, 28, 28), (8, 256, 14, 14), (8, 512, 7, 7)]
TINY_SHAPES = [(2, 16, 4, 4)]  # FUSED_RESNET_BENCH_TINY=1
MODES = ["eval_fwd", "train_fwd", "train_fwdbwd"]


def _providers():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    names = ["eager", "compiled", "fused"]
    names += [f"fused-{b}" for b in ("cpp", "triton")
              if backend.why_not(b, device) is None and not (b == "triton" and device == "cpu")]
    return names


def _shapes():
    if tiny():
        return TINY_SHAPES
    return GPU_SHAPES if torch.cuda.is_available() else CPU_SHAPES


def model_bytes(shape, dtype, mode) -> int:
    """Minimum traffic of the fused algorithm. eval: read x, r, write out. train forward:
    read x twice (stats, apply), r, write out and a 1-bit mask. backward: read grad, x and mask
    twice (reduce, apply), write grad_input and grad_residual."""
    n = torch.Size(shape).numel()
    s = torch.tensor([], dtype=dtype).element_size()
    mask = (n + 7) // 8
    if mode == "eval_fwd":
        return 3 * n * s
    fwd = 4 * n * s + mask
    if mode == "train_fwd":
        return fwd
    return fwd + 6 * n * s + 2 * mask


def eager_bn_add_relu(x, r, rm, rv, w, b, training):
    return torch.relu(F.batch_norm(x, rm, rv, w, b, training=training) + r)


def fused_bn_add_relu(x, r, rm, rv, w, b, training):
    return fr.functional.batch_norm_add_relu(x, r, rm, rv, w, b, training=training)


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(eager_bn_add_relu)


def _make_call(provider):
    if provider == "eager":
        return eager_bn_add_relu
    if provider == "compiled":
        return _compiled()
    forced = provider.split("-", 1)[1] if "-" in provider else "auto"

    def call(*args):
        with backend.use(forced):
            return fused_bn_add_relu(*args)
    return call


def _inputs(shape, dtype, device, requires_grad):
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last).requires_grad_(requires_grad)
    r = torch.randn_like(x).requires_grad_(requires_grad)
    c = shape[1]
    w = torch.ones(c, device=device, requires_grad=requires_grad)
    b = torch.zeros(c, device=device, requires_grad=requires_grad)
    return x, r, torch.zeros(c, device=device), torch.ones(c, device=device), w, b


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", _shapes(), ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", _providers())
def test_bn_add_relu(benchmark, provider, shape, mode, bench_device, copy_bandwidth_gbps):
    dtype = torch.bfloat16 if bench_device == "cuda" else torch.float32
    training = mode != "eval_fwd"
    backward = mode == "train_fwdbwd"
    args = _inputs(shape, dtype, bench_device, backward)
    call = _make_call(provider)
    grad = torch.randn_like(args[0])

    # Correctness first: a provider that disagrees with eager is reported, not timed.
    expected = eager_bn_add_relu(*[a.detach() for a in args[:2]], args[2].clone(),
                                 args[3].clone(), *[a.detach() for a in args[4:]], training)
    got = call(*[a.detach() for a in args[:2]], args[2].clone(), args[3].clone(),
               *[a.detach() for a in args[4:]], training)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol,
                               msg=f"{provider} disagrees with eager")

    sync = torch.cuda.synchronize if bench_device == "cuda" else (lambda: None)

    def step():
        if backward:
            out = call(*args, training)
            out.backward(grad)
        elif training:
            call(*args, training)
        else:
            with torch.no_grad():
                call(*args, training)
        sync()

    for _ in range(3):  # warm-up: compilation, autotuning, allocator
        step()
    rounds = 30
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=2)
    if benchmark.stats is None:  # --benchmark-disable: ran once as a smoke test
        return
    nbytes = model_bytes(shape, dtype, mode)
    gbps = nbytes / benchmark.stats.stats.median / 1e9
    benchmark.extra_info.update(environment(bench_device))
    benchmark.extra_info.update(
        op="bn_add_relu", provider=provider, mode=mode, shape=list(shape),
        dtype=str(dtype).replace("torch.", ""), layout="channels_last", model_bytes=nbytes,
        gbps=gbps, copy_bandwidth_gbps=copy_bandwidth_gbps,
        fraction_of_copy_bandwidth=(gbps / copy_bandwidth_gbps) if copy_bandwidth_gbps else None)
