"""`fused-resnet bench`: every provider on every model and mode, correctness checked before
timing, one JSON + markdown report + PNG plots. See fused_resnet.bench.providers for the
providers and fused_resnet.bench.floors for the floors."""

import dataclasses
import gc
import json
import os
from typing import Optional

import torch
import torchvision

from fused_resnet.bench import check, environment, floors, memory, providers, timing
from fused_resnet.progress import Progress

MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
MODES = ("inference", "training")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class Config:
    models: list = dataclasses.field(default_factory=lambda: ["resnet50"])
    modes: list = dataclasses.field(default_factory=lambda: list(MODES))
    device: str = "cpu"
    dtype: str = "fp32"
    batch_size: int = 8
    image_size: int = 112
    providers: Optional[list] = None  # None: providers.defaults(device)
    warmup: int = 2
    repeats: int = 5
    iters: int = 1
    check_batch: int = 4
    out_dir: str = "fused-resnet-bench"
    seed: int = 0
    plots: bool = True

    @classmethod
    def defaults_for(cls, device: str, **overrides) -> "Config":
        """GPU: bf16, batch 256, 224x224, more samples; CPU: fp32, batch 8, 112x112 (a few
        minutes on a small machine)."""
        if torch.device(device).type == "cuda":
            base = dict(dtype="bf16", batch_size=256, image_size=224, warmup=5, repeats=10,
                        iters=5, check_batch=8)
        else:
            base = {}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(device=device, **base)


