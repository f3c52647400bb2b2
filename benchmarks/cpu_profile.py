"""Where a ResNet-50 training (or inference) step spends its time on a CPU: torch.profiler's
per-op table for eager channels_last and the fused model, side by side, from the same weights
and input. The steps of the two providers alternate (warm-up, then `--steps` profiled steps of
each, interleaved), so a busy neighbour lands on both alike.

    python benchmarks/cpu_profile.py [--mode training|inference] [--image-size 224]
                                     [--batch 8] [--steps 3] [--out FILE.md]

The table lists, per op name, the self CPU time per step of each provider and the difference:
what the fused model saves (negative) or adds (positive) against eager, op by op.
"""

import argparse
import datetime
import sys

import torch
import torchvision

import fused_resnet
from fused_resnet.bench import providers
from fused_resnet.bench.environment import device_name

TOP = 40


def _step(runner, mode, x, target):
    if mode == "training":
        runner.train_step(x, target)
    else:
        runner.inference(x)


def _self_times(prof) -> dict:
    """op name -> (self CPU us, calls) over the profiled steps."""
    return {e.key: (e.self_cpu_time_total, e.count) for e in prof.key_averages()}


def profile(mode: str, image_size: int, batch: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    x = torch.randn(batch, 3, image_size, image_size)
    target = torch.randint(0, 1000, (batch,))
    runners = {name: providers.build(name, model, "cpu", torch.float32)
               for name in ("eager_cl", "fused")}
    inputs = {name: r.prepare_input(x) for name, r in runners.items()}
    for _ in range(2):  # warm-up: oneDNN primitive caches, prepacked weights
        for name, r in runners.items():
            _step(r, mode, inputs[name], target)
    totals = {name: {} for name in runners}
    wall = {name: [] for name in runners}
    for _ in range(steps):
        for name, r in runners.items():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
                _step(r, mode, inputs[name], target)
            for key, (us, calls) in _self_times(p).items():
                old = totals[name].get(key, (0.0, 0))
                totals[name][key] = (old[0] + us, old[1] + calls)
            wall[name].append(sum(us for us, _ in _self_times(p).values()) / 1e3)
    return {name: {k: (us / steps / 1e3, calls // steps) for k, (us, calls) in t.items()}
            for name, t in totals.items()}, wall


def table(per_op: dict, wall: dict, title: str) -> str:
    eager, fused = per_op["eager_cl"], per_op["fused"]
    keys = sorted(set(eager) | set(fused),
                  key=lambda k: -max(eager.get(k, (0, 0))[0], fused.get(k, (0, 0))[0]))
    lines = [f"## {title}", "",
             f"Self CPU time per step (profiled; profiler overhead included), ms: eager_cl "
             f"{sum(v[0] for v in eager.values()):.1f} (steps: "
             + ", ".join(f"{w:.0f}" for w in wall["eager_cl"]) + "), fused "
             f"{sum(v[0] for v in fused.values()):.1f} (steps: "
             + ", ".join(f"{w:.0f}" for w in wall["fused"]) + ").", "",
             "| op | eager_cl ms | calls | fused ms | calls | fused - eager ms |",
             "|---|---:|---:|---:|---:|---:|"]
    for k in keys[:TOP]:
        e, f = eager.get(k, (0.0, 0)), fused.get(k, (0.0, 0))
        lines.append(f"| `{k}` | {e[0]:.2f} | {e[1]} | {f[0]:.2f} | {f[1]} | "
                     f"{f[0] - e[0]:+.2f} |")
    rest_e = sum(v[0] for k, v in eager.items() if k not in keys[:TOP])
    rest_f = sum(v[0] for k, v in fused.items() if k not in keys[:TOP])
    lines.append(f"| (the other ops) | {rest_e:.2f} | | {rest_f:.2f} | | {rest_f - rest_e:+.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("training", "inference"), default="training")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    per_op, wall = profile(args.mode, args.image_size, args.batch, args.steps)
    header = (f"# ResNet-50 {args.mode} step on CPU, per-op profile\n\n"
              f"{datetime.date.today()}, {device_name('cpu')}, torch {torch.__version__}, "
              f"fused_resnet "
              f"{fused_resnet.__version__}, fp32, batch {args.batch}, {args.image_size}px, "
              f"{args.steps} profiled steps each, interleaved.\n\n"
              f"Command: `python benchmarks/cpu_profile.py --mode {args.mode} --image-size "
              f"{args.image_size} --batch {args.batch} --steps {args.steps}`\n\n")
    text = header + table(per_op, wall, f"{args.image_size}px {args.mode}")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
