"""Timing done right on a shared machine: every provider is warmed up (compilation,
autotuning, allocator growth) first, then all are timed round-robin, one sample of `iters`
calls each per round, over rounds, in one process on the same inputs: a neighbour that takes
the machine for a while slows every provider in that round alike instead of one provider's
whole pass. Samples are timed with CUDA events on a GPU (perf_counter on a CPU, synchronized).

Stability: a provider's samples are judged stable when their interquartile range is at most
MAX_RELATIVE_SPREAD of their median (quartiles by statistics.quantiles' inclusive method, which
stays inside the samples for small counts). One sample cannot show its spread: not stable.
Speed ratios built on an unstable row are not judged (the report says so)."""

import statistics
from typing import Callable, Dict, Optional

from fused_resnet.bench.environment import seconds_per_call, synchronize

MAX_RELATIVE_SPREAD = 0.10


def quartiles(values: list) -> list:
    """[first, third] quartile (the inclusive method; both the value itself for one value)."""
    if len(values) == 1:
        return [values[0], values[0]]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [q1, q3]


def round_ratios(base: Optional[list], other: Optional[list]) -> list:
    """base[i] / other[i] for rounds timed in turn (interleaved): each round's speed-up of
    `other` over `base`; [] unless both have the same rounds."""
    if not base or not other or len(base) != len(other):
        return []
    return [b / o for b, o in zip(base, other)]


def summary(samples: list) -> dict:
    """Per-call seconds from samples: median, min, max, quartiles, IQR, the IQR relative to
    the median and whether that is within MAX_RELATIVE_SPREAD, and every sample."""
    median = statistics.median(samples)
    q1, q3 = quartiles(samples)
    spread = (q3 - q1) / median
    return {"median_s": median, "min_s": min(samples), "max_s": max(samples),
            "q1_s": q1, "q3_s": q3, "iqr_s": q3 - q1, "relative_spread": spread,
            "stable": len(samples) > 1 and spread <= MAX_RELATIVE_SPREAD,
            "samples_s": list(samples)}


def is_stable(row: dict) -> bool:
    """A timed row's verdict (rows recorded before it was stored: from their samples)."""
    if "stable" in row:
        return row["stable"]
    return summary(row["samples_s"])["stable"] if row.get("samples_s") else False


def interleaved(calls: Dict[str, Callable[[], None]], device: str, warmup: int, rounds: int,
                iters: int, after_round: Optional[Callable[[dict, dict], None]] = None):
    """calls: {name: a zero-argument call}. Each is warmed up `warmup` times, then timed
    round-robin. A call that raises is dropped from later rounds and reported, not fatal (an
    interrupt such as KeyboardInterrupt still ends the run). after_round(samples, errors) runs
    after every round (the suite saves what it measured there). Returns ({name: [seconds per
    call, one per round]}, {name: exception})."""
    samples = {name: [] for name in calls}
    errors = {}

    def attempt(name, fn):
        try:
            return fn()
        except Exception as error:  # one provider's crash must not cost the others' samples
            errors[name] = error

    for name, call in calls.items():
        attempt(name, lambda: [call() for _ in range(warmup)])
    synchronize(device)
    for _ in range(rounds):
        for name, call in calls.items():
            if name not in errors:
                sample = attempt(name, lambda: seconds_per_call(call, device, iters))
                if sample is not None:
                    samples[name].append(sample)
        if after_round is not None:
            after_round(samples, errors)
    return samples, errors
