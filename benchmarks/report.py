"""Turns pytest-benchmark JSON into a markdown report: one table per op, rows per
(shape, mode), a column group per provider, ratios against eager from the same run; and a
PNG bar chart of the same rows (throughput per provider).

    python benchmarks/report.py out.json [-o report.md] [--plot out.png] [--command "..."]
"""

import argparse
import json
from collections import defaultdict


def load_rows(path):
    with open(path) as f:
        data = json.load(f)
    rows = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info") or {}
        if "provider" not in info:
            continue
        rows.append({**info, "median_s": bench["stats"]["median"],
                     "iqr_s": bench["stats"]["iqr"], "rounds": bench["stats"]["rounds"]})
    return data, rows


def _fmt_ms(seconds):
    return f"{seconds * 1e3:.3f}"


def _throughput(row) -> str:
    if "tflops" in row:  # compute-bound ops: arithmetic rate and images/s
        return f"{row['tflops']:.2f} TFLOP/s, {row['images_per_s']:.0f} img/s"
    if "gbps" in row:
        return f"{row['gbps']:.0f} GB/s"
    text = f"{row['images_per_s']:.1f} img/s"  # blocks and whole models
    if row.get("peak_memory_bytes"):
        text += f", {row['peak_memory_bytes'] / 2 ** 20:.0f} MiB peak"
    return text


def _rate(row) -> float:
    return row.get("tflops") or row.get("gbps") or row["images_per_s"]


def plot(rows, path) -> None:
    """Throughput per provider (TFLOP/s, GB/s or images/s: each op's own unit)."""
    from fused_resnet.bench.report import bar_chart

    groups = defaultdict(dict)
    for row in rows:
        groups[f"{'x'.join(map(str, row['shape']))} {row['mode']}"][row["provider"]] = _rate(row)
    unit = "TFLOP/s" if "tflops" in rows[0] else "GB/s" if "gbps" in rows[0] else "images/s"
    bar_chart(groups, unit, f"{rows[0]['op']}, {rows[0]['device']}", path)


def render(data, rows, command=None) -> str:
    if not rows:
        return "No benchmark rows with fused_resnet extra_info.\n"
    first = rows[0]
    ops = list(dict.fromkeys(row["op"] for row in rows))
    lines = [f"# fused_resnet benchmark: {', '.join(ops)}", ""]
    lines += [f"- device: {first['device']}",
              f"- torch {first['torch']}, CUDA {first['cuda']}, triton {first['triton']}, "
              f"fused_resnet {first['fused_resnet']}",
              f"- date: {first['date']}",
              f"- dtype {first['dtype']}, layout {first['layout']}"]
    if first.get("copy_bandwidth_gbps"):
        lines.append(f"- measured device copy bandwidth: {first['copy_bandwidth_gbps']:.0f} GB/s")
    if command:
        lines.append(f"- command: `{command}`")
    lines += ["", "Median time per call (ms); GB/s = bytes the fused algorithm must move / time "
              "(memory-bound ops) or TFLOP/s of the convolutions and images/s; and the "
              "speed-up over eager PyTorch (channels_last eager for whole models) measured in "
              "the same run (> 1: faster than eager).",
              ""]
    for op in ops:
        if len(ops) > 1:
            lines += [f"## {op}", ""]
        lines += _table([row for row in rows if row["op"] == op]) + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _table(rows) -> list:
    lines = []
    groups = defaultdict(dict)
    for row in rows:
        groups[(tuple(row["shape"]), row["mode"])][row["provider"]] = row
    providers = sorted({row["provider"] for row in rows},
                       key=lambda p: (not p.startswith("eager"), p != "compiled", p))
    base = "eager" if "eager" in providers else "eager_cl"  # model rows: channels_last eager
    header = "| shape | mode | " + " | ".join(providers) + " |"
    lines += [header, "|" + "---|" * (len(providers) + 2)]
    for (shape, mode), by_provider in groups.items():
        eager = by_provider.get(base)
        cells = []
        for p in providers:
            row = by_provider.get(p)
            if row is None:
                cells.append("-")
                continue
            cell = f"{_fmt_ms(row['median_s'])} ms, {_throughput(row)}"
            if row.get("fraction_of_copy_bandwidth"):
                cell += f" ({100 * row['fraction_of_copy_bandwidth']:.0f}% of copy)"
            if eager and p != base:
                cell += f", **{eager['median_s'] / row['median_s']:.2f}x**"
            cells.append(cell)
        lines.append(f"| {'x'.join(map(str, shape))} | {mode} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json_path")
    parser.add_argument("-o", "--output", help="write the markdown here (default: stdout)")
    parser.add_argument("--command", help="the command that produced the JSON")
    parser.add_argument("--plot", help="also write a PNG bar chart here")
    args = parser.parse_args(argv)
    data, rows = load_rows(args.json_path)
    text = render(data, rows, args.command)
    if args.plot and rows:
        plot(rows, args.plot)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
