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
    repeats: int = 7  # timing rounds: one sample per provider per round
    iters: int = 1
    check_batch: Optional[int] = None  # None: the timing batch (see run)
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
    it). `on_row(result)`, if given, is called with the partial result after every row is
    checked and after every timing round (the CLI rewrites results.json with it: an
    interrupted run keeps every check and every sample it measured).

    Per model and mode: every provider is built and checked against float64 eager PyTorch,
    then the checked ones are warmed up and timed round-robin (fused_resnet.bench.timing).
    Compiled providers compile once per mode: inference is checked on the first timing batch
    itself (fused_resnet.bench.check compares its first `check_batch` images with float64),
    and training is checked at `check_batch`, which on a CPU defaults to the timing batch.
    On a GPU the training check runs at batch 8 (a float64 training step at the timing batch
    256 does not fit), so there each compiled provider compiles its training graph twice: once
    for the check, once for the timing shape (dynamic=False)."""
    build = build or providers.build
    dtype = DTYPES[config.dtype]
    names = _provider_list(config)
    bandwidth = environment.copy_bandwidth_gbps(config.device)
    matmul = environment.matmul_tflops(config.device, dtype)
    result = {"environment": environment.environment(config.device),
              "config": dataclasses.asdict(config),
              "ceilings": {"copy_bandwidth_gbps": bandwidth, "matmul_tflops": matmul},
              "rows": []}
    on_row = on_row or (lambda partial: None)

    def save():
        _add_ratios(result["rows"])
        on_row(result)

    progress = Progress(len(config.models) * len(config.modes) * len(names)
                        * (config.repeats + 1))
    try:
        for model_name in config.models:
            _run_model(config, model_name, names, dtype, build, result, progress, save)
    finally:
        progress.close()
    _add_ratios(result["rows"])
    return result


def _check_batch(config: Config) -> int:
    return config.check_batch or config.batch_size


def _run_model(config, model_name, names, dtype, build, result, progress, save):
    model = _model(model_name, config.seed)
    element_size = torch.tensor([], dtype=dtype).element_size()
    model_floors = floors.floors(model, config.image_size, config.batch_size, element_size)
    timed = [(x.to(config.device), t.to(config.device))
             for x, t in _batches(config, 3, config.batch_size)]
    for mode in config.modes:
        case = _Case(config, model_name, mode, dtype, model_floors[mode], result, progress, save)
        case.run(model, names, build, timed)
        del case
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class _Case:
    """One model in one mode: check every provider, then time the checked ones together."""

    def __init__(self, config, model_name, mode, dtype, floor, result, progress, save):
        self.config, self.model_name, self.mode, self.dtype = config, model_name, mode, dtype
        self.floor, self.result, self.progress, self.save = floor, result, progress, save
        self.runners, self.rows = {}, {}

    def run(self, model, names, build, timed):
        x, target = self._check_inputs(timed)
        eager = providers.build("eager", model, self.config.device, self.dtype)
        reference = check.reference(model, eager, x, target, self.mode,
                                    compared=min(_check_batch(self.config), len(x)))
        del eager
        for name in names:
            self._check(name, model, build, reference, x, target)
        if self.runners:
            self._time(timed)

    def _check_inputs(self, timed):
        """Inference: the first timing batch (a compiled graph is checked as it is timed);
        training: the timing batch too unless check_batch says otherwise."""
        check_batch = _check_batch(self.config)
        if self.mode == "inference" or check_batch == self.config.batch_size:
            return timed[0]
        x, target = _batches(self.config, 1, check_batch)[0]
        return x.to(self.config.device), target.to(self.config.device)

    def _add(self, row: dict) -> None:
        self.result["rows"].append(row)
        self.save()

    def _check(self, name, model, build, reference, x, target):
        config, steps = self.config, self.config.repeats + 1
        row = {"model": self.model_name, "provider": name, "mode": self.mode}
        known = name in providers.ALL_PROVIDERS  # tests inject others through `build`
        reason = providers.unavailable(name, config.device, self.mode) if known else None
        if reason is not None:
            self.progress.step(steps)
            return self._add({**row, "status": "unavailable", "reason": reason})
        self.progress.describe(f"{self.model_name} {self.mode} {name}: building, checking")
        try:
            runner = build(name, model, config.device, self.dtype)
            row["check"] = check.check(runner, reference, x, target, self.mode)
        except Exception as error:  # a provider that crashes is reported, not fatal
            self.progress.step(steps)
            return self._add({**row, "status": "error",
                              "reason": f"{type(error).__name__}: {error}"})
        self.progress.step()
        if not row["check"]["ok"]:
            self.progress.step(steps - 1)
            return self._add({**row, "status": "wrong",
                              "reason": "output disagrees with eager PyTorch"})
        row.update(status="checked", reason="not timed (the run ended first)")
        self.runners[name], self.rows[name] = runner, row  # timing updates the row in place
        self._add(row)

    def _call(self, runner, timed):
        """A zero-argument call that steps through the timing batches."""
        inputs = [(runner.prepare_input(x), t) for x, t in timed]
        if self.mode == "inference":
            step = lambda batch: runner.inference(batch[0])  # noqa: E731
        else:
            step = lambda batch: runner.train_step(*batch)  # noqa: E731
        state = {"i": 0}

        def call():
            step(inputs[state["i"] % len(inputs)])
            state["i"] += 1
        return call, inputs[0]

    def _time(self, timed):
        config = self.config
        calls, first = {}, {}
        for name, runner in self.runners.items():
            calls[name], first[name] = self._call(runner, timed)
        self.progress.describe(f"{self.model_name} {self.mode}: timing "
                               f"{len(calls)} providers round-robin")

        def after_round(samples, errors):
            for name, row in self.rows.items():
                if name in errors:
                    row.pop("reason", None)
                    row.update(status="error", reason=f"{type(errors[name]).__name__}: "
                                                      f"{errors[name]} (while timing)")
                elif samples[name]:
                    row.pop("reason", None)
                    row.update(status="ok", rounds=len(samples[name]),
                               **_speed(samples[name], config.batch_size))
                    row.update(_floor_fractions(row, self.floor, self.result["ceilings"]))
            self.progress.step(len(calls))
            self.save()

        timing.interleaved(calls, config.device, config.warmup, config.repeats, config.iters,
                           after_round)
        for name, row in self.rows.items():
            if row["status"] == "ok":
                row.update(_memory(self.runners[name], self.mode, first[name], config.device))
        self.save()


def _speed(samples: list, batch: int) -> dict:
    stats = timing.summary(samples)
    stats["latency_ms"] = stats["median_s"] * 1e3
    stats["images_per_s"] = batch / stats["median_s"]
    stats["images_per_s_range"] = [batch / stats["max_s"], batch / stats["min_s"]]
    stats["images_per_s_iqr"] = [batch / stats["q3_s"], batch / stats["q1_s"]]
    return stats


def _memory(runner, mode, batch, device) -> dict:
    """Peak memory of one call on `batch` (prepared), and in training what autograd saves for
    backward (eager graphs only: a compiled graph is opaque to the saved-tensor hooks)."""
    if mode == "inference":
        stats = {"peak_memory_bytes": memory.peak_bytes(lambda: runner.inference(batch[0]),
                                                        device)}
    else:
        stats = {"peak_memory_bytes": memory.peak_bytes(lambda: runner.train_step(*batch),
                                                        device)}
    if mode == "training" and runner.model is runner.module:
        runner.module.train()
        with runner.context():
            stats["saved_activation_bytes"] = memory.saved_activation_bytes(runner.model,
                                                                            batch[0])
    return stats


def _floor_fractions(row, floor, ceilings) -> dict:
    """Fraction of the memory-traffic and compute floors reached (1.0 = at the floor)."""
    memory_s = floor["bytes"] / (ceilings["copy_bandwidth_gbps"] * 1e9)
    compute_s = floor["flops"] / (ceilings["matmul_tflops"] * 1e12)
    return {"floor_bytes": floor["bytes"], "floor_flops": floor["flops"],
            "fraction_of_memory_floor": memory_s / row["median_s"],
            "fraction_of_compute_floor": compute_s / row["median_s"]}


def _add_ratios(rows) -> None:
    """Speed-up and memory ratio against eager channels_last in the same run; a speed-up is
    judged only when both rows' samples are stable (fused_resnet.bench.timing). The speed-up's
    own spread: the quartiles of the per-round ratios (the providers take turns within a round,
    so a round's ratio compares calls made under the same load)."""
    base = {(r["model"], r["mode"]): r for r in rows
            if r["provider"] == providers.BASELINE and r.get("status") == "ok"}
    for row in rows:
        ref = base.get((row["model"], row["mode"]))
        if row.get("status") != "ok" or ref is None:
            continue
        row["speedup_vs_eager_cl"] = ref["median_s"] / row["median_s"]
        row["speedup_judged"] = timing.is_stable(row) and timing.is_stable(ref)
        per_round = timing.round_ratios(ref.get("samples_s"), row.get("samples_s"))
        if per_round and row is not ref:
            row["speedup_rounds_iqr"] = timing.quartiles(per_round)
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

