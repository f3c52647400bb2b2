"""Timing done right: warm-up calls (compilation, autotuning, allocator growth) first, then
`repeats` samples of `iters` calls each over rotating input batches, each sample timed with
CUDA events on a GPU (perf_counter on a CPU, synchronized); median and spread of the
per-call time."""

import statistics

from fused_resnet.bench.environment import seconds_per_call, synchronize


def measure(fn, inputs: list, device: str, warmup: int, repeats: int, iters: int,
            progress=None) -> dict:
    """fn(batch) for batches rotating through `inputs`. Returns per-call seconds: median, min,
    max, interquartile range and every sample."""
    state = {"i": 0}

    def call():
        fn(inputs[state["i"] % len(inputs)])
        state["i"] += 1

    for _ in range(warmup):
        call()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        samples.append(seconds_per_call(call, device, iters))
        if progress is not None:
            progress()
    quartiles = statistics.quantiles(samples, n=4) if len(samples) > 1 else samples * 3
    return {"median_s": statistics.median(samples), "min_s": min(samples),
            "max_s": max(samples), "iqr_s": quartiles[2] - quartiles[0], "samples_s": samples}
