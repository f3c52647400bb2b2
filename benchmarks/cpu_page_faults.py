"""Page faults and time per ResNet-50 training step on a CPU, eager channels_last and fused:
each model alone in a process of its own (what a user runs), and both interleaved round-robin
in one process (what `fused-resnet bench` does), each with glibc as installed and with glibc
told to keep freed memory (MALLOC_TRIM_THRESHOLD_ huge, MALLOC_MMAP_THRESHOLD_ 32 MiB).

A page fault is the first touch of a fresh 4 KiB page, which the kernel zeroes. glibc hands
large freed blocks back to the kernel (munmap, or trimming the heap's top once a step's
backward has freed most of its memory), so every step faults its activations and gradients in
again; how many depends on what else the process allocated before, so two models in one
process change each other's counts.

    python benchmarks/cpu_page_faults.py --image-size 224 --rounds 7 > faults.md
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

KEEP_FREED = {"MALLOC_TRIM_THRESHOLD_": str(10**11), "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}
# setting -> (environment, runs: the providers of each process)
ALONE, TOGETHER = [["eager_cl"], ["fused"]], [["eager_cl", "fused"]]
SETTINGS = {
    "alone, glibc as installed": ({}, ALONE),
    "interleaved, glibc as installed": ({}, TOGETHER),
    "alone, glibc keeps freed memory": (KEEP_FREED, ALONE),
    "interleaved, glibc keeps freed memory": (KEEP_FREED, TOGETHER),
}


def measure(image_size: int, batch: int, rounds: int, providers: list) -> dict:
    """{provider: [(ms, faults, sys_s), ...]}: one training step per provider per round (the
    bench's providers and training step, fused_resnet.bench.providers)."""
    import torch
    import torchvision

    from fused_resnet.bench import providers as bench_providers

    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    runners = {name: bench_providers.build(name, model, "cpu", torch.float32)
               for name in providers}
    x = torch.randn(batch, 3, image_size, image_size)
    inputs = {name: runner.prepare_input(x) for name, runner in runners.items()}
    target = torch.randint(0, 1000, (batch,))
    for name, runner in runners.items():  # warm-up: two steps each
        runner.train_step(inputs[name], target)
        runner.train_step(inputs[name], target)
    samples = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            runner.train_step(inputs[name], target)
            seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
            samples[name].append((1e3 * seconds, after.ru_minflt - before.ru_minflt,
                                  after.ru_stime - before.ru_stime))
    return samples


def summary_rows(setting: str, samples: dict) -> list:
    rows = []
    eager_ms = statistics.median(ms for ms, _, _ in samples["eager_cl"])
    for name, values in samples.items():
        ms = [v[0] for v in values]
        faults = [v[1] for v in values]
        sys_s = [v[2] for v in values]
        rows.append(f"| {setting} | {name} | {statistics.median(ms):.0f} ({min(ms):.0f}-"
                    f"{max(ms):.0f}) | {eager_ms / statistics.median(ms):.2f}x | "
                    f"{statistics.median(faults):.0f} ({min(faults)}-{max(faults)}) | "
                    f"{statistics.median(faults) * 4 / 1024:.0f} | {statistics.median(sys_s):.2f} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        providers = args.child.split(",")
        print(json.dumps(measure(args.image_size, args.batch, args.rounds, providers)))
        return 0
    import torch

    print(f"# Page faults per ResNet-50 training step on a CPU, {args.image_size}px\n")
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"fp32, batch {args.batch}, channels_last, {args.rounds} steps per model after 2 "
          "warm-up steps; alone: one process per model, interleaved: both in one process, "
          "round-robin. Speed-up: eager_cl's median step over the model's, in the same "
          "setting.\n")
    print(f"Command: `python benchmarks/cpu_page_faults.py --image-size {args.image_size} "
          f"--batch {args.batch} --rounds {args.rounds}`\n")
    print("| setting | provider | step ms median (min-max) | speed-up vs eager_cl | "
          "page faults per step median (min-max) | MiB faulted in | sys s |")
    print("|---|---|---|---|---|---|---|")
    for setting, (env, runs) in SETTINGS.items():
        samples = {}
        for providers in runs:
            run = subprocess.run(
                [sys.executable, __file__, "--child", ",".join(providers), "--image-size",
                 str(args.image_size), "--batch", str(args.batch), "--rounds", str(args.rounds)],
                env={**os.environ, **env}, capture_output=True, text=True, check=True)
            samples.update(json.loads(run.stdout.strip().splitlines()[-1]))
        print("\n".join(summary_rows(setting, samples)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
