"""`fused-resnet demo`: the residual-network story (He et al., 2016) retold with the fused
kernels on a CPU in minutes. Plain and residual CIFAR-style networks (fused_resnet.models.
cifar_resnet) of several depths train, fused (fused_resnet.fuse_), on scikit-learn's digits
(1797 8x8 images that ship with the package: nothing downloads), and the demo draws

- training error against epochs per depth, plain next to residual (the degradation problem:
  a deeper plain network trains worse, a deeper residual one does not), and
- the gradient norm of every conv layer's weight at initialisation (the first training step),
  which shows how the gradient reaching the early layers of a plain stack differs from the
  residual one.

It writes demo.json (every number), demo.md (tables and what they show) and two PNGs.
scikit-learn and matplotlib are optional dependencies of the package (requirements-demo.txt):
the demo says so and stops when either is missing.
"""

import dataclasses
import json
import os
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fused_resnet.progress import Progress

PAPER = "He et al., Deep Residual Learning for Image Recognition, CVPR 2016"
NUM_CLASSES = 10
TRAIN_IMAGES = 1500  # of the 1797 digits; the other 297 are the test set


class MissingDependency(RuntimeError):
    """An optional package the demo needs is not installed."""


def require_packages() -> None:
    """Raise MissingDependency naming every missing package and how to install it."""
    missing = []
    for module, pin in (("sklearn", "scikit-learn==1.9.1"), ("matplotlib", "matplotlib==3.10.9")):
        try:
            __import__(module)
        except ImportError:
            missing.append(pin)
    if missing:
        raise MissingDependency(
            "fused-resnet demo needs " + " and ".join(missing) + " (optional dependencies of "
            "fused_resnet): pip install " + " ".join(missing) + " (or pip install -r "
            "requirements-demo.txt in a source checkout)")


