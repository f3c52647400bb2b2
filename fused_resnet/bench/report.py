"""Rendering of a bench result (fused_resnet.bench.suite.run): a markdown report (also what
the terminal shows) and PNG bar charts; bar_chart also serves benchmarks/report.py."""

from collections import defaultdict

from fused_resnet.bench.timing import MAX_RELATIVE_SPREAD, is_stable

MIB = 1 << 20
NOT_JUDGED = "not judged (unstable: rerun on a quiet machine)"

# The project's speed and memory targets, on an H100 in bf16 at batch 256 (ResNet-50): what
# the report checks the fused provider against (reported, never asserted).
GOALS = [("inference", "eager_cl", "speed", 1.5), ("inference", "compile", "speed", 1.1),
         ("training", "eager_cl", "speed", 1.3), ("training", "compile", "speed", 1.1),
         ("training", "eager_cl", "peak memory", 0.7)]


def _mib(n):
    return f"{n / MIB:.0f}" if n is not None else "n/a"


def _cell_status(row) -> str:
    if row["status"] == "ok":
        c = row["check"]
        return f"ok ({c['logits_error']:.1e} <= {c['logits_allowed']:.1e})"
    return f"**{row['status']}**: {row.get('reason', '')}"


def _spread_cell(row) -> str:
    spread = row.get("relative_spread")
    shown = f"{100 * spread:.0f}%" if spread is not None else "n/a"
    return shown if is_stable(row) else f"**{shown}: unstable**"


def _iqr_images_per_s(row) -> list:
    """[low, high] images/s over the middle half of the samples (rows recorded before the
    quartiles were stored: their slowest-fastest range)."""
    return row.get("images_per_s_iqr", row["images_per_s_range"])


def _speedup_judged(row) -> bool:
    return row.get("speedup_judged", is_stable(row))


def _row_cells(row) -> list:
    if row["status"] != "ok":
        return [row["provider"], _cell_status(row)] + ["-"] * 7
    low, high = _iqr_images_per_s(row)
    speedup = row.get("speedup_vs_eager_cl")
    mem_ratio = row.get("memory_vs_eager_cl")
    saved = row.get("saved_activation_bytes")
    saved_ratio = row.get("saved_bytes_vs_eager_cl")
    if speedup is None:
        speedup_cell = "-"
    else:
        rounds = row.get("speedup_rounds_iqr")  # the per-round speed-ups' quartiles
        speedup_cell = f"{speedup:.2f}x" + (f" ({rounds[0]:.2f}-{rounds[1]:.2f})" if rounds
                                            else "") + \
            ("" if _speedup_judged(row) else ", not judged (unstable)")
    return [
        row["provider"], _cell_status(row),
        f"{row['images_per_s']:.1f} ({low:.1f}-{high:.1f})", _spread_cell(row),
        f"{row['latency_ms']:.1f}", speedup_cell,
        _mib(row.get("peak_memory_bytes")) + (f" ({mem_ratio:.2f}x)" if mem_ratio else ""),
        (_mib(saved) + (f" ({saved_ratio:.2f}x)" if saved_ratio else "")) if saved else "-",
        f"{100 * row['fraction_of_memory_floor']:.0f}% / "
        f"{100 * row['fraction_of_compute_floor']:.0f}%",
    ]


HEADER = ["provider", "check vs eager fp64 (error <= allowed)", "images/s median (IQR)",
          "spread (IQR / median)", "latency ms", "speed-up vs eager_cl (per-round IQR)",
          "peak memory MiB (vs eager_cl)", "saved for backward MiB (vs eager_cl)",
          "of memory / compute floor"]