def _model(name: str, seed: int):
    """A torchvision ResNet with random weights and non-trivial BN state (nothing downloads)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.1, 0.1)
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    return model


def _batches(config: Config, count: int, batch: int):
    g = torch.Generator().manual_seed(config.seed + 1)
    shape = (batch, 3, config.image_size, config.image_size)
    return [(torch.randn(shape, generator=g), torch.randint(0, 1000, (batch,), generator=g))
            for _ in range(count)]


def _provider_list(config: Config) -> list:
    return list(config.providers) if config.providers else list(providers.defaults(config.device))


def run(config: Config, build=None, on_row=None) -> dict:
    """Run the suite; returns the result dict that report.py renders and write() saves.
    `build(name, model, device, dtype)` makes a provider (tests inject wrong ones through
    it). `on_row(result)`, if given, is called with the partial result after every row (the
    CLI rewrites results.json with it: an interrupted run keeps every row it measured)."""
    build = build or providers.build
    dtype = DTYPES[config.dtype]
    names = _provider_list(config)
    bandwidth = environment.copy_bandwidth_gbps(config.device)
    matmul = environment.matmul_tflops(config.device, dtype)
    result = {"environment": environment.environment(config.device),
              "config": dataclasses.asdict(config),
              "ceilings": {"copy_bandwidth_gbps": bandwidth, "matmul_tflops": matmul},
              "rows": []}
    steps_per_case = config.repeats + 1
    progress = Progress(len(config.models) * len(config.modes) * len(names) * steps_per_case)
    try:
        for model_name in config.models:
            _run_model(config, model_name, names, dtype, build, result, progress,
                       on_row or (lambda partial: None))
    finally:
        progress.close()
    _add_ratios(result["rows"])
    return result


def _add_row(result: dict, row: dict, on_row) -> None:
    result["rows"].append(row)
    on_row(result)


def _run_model(config, model_name, names, dtype, build, result, progress, on_row):
    model = _model(model_name, config.seed)
    element_size = torch.tensor([], dtype=dtype).element_size()
    model_floors = floors.floors(model, config.image_size, config.batch_size, element_size)
    check_x, check_target = _batches(config, 1, config.check_batch)[0]
    check_x, check_target = check_x.to(config.device), check_target.to(config.device)
    timed = _batches(config, 3, config.batch_size)
    references = {}
    for mode in config.modes:
        eager = providers.build("eager", model, config.device, dtype)
        references[mode] = check.reference(model, eager, check_x, check_target, mode)
        del eager
    for name in names:
        row_base = {"model": model_name, "provider": name}
        known = name in providers.ALL_PROVIDERS  # tests inject others through `build`
        reason = providers.unavailable(name, config.device) if known else None
        if reason is not None:
            for mode in config.modes:
                _add_row(result, {**row_base, "mode": mode, "status": "unavailable",
                                  "reason": reason}, on_row)
                progress.step(config.repeats + 1)
            continue
        progress.describe(f"{model_name} {name}: building")
        runner = build(name, model, config.device, dtype)
        for mode in config.modes:
            row = {**row_base, "mode": mode}
            progress.describe(f"{model_name} {name} {mode}: checking")
            try:
                row["check"] = check.check(runner, references[mode], check_x, check_target, mode)
            except Exception as error:  # a provider that crashes is reported, not fatal
                row.update(status="error", reason=f"{type(error).__name__}: {error}")
                _add_row(result, row, on_row)
                progress.step(config.repeats + 1)
                continue
            progress.step()
            if not row["check"]["ok"]:
                row.update(status="wrong", reason="output disagrees with eager PyTorch")
                progress.step(config.repeats)
            else:
                progress.describe(f"{model_name} {name} {mode}: timing")
                row.update(status="ok", **_time(runner, mode, timed, config, progress))
                row.update(_floor_fractions(row, model_floors[mode], result["ceilings"]))
            _add_row(result, row, on_row)
        del runner
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _time(runner, mode, timed, config, progress) -> dict:
    inputs = [(runner.prepare_input(x), t.to(config.device)) for x, t in timed]
    if mode == "inference":
        fn = lambda batch: runner.inference(batch[0])  # noqa: E731
    else:
        fn = lambda batch: runner.train_step(*batch)  # noqa: E731
    stats = timing.measure(fn, inputs, config.device, config.warmup, config.repeats,
                           config.iters, progress.step)
    stats["peak_memory_bytes"] = memory.peak_bytes(lambda: fn(inputs[0]), config.device)
    if mode == "training" and runner.model is runner.module:  # compiled graphs: opaque
        runner.module.train()
        with runner.context():
            stats["saved_activation_bytes"] = memory.saved_activation_bytes(
                runner.model, inputs[0][0])
    stats["latency_ms"] = stats["median_s"] * 1e3
    stats["images_per_s"] = config.batch_size / stats["median_s"]
    stats["images_per_s_range"] = [config.batch_size / stats["max_s"],
                                   config.batch_size / stats["min_s"]]
    return stats


def _floor_fractions(row, floor, ceilings) -> dict:
    """Fraction of the memory-traffic and compute floors reached (1.0 = at the floor)."""
    memory_s = floor["bytes"] / (ceilings["copy_bandwidth_gbps"] * 1e9)
    compute_s = floor["flops"] / (ceilings["matmul_tflops"] * 1e12)
    return {"floor_bytes": floor["bytes"], "floor_flops": floor["flops"],
            "fraction_of_memory_floor": memory_s / row["median_s"],
            "fraction_of_compute_floor": compute_s / row["median_s"]}


def _add_ratios(rows) -> None:
    """Speed-up and memory ratio against eager channels_last in the same run."""
    base = {(r["model"], r["mode"]): r for r in rows
            if r["provider"] == providers.BASELINE and r.get("status") == "ok"}
    for row in rows:
        ref = base.get((row["model"], row["mode"]))
        if row.get("status") != "ok" or ref is None:
            continue
        row["speedup_vs_eager_cl"] = ref["median_s"] / row["median_s"]
        if row.get("peak_memory_bytes") and ref.get("peak_memory_bytes"):
            row["memory_vs_eager_cl"] = row["peak_memory_bytes"] / ref["peak_memory_bytes"]
        if row.get("saved_activation_bytes") and ref.get("saved_activation_bytes"):
            row["saved_bytes_vs_eager_cl"] = \
                row["saved_activation_bytes"] / ref["saved_activation_bytes"]


def write_json(result: dict, out_dir: str, command: Optional[str] = None) -> str:
    """out_dir/results.json, replaced whole (written beside it, then renamed): a run killed
    while writing leaves the previous version. Returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    if command:
        result["command"] = command
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def write(result: dict, out_dir: str, command: Optional[str] = None) -> dict:
    """results.json, report.md and (matplotlib permitting) throughput.png / memory.png."""
    from fused_resnet.bench import report

    paths = {"json": write_json(result, out_dir, command),
             "markdown": os.path.join(out_dir, "report.md")}
    with open(paths["markdown"], "w") as f:
        f.write(report.markdown(result))
    if result["config"].get("plots", True):
        paths.update(report.plots(result, out_dir))
    return paths

