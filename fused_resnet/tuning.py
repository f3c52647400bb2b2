"""Measured choices, made once per key and cached for the process (like cudnn.benchmark):
which implementation of a conv to run, which Triton tile configuration to launch."""

import torch

_cache: dict = {}


def tuned_choice(key, candidates: dict, timer=None):
    """Name of the fastest candidate (name -> zero-argument callable) by timer(callable)
    (default: median CUDA time), measured the first time `key` is seen, then cached."""
    if key not in _cache:
        timer = timer or cuda_median_ms
        _cache[key] = min(candidates, key=lambda name: timer(candidates[name]))
    return _cache[key]


def cached(key):
    """The choice made earlier for key, or None."""
    return _cache.get(key)


def cuda_median_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median time of fn() on the current CUDA stream, in ms (events; warm-up first)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def can_measure() -> bool:
    """False while a CUDA graph is being captured: timing would break the capture."""
    return torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing()