def tables(result) -> list:
    lines = []
    groups = defaultdict(list)
    for row in result["rows"]:
        groups[(row["model"], row["mode"])].append(row)
    for (model, mode), rows in groups.items():
        lines += ["", f"### {model}, {mode}", "",
                  "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(_row_cells(row)) + " |" for row in rows]
    return lines


def _ratio(rows, model, mode, provider, key):
    """(fused vs provider, judged): a speed ratio is judged only when both rows are stable;
    memory does not depend on the timing noise. (None, False) when not measured."""
    by = {r["provider"]: r for r in rows if r["model"] == model and r["mode"] == mode
          and r["status"] == "ok"}
    fused, other = by.get("fused"), by.get(provider)
    if fused is None or other is None:
        return None, False
    if key == "speed":
        return other["median_s"] / fused["median_s"], is_stable(fused) and is_stable(other)
    if fused.get("peak_memory_bytes") and other.get("peak_memory_bytes"):
        return fused["peak_memory_bytes"] / other["peak_memory_bytes"], True
    return None, False


def goals(result) -> list:
    rows = result["rows"]
    lines = ["", "## Goals (fused vs baseline; targets set for an H100, bf16, batch 256)", "",
             "| model | mode | vs | measure | target | measured | |", "|---|---|---|---|---|---|---|"]
    for model in result["config"]["models"]:
        for mode, provider, key, target in GOALS:
            value, judged = _ratio(rows, model, mode, provider, key)
            if value is None:
                verdict, shown = "not measured", "-"
            elif not judged:
                verdict, shown = NOT_JUDGED, f"{value:.2f}x"
            else:
                met = value >= target if key == "speed" else value <= target
                verdict, shown = ("met" if met else "not met"), f"{value:.2f}x"
            sign = ">=" if key == "speed" else "<="
            lines.append(f"| {model} | {mode} | {provider} | {key} | {sign} {target}x | {shown} "
                         f"| {verdict} |")
    return lines


def unstable_line(result):
    """One line naming the unstable rows, or None when every timed row is stable."""
    timed = [r for r in result["rows"] if r["status"] == "ok"]
    unstable = [f"{r['model']} {r['mode']} {r['provider']}" for r in timed if not is_stable(r)]
    if not unstable:
        return None
    return (f"{len(unstable)} of {len(timed)} timed rows are unstable (IQR over "
            f"{100 * MAX_RELATIVE_SPREAD:.0f}% of the median: {'; '.join(unstable)}): the "
            "ratios and goals built on them are not judged; rerun on a quiet machine.")


def markdown(result) -> str:
    env, cfg, ceil = result["environment"], result["config"], result["ceilings"]
    lines = ["# fused_resnet bench", "",
             f"- device: {env['device']}",
             f"- torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, "
             f"fused_resnet {env['fused_resnet']}",
             f"- date: {env['date']}",
             f"- dtype {cfg['dtype']} (autocast unless fp32), batch {cfg['batch_size']}, "
             f"{cfg['image_size']}x{cfg['image_size']}, {cfg['repeats']} rounds of "
             f"{cfg['iters']} call(s) per provider after {cfg['warmup']} warm-up calls",
             f"- measured ceilings: copy {ceil['copy_bandwidth_gbps']:.0f} GB/s, matmul "
             f"{ceil['matmul_tflops']:.2f} TFLOP/s"]
    if result.get("command"):
        lines.append(f"- command: `{result['command']}`")
    check_batch = cfg.get("check_batch") or cfg["batch_size"]
    lines += ["", "Every provider was checked against eager PyTorch in float64 before timing "
              f"(inference: the first {min(check_batch, cfg['batch_size'])} images of the "
              f"timing batch; training: a batch of {check_batch}, logits and all parameter "
              "gradients); one that disagrees is reported as wrong and not timed. The "
              "checked providers were then timed round-robin, one sample each per round, so "
              "a busy neighbour slows all of them alike. images/s: median over the samples "
              "(IQR: the middle half of the samples). Speed-up: the ratio of the medians; "
              "in brackets the quartiles of the ratios round by round (each round's two "
              "calls ran under the same load). A row whose IQR exceeds "
              f"{100 * MAX_RELATIVE_SPREAD:.0f}% of its median is unstable: the speed-ups "
              "and goals built on it are not judged. Training = forward + "
              "backward + SGD step. Peak memory: CUDA allocator peak (everything allocated); "
              "on a CPU the growth of the resident set. Floors: time the unavoidable bytes "
              "(a fully fused forward; training 3x) take at the measured copy bandwidth, and "
              "the FLOPs at the measured matmul rate, as a fraction of the measured time "
              "(above 100%: the library convs ran faster than the measured matmul)."]
    lines += tables(result) + goals(result)
    if unstable_line(result):
        lines += ["", "**" + unstable_line(result) + "**"]
    return "\n".join(lines) + "\n"


def bar_chart(groups: dict, ylabel: str, title: str, path: str, errors: dict = None) -> None:
    """groups: {group label: {series label: value}} as grouped bars, saved to path (PNG);
    errors (optional): {group label: {series label: (low, high)}}, drawn as error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = list(dict.fromkeys(s for values in groups.values() for s in values))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(groups) * max(len(series), 1) / 3), 4))
    for i, name in enumerate(series):
        xs = [g + i * width for g in range(len(groups))]
        ys = [values.get(name, 0) for values in groups.values()]
        yerr = None
        if errors:
            bounds = [errors.get(group, {}).get(name, (y, y)) for group, y in zip(groups, ys)]
            yerr = [[max(y - low, 0) for y, (low, _) in zip(ys, bounds)],
                    [max(high - y, 0) for y, (_, high) in zip(ys, bounds)]]
        ax.bar(xs, ys, width, label=name, yerr=yerr, capsize=3 if yerr else 0)
    ax.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))])
    ax.set_xticklabels(list(groups), rotation=15)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    """python -m fused_resnet.bench.report results.json -o DIR: report.md and the PNGs again
    from a recorded result."""
    import argparse
    import json
    import os

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("json_path")
    parser.add_argument("-o", "--output", default=".", help="directory to write into")
    args = parser.parse_args(argv)
    with open(args.json_path) as f:
        result = json.load(f)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "report.md"), "w") as f:
        f.write(markdown(result))
    plots(result, args.output)


def plots(result, out_dir: str) -> dict:
    """throughput.png (images/s, error bars: the IQR of the samples) and memory.png (peak
    memory) per provider; {} without matplotlib."""
    import os
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return {}
    speed, spread, mem = defaultdict(dict), defaultdict(dict), defaultdict(dict)
    for row in result["rows"]:
        if row["status"] != "ok":
            continue
        label = f"{row['model']} {row['mode']}"
        speed[label][row["provider"]] = row["images_per_s"]
        spread[label][row["provider"]] = tuple(_iqr_images_per_s(row))
        if row.get("peak_memory_bytes"):
            mem[label][row["provider"]] = row["peak_memory_bytes"] / MIB
    device = result["environment"]["device"]
    paths = {}
    if speed:
        paths["throughput_png"] = os.path.join(out_dir, "throughput.png")
        bar_chart(speed, "images/s (bars: IQR)", f"throughput, {device}",
                  paths["throughput_png"], errors=spread)
    if mem:
        paths["memory_png"] = os.path.join(out_dir, "memory.png")
        bar_chart(mem, "peak memory (MiB)", f"peak memory, {device}", paths["memory_png"])
    return paths


if __name__ == "__main__":
    main()