def digits(image_size: int = 8, seed: int = 0):
    """scikit-learn's digits as (x_train, y_train, x_test, y_test): images scaled to [-0.5,
    0.5], bilinearly resized to image_size x image_size when that is not 8, repeated over the
    3 input channels a CIFAR stem expects; shuffled by `seed`, then the first 1500 train."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear",
                          align_corners=False)
    x = (x - 0.5).repeat(1, 3, 1, 1)
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, test = order[:TRAIN_IMAGES], order[TRAIN_IMAGES:]
    return x[train], y[train], x[test], y[test]


@dataclasses.dataclass
class Config:
    depths: tuple = (8, 20, 56)
    epochs: int = 8
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # He et al. train ResNet-110 at 0.1x the rate until training error is below 80% (about
    # 400 iterations; here the first epoch) and then at the full rate: deep nets diverge early
    # at the full rate. They divide the rate by 10 again late in training (at 50% and 75%);
    # here once, for the last quarter. Every network gets the same schedule (a fair contest).
    warmup_steps: int = 24
    warmup_factor: float = 0.1
    decay_after: float = 0.75  # fraction of the steps after which the rate is 0.1x
    image_size: int = 16
    max_batches: Optional[int] = None  # per epoch; None: the whole training set
    fused: bool = True
    seed: int = 0
    # None: torch's default. On a machine other processes keep busy, one thread was ~10x
    # faster than two (the small convs here wait for a descheduled thread, most likely).
    threads: Optional[int] = None
    out_dir: str = "fused-resnet-demo"

    @classmethod
    def quick(cls, **overrides) -> "Config":
        """Seconds, not minutes: two shallow depths, one short epoch, 8x8 images."""
        base = dict(depths=(8, 14), epochs=1, max_batches=4, batch_size=32, image_size=8,
                    warmup_steps=2)
        base.update(overrides)
        return cls(**base)

    def __post_init__(self):
        self.depths = tuple(self.depths)
        for depth in self.depths:
            if depth < 8 or (depth - 2) % 6:
                raise ValueError(f"demo: depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, "
                                 f"56, 110), got {depth}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"demo: {name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.decay_after <= 1:
            raise ValueError(f"demo: decay_after must be in (0, 1], got {self.decay_after}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"demo: threads must be at least 1, got {self.threads}")
        if self.max_batches is not None and self.max_batches < 1:
            raise ValueError(f"demo: max_batches must be at least 1, got {self.max_batches}")

    def batches_per_epoch(self) -> int:
        full = -(-TRAIN_IMAGES // self.batch_size)
        return full if self.max_batches is None else min(full, self.max_batches)


def run_name(depth: int, plain: bool) -> str:
    return f"plain-{depth}" if plain else f"resnet-{depth}"


def build_model(depth: int, plain: bool, fused: bool, seed: int) -> nn.Module:
    """cifar_resnet(depth, plain=plain) initialised from `seed`, fused when asked (the same
    weights either way)."""
    from fused_resnet import fuse_
    from fused_resnet.models import cifar_resnet

    torch.manual_seed(seed)
    model = cifar_resnet(depth, plain=plain, num_classes=NUM_CLASSES)
    return fuse_(model) if fused else model


def conv_grad_norms(model: nn.Module) -> list:
    """[(name, ||grad||)] of every conv weight, input to output (the stem conv first)."""
    return [(name, p.grad.norm().item()) for name, p in model.named_parameters()
            if p.dim() == 4 and p.grad is not None]


def _learning_rate(config: Config, step: int) -> float:
    if step < config.warmup_steps:
        return config.lr * config.warmup_factor
    late = step >= config.decay_after * config.epochs * config.batches_per_epoch()
    return config.lr * (0.1 if late else 1.0)


def train(model: nn.Module, data, config: Config, progress=None, label: str = "") -> dict:
    """SGD on data[:2] (x_train, y_train) for config.epochs epochs, reshuffled each epoch from
    config.seed (so two models see the same batches in the same order). Returns the loss and
    error of every step, the mean error of every epoch, and the conv weights' gradient norms
    at the first step (the initialisation)."""
    x, y = data[0], data[1]
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    history = {"step_loss": [], "step_error": [], "epoch_train_error": [],
               "epoch_train_loss": []}
    step, per_epoch = 0, config.batches_per_epoch()
    model.train()
    for epoch in range(config.epochs):
        if progress is not None:
            progress.describe(f"{label} epoch {epoch + 1}/{config.epochs}")
        g = torch.Generator().manual_seed(config.seed + 1 + epoch)
        order = torch.randperm(len(y), generator=g)
        for b in range(per_epoch):
            idx = order[b * config.batch_size:(b + 1) * config.batch_size]
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            optimizer.zero_grad()
            loss.backward()
            if step == 0:
                history["grad_norms"] = conv_grad_norms(model)
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(config, step)
            optimizer.step()
            history["step_loss"].append(loss.item())
            history["step_error"].append((logits.argmax(1) != y[idx]).float().mean().item())
            step += 1
            if progress is not None:
                progress.step()
        recent = slice(-per_epoch, None)
        history["epoch_train_error"].append(_mean(history["step_error"][recent]))
        history["epoch_train_loss"].append(_mean(history["step_loss"][recent]))
    return history


def _mean(values) -> float:
    return sum(values) / len(values)


def error_rate(model: nn.Module, x, y, batch: int = 256) -> float:
    """Classification error in eval mode (BN running statistics)."""
    model.eval()
    wrong = 0
    with torch.no_grad():
        for start in range(0, len(y), batch):
            wrong += (model(x[start:start + batch]).argmax(1) != y[start:start + batch]).sum()
    model.train()
    return wrong.item() / len(y)


def run(config: Config, progress=None) -> dict:
    """Train every (depth, plain/residual) pair; the result dict that write() saves."""
    from fused_resnet.bench import environment

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    data = digits(config.image_size, config.seed)
    runs = []
    for depth in config.depths:
        for plain in (True, False):
            name = run_name(depth, plain)
            model = build_model(depth, plain, config.fused, config.seed)
            start = time.perf_counter()
            history = train(model, data, config, progress, label=name)
            seconds = time.perf_counter() - start
            report = getattr(model, "fused_resnet_report", {"fused": []})
            runs.append(dict(
                name=name, depth=depth, plain=plain, fused_blocks=len(report["fused"]),
                train_seconds=seconds, final_train_error=error_rate(model, *data[:2]),
                test_error=error_rate(model, *data[2:]), **history))
    return {"config": dataclasses.asdict(config), "environment": environment.environment("cpu"),
            "data": {"dataset": "sklearn.datasets.load_digits", "train_images": len(data[1]),
                     "test_images": len(data[3]), "image_size": config.image_size},
            "runs": runs, "findings": findings(runs)}


# Two training errors closer than this are "about the same": the running error of an epoch
# averages ~1500 predictions, whose sampling spread alone is ~1 point at 30% error.
SAME_WITHIN = 0.03


def _compare(a: float, b: float) -> str:
    """How error a compares with error b, in words."""
    if abs(a - b) <= SAME_WITHIN:
        return f"about the same (within {SAME_WITHIN:.0%})"
    return "higher" if a > b else "lower"


def findings(runs: list) -> list:
    """Plain sentences on what the runs show, each quoting the numbers it rests on."""
    by_name = {r["name"]: r for r in runs}
    depths = sorted({r["depth"] for r in runs})

    def err(depth, plain):
        return by_name[run_name(depth, plain)]["epoch_train_error"][-1]

    lines = []
    for deeper, shallower in zip(depths[1:], depths[:-1]):
        for plain in (True, False):
            a, b = err(deeper, plain), err(shallower, plain)
            lines.append(f"{run_name(deeper, plain)} vs {run_name(shallower, plain)}, last-epoch "
                         f"training error {a:.1%} vs {b:.1%}: {_compare(a, b)}.")
    for depth in depths:
        r, p = err(depth, False), err(depth, True)
        lines.append(f"Depth {depth}: residual {r:.1%} vs plain {p:.1%}: residual "
                     f"{_compare(r, p)}.")
    for depth in depths:
        ratios = {}
        for plain in (True, False):
            norms = [n for _, n in by_name[run_name(depth, plain)]["grad_norms"]]
            ratios[plain] = norms[0] / norms[-1]
        lines.append(f"Depth {depth} at initialisation: gradient norm of the stem conv over the "
                     f"last conv {ratios[True]:.3g} plain, {ratios[False]:.3g} residual.")
    return lines


def markdown(result: dict) -> str:
    c, env = result["config"], result["environment"]
    lines = [
        "# fused-resnet demo: plain vs residual networks",
        "",
        f"{'Fused' if c['fused'] else 'Unfused'} CIFAR-style networks (fused_resnet.models."
        f"cifar_resnet) trained on scikit-learn's digits ({result['data']['train_images']} "
        f"train / {result['data']['test_images']} test images, {c['image_size']}x"
        f"{c['image_size']}, 3 channels): SGD lr {c['lr']} (x{c['warmup_factor']} for the "
        f"first {c['warmup_steps']} steps and after {c['decay_after']:.0%} of them), "
        f"momentum {c['momentum']}, weight decay "
        f"{c['weight_decay']}, batch {c['batch_size']}, {c['epochs']} epochs"
        + (f" of {c['max_batches']} batches" if c["max_batches"] else "") + f", seed {c['seed']}.",
        f"Machine: {env['device']}; torch {env['torch']}, fused_resnet {env['fused_resnet']}, "
        f"{env['date']}.",
        "",
        "| net | fused blocks | training error, last epoch (running) | training error, end "
        "(eval) | test error | train time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        lines.append(f"| {r['name']} | {r['fused_blocks']} | {r['epoch_train_error'][-1]:.1%} "
                     f"| {r['final_train_error']:.1%} | {r['test_error']:.1%} | "
                     f"{r['train_seconds']:.0f} |")
    lines += ["", "Training error per epoch (running mean over the epoch's batches):", "",
              "| net | " + " | ".join(str(e + 1) for e in range(c["epochs"])) + " |",
              "|---|" + "---|" * c["epochs"]]
    for r in result["runs"]:
        lines.append(f"| {r['name']} | " + " | ".join(f"{e:.1%}" for e in
                                                      r["epoch_train_error"]) + " |")
    lines += ["", "## What it shows", ""] + [f"- {line}" for line in result["findings"]]
    lines += ["", f"Reference: {PAPER}, Fig. 1, 4 (degradation) and 7 (layer responses).", ""]
    return "\n".join(lines)


def _smoothed(values: list, per_epoch: int, points_per_epoch: int = 4):
    """(epochs, means) over chunks of about a quarter epoch (a step's error on 64 images is
    noisy)."""
    chunk = max(1, per_epoch // points_per_epoch)
    xs, ys = [], []
    for start in range(0, len(values), chunk):
        part = values[start:start + chunk]
        xs.append((start + len(part)) / per_epoch)
        ys.append(100 * _mean(part))
    return xs, ys


def plots(result: dict, out_dir: str) -> dict:
    """training_error.png and grad_norms.png, plain on the left, residual on the right."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted({r["depth"] for r in result["runs"]})
    colours = {d: plt.cm.viridis(i / max(1, len(depths) - 1) * 0.85)
               for i, d in enumerate(depths)}
    per_epoch = Config(**result["config"]).batches_per_epoch()
    paths = {"training_error_png": os.path.join(out_dir, "training_error.png"),
             "grad_norms_png": os.path.join(out_dir, "grad_norms.png")}

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for r in result["runs"]:
        ax = axes[0 if r["plain"] else 1]
        ax.plot(*_smoothed(r["step_error"], per_epoch), color=colours[r["depth"]],
                label=r["name"])
    for ax, title in zip(axes, ("plain", "residual")):
        ax.set_title(f"{title} networks")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("training error (%)")
    kernels = "fused" if result["config"]["fused"] else "unfused"
    device = result["environment"]["device"]
    fig.suptitle(f"training error on digits ({kernels} networks, {device})")
    fig.tight_layout()
    fig.savefig(paths["training_error_png"], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for r in result["runs"]:
        ax = axes[0 if r["plain"] else 1]
        norms = [n for _, n in r["grad_norms"]]
        ax.semilogy(range(len(norms)), norms, marker=".", color=colours[r["depth"]],
                    label=r["name"])
    for ax, title in zip(axes, ("plain", "residual")):
        ax.set_title(f"{title} networks")
        ax.set_xlabel("conv layer (0 = stem, input side)")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    axes[0].set_ylabel("||dL/dW|| at initialisation")
    fig.suptitle("gradient norm per conv layer at initialisation (first batch)")
    fig.tight_layout()
    fig.savefig(paths["grad_norms_png"], dpi=100)
    plt.close(fig)
    return paths


def write(result: dict, out_dir: str) -> dict:
    """demo.json, demo.md and the PNGs in out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "demo.json"),
             "markdown": os.path.join(out_dir, "demo.md")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1)
    with open(paths["markdown"], "w") as f:
        f.write(markdown(result))
    paths.update(plots(result, out_dir))
    return paths


def main(config: Config, command: Optional[str] = None) -> dict:
    """Check the optional packages, train every net with a progress bar, write the files."""

    require_packages()
    names = [run_name(depth, plain) for depth in config.depths for plain in (True, False)]
    print(f"fused-resnet demo: {', '.join(names)}, "
          f"{'fused' if config.fused else 'unfused'}, {config.epochs} epochs "
          f"x {config.batches_per_epoch()} batches of {config.batch_size} on digits "
          f"{config.image_size}x{config.image_size}", flush=True)
    progress = Progress(len(names) * config.epochs * config.batches_per_epoch())
    try:
        result = run(config, progress)
    finally:
        progress.close()
    if command:
        result["command"] = command
    paths = write(result, config.out_dir)
    print("\n".join(result["findings"]))
    print("written: " + ", ".join(paths.values()))
    return paths
