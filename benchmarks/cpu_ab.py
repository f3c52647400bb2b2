"""Interleaved A/B timing of ResNet-50 on a CPU: eager channels_last, torch.compile (with
freezing for inference) and the fused model, in one process, round-robin over rounds so that a
noisy neighbour on a shared machine hits every provider alike; medians per provider. A
cross-check of `fused-resnet bench`'s one-pass numbers, not a replacement (no correctness
check here: the bench and the tests do that).

    python benchmarks/cpu_ab.py [--sizes 112 224] [--rounds 5] [--batch 8] > out.md
"""

import argparse
import copy
import datetime
import statistics
import time

import torch
import torchvision

import fused_resnet as fr


def _model():
    torch.manual_seed(0)
    return torchvision.models.resnet50().to(memory_format=torch.channels_last)


def _timed(fn, iters):
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _interleaved(fns: dict, rounds: int, iters: int) -> dict:
    for fn in fns.values():  # warm-up (compiles)
        fn(), fn()
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name] += _timed(fn, iters)
    return {name: statistics.median(s) for name, s in samples.items()}


def _inference(size, batch, rounds, iters):
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    eager = _model().eval()
    fused = fr.fuse_(copy.deepcopy(eager))
    frozen = torch.compile(copy.deepcopy(eager), dynamic=False, options={"freezing": True})

    def run(model):
        def call():
            with torch.no_grad():
                model(x)
        return call
    return _interleaved({"eager_cl": run(eager), "compile_freeze": run(frozen),
                         "fused": run(fused)}, rounds, iters)


def _training(size, batch, rounds, iters):
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,))
    eager = _model().train()
    fused = fr.fuse_(copy.deepcopy(eager))

    def run(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step():
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), target).backward()
            optimizer.step()
        return step
    # torch.compile without freezing: training updates the weights, which freezing would bake in
    compiled = torch.compile(copy.deepcopy(eager), dynamic=False)
    return _interleaved({"eager_cl": run(eager), "compile": run(compiled), "fused": run(fused)},
                        rounds, iters)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 224])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    print(f"# ResNet-50 fp32 on CPU, interleaved A/B ({torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {datetime.date.today()}, batch {args.batch}, "
          f"{args.rounds} rounds x {args.iters} calls, medians)\n")
    print("| mode | size | provider | ms | vs eager_cl |\n|---|---|---|---|---|")
    for size in args.sizes:
        for mode, measure in (("inference", _inference), ("training", _training)):
            medians = measure(size, args.batch, args.rounds, args.iters)
            for name, seconds in medians.items():
                print(f"| {mode} | {size} | {name} | {seconds * 1e3:.1f} | "
                      f"{medians['eager_cl'] / seconds:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
