"""Measurement loading for the roofline table: benchmark JSON (pytest-benchmark rows of
benchmarks/test_bench_{conv,bn_add_relu,blocks}.py, or `fused-resnet bench`'s results.json)
read into Measurements, the fastest usable one per benchmark row kept (the project's own
providers, on the named device, in the table's dtype and batch), and matched to table rows."""

import json
from collections import defaultdict
from typing import Iterable, NamedTuple, Optional

from fused_resnet.bench.roofline.costs import Peaks
from fused_resnet.bench.roofline.shapes import Block

BENCH_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}  # JSON spelling


class Measurement(NamedTuple):
    kind: str        # "conv", "dual", "bn_add_relu", "block", "model"
    key: tuple
    mode: str        # the benchmark's own mode name
    seconds: float   # median
    provider: str
    device: str
    dtype: str       # bf16 / fp16 / fp32
    batch: int
    source: str


def _pytest_benchmark_measurement(bench: dict, source: str) -> Optional[Measurement]:
    """One pytest-benchmark row of benchmarks/test_bench_{conv,bn_add_relu,blocks}.py (as they
    record it in extra_info and params), or None for a row this table has no place for."""
    info, params = bench.get("extra_info") or {}, bench.get("params") or {}
    seconds = bench["stats"]["median"]
    common = dict(seconds=seconds, provider=info.get("provider", ""),
                  device=info.get("device", ""),
                  dtype=BENCH_DTYPES.get(info.get("dtype"), info.get("dtype")), source=source)
    op, mode = info.get("op"), info.get("mode")
    if op == "conv" and "layer" in params:
        batch = round(info["images_per_s"] * seconds)  # the suite records images/s, not N
        if mode == "eval_dual":
            _, c_mid, c_out, c_in, stride, hw = params["layer"]
            return Measurement("dual", (c_mid, c_out, c_in, stride, hw), mode, batch=batch,
                               **common)
        _, c_in, c_out, k, stride, padding, hw = params["layer"]
        return Measurement("conv", (c_in, c_out, k, stride, padding, hw), mode, batch=batch,
                           **common)
    if op == "bn_add_relu":
        n, c, h, w = info["shape"]
        return Measurement("bn_add_relu", (c, h, w), mode, batch=n, **common)
    if op == "resnet50 block":
        name, dims = info["shape"][0].split()
        n, c, h, _ = map(int, dims.split("x"))
        return Measurement("block", (name, c, h), mode, batch=n, **common)
    return None


def _suite_measurements(data: dict, source: str) -> list:
    """`fused-resnet bench`'s results.json: whole models, inference and training step."""
    config = data["config"]
    return [Measurement("model", (row["model"], config["image_size"]), row["mode"],
                        row["median_s"], row["provider"], data["environment"]["device"],
                        config["dtype"], config["batch_size"], source)
            for row in data["rows"] if row.get("status") == "ok"]


def load_measurements(path: str) -> list:
    with open(path) as f:
        data = json.load(f)
    if "benchmarks" in data:
        found = (_pytest_benchmark_measurement(b, path) for b in data["benchmarks"])
        return [m for m in found if m is not None]
    if "rows" in data and "config" in data:
        return _suite_measurements(data, path)
    raise ValueError(f"{path}: neither pytest-benchmark JSON nor fused-resnet bench results")


def usable_measurements(measurements: Iterable, device_name: str, dtype: str,
                        batch: int) -> tuple:
    """({(kind, key, mode): fastest fused measurement} on a device whose name contains
    device_name, in dtype, at this batch; {reason: count} of the ones left out). Only the
    project's own providers count (eager and compiled rows time other ops)."""
    best, skipped = {}, defaultdict(int)
    for m in measurements:
        if not m.provider.startswith("fused"):
            continue
        if device_name.lower() not in m.device.lower():
            skipped[f"other device ({m.device})"] += 1
        elif m.dtype != dtype or m.batch != batch:
            skipped[f"other dtype or batch ({m.dtype}, batch {m.batch})"] += 1
        else:
            slot = (m.kind, m.key, m.mode)
            if slot not in best or m.seconds < best[slot].seconds:
                best[slot] = m
    return best, dict(skipped)


def measured_entry(m: Measurement, timed: str, floor_seconds: float) -> dict:
    return {"seconds": m.seconds, "provider": m.provider, "source": m.source, "timed": timed,
            "timed_floor_seconds": floor_seconds, "fraction_of_floor": floor_seconds / m.seconds}


def attach_measurements(rows: list, best: dict, peaks: Peaks) -> int:
    """Fill row.measured where a measurement of the row's benchmark target exists; returns
    how many rows got one."""
    filled = 0
    for row in rows:
        t = row.target
        m = t and best.get((t.kind, t.key, t.mode))
        if m:
            row.measured = measured_entry(m, t.timed, peaks.floor_seconds(*t.cost))
            filled += 1
    return filled


def block_key(block: Block) -> tuple:
    """What test_bench_blocks.py names a block by: ("layer1.0", C_in, input H)."""
    first = block.convs[0]
    return block.name, first.c_in, first.height
