"""The roofline report: build() puts the shapes, costs and measurements together into a
Report (per-op rows, per-block and whole-network totals, notes), render_markdown / render_json
write it, and main() is `python -m fused_resnet.bench.roofline`'s command line."""

import argparse
import dataclasses
import importlib
import json
import shlex
import sys
from typing import Iterable, Optional

import torch
from torch import nn

from fused_resnet.bench import floors
from fused_resnet.bench.roofline.costs import (
    ASSUMPTIONS, BANDWIDTH, ELEMENT_SIZES, PEAK_FLOPS, Peaks)
from fused_resnet.bench.roofline.measurements import (
    attach_measurements, block_key, load_measurements, measured_entry, usable_measurements)
from fused_resnet.bench.roofline.rows import (
    FUSED, INFERENCE, LIBRARY, MODES, TRAIN_STEP, Row, block_rows, inference_rows, mode_rows,
    stem_rows, summary)
from fused_resnet.bench.roofline.shapes import (
    Block, meta_model, residual_blocks, trace_convs)

OTHER_BANDWIDTHS = (3.0e12, 3.35e12, 4.3e12)  # H100 low / high, H200's measured copy rate
NOT_MEASURED = "not yet measured on GPU"


@dataclasses.dataclass
class Report:
    config: dict
    rows: list
    blocks: list            # [{"name", "input", "modes": {mode: summary}, "measured": {}}]
    totals: dict            # {mode: summary}
    totals_measured: dict   # {mode: measured} from fused-resnet bench
    measured: dict          # sources and counts
    notes: dict


def build(model_name: str = "resnet50", batch_size: int = 256, image_size: int = 224,
          dtype: str = "bf16", peaks: Peaks = Peaks(), device_name: str = "H100",
          measured_paths: Iterable = ()) -> Report:
    e = ELEMENT_SIZES[dtype]
    model = meta_model(model_name)
    convs = trace_convs(model, batch_size, image_size)
    blocks = residual_blocks(model, convs)
    rows = stem_rows(convs["conv1"], e)
    for block in blocks:
        rows += block_rows(block, e)

    measurements = [m for path in measured_paths for m in load_measurements(path)]
    best, skipped = usable_measurements(measurements, device_name, dtype, batch_size)
    filled = attach_measurements(rows, best, peaks)
    totals = {mode: summary(mode_rows(rows, mode), peaks) for mode in MODES + (TRAIN_STEP,)}
    block_table = [_block_summary(b, rows, best, peaks) for b in blocks]
    config = {"model": model_name, "batch_size": batch_size, "image_size": image_size,
              "dtype": dtype, "element_size": e, "peak_flops": peaks.flops,
              "bandwidth": peaks.bandwidth, "device_name": device_name}
    measured = {"sources": list(measured_paths), "measurements": len(measurements),
                "used": len(best), "rows_filled": filled, "skipped": skipped}
    notes = {"library_extra": summary([r for r in rows if r.path == LIBRARY], peaks),
             "autocast_projection_extra": _autocast_projection_extra(blocks, e, peaks),
             "bandwidths": _at_bandwidths(rows, peaks),
             "floors_py": _floors_py(model, image_size, batch_size, e, peaks)}
    return Report(config, rows, block_table, totals,
                  _whole_model_measured(best, model_name, image_size, totals), measured, notes)


def _whole_model_measured(best: dict, model_name: str, image_size: int, totals: dict) -> dict:
    """`fused-resnet bench` rows against the sum of the op floors (they also time the pools,
    the classifier, the loss and, in training, the optimizer step: see ASSUMPTIONS)."""
    out = {}
    for bench_mode, mode in (("inference", INFERENCE), ("training", TRAIN_STEP)):
        m = best.get(("model", (model_name, image_size), bench_mode))
        if m:
            out[mode] = measured_entry(m, "fused-resnet bench, whole model",
                                  totals[mode]["floor_seconds"])
    return out


def _block_summary(block: Block, rows: list, best: dict, peaks: Peaks) -> dict:
    own = [row for row in rows if row.block == block.name]
    modes = {mode: summary(mode_rows(own, mode), peaks) for mode in MODES + (TRAIN_STEP,)}
    measured = {}
    for bench_mode, mode in (("eval_fwd", INFERENCE), ("train_fwdbwd", TRAIN_STEP)):
        m = best.get(("block", block_key(block), bench_mode))
        if m:
            measured[mode] = measured_entry(m, f"test_bench_blocks {bench_mode}",
                                       modes[mode]["floor_seconds"])
    return {"name": block.name, "input": str(block.convs[0].input), "modes": modes,
            "measured": measured}


def _autocast_projection_extra(blocks: list, e: int, peaks: Peaks) -> dict:
    """Under autocast FusedBottleneck runs the projection as its own conv2d_epilogue and
    conv3's epilogue reads it back as the residual: bytes and floor over the one-GEMM path
    (inference_rows of the same blocks without the dual GEMM, minus with it)."""
    dual = [b for b in blocks if b.dual]
    with_dual = summary([r for b in dual for r in inference_rows(b, e)], peaks)
    without = summary([r for b in dual for r in inference_rows(b._replace(dual=False), e)],
                      peaks)
    return {"bytes": without["bytes"] - with_dual["bytes"],
            "floor_seconds": without["floor_seconds"] - with_dual["floor_seconds"]}


def _at_bandwidths(rows: list, peaks: Peaks) -> list:
    table = []
    for bandwidth in sorted(set(OTHER_BANDWIDTHS) | {peaks.bandwidth}):
        other = Peaks(peaks.flops, bandwidth)
        table.append({"bandwidth": bandwidth, **{
            mode: summary(mode_rows(rows, mode), other)["floor_seconds"]
            for mode in (INFERENCE, TRAIN_STEP)}})
    return table


def _floors_py(model: nn.Module, image_size: int, batch_size: int, e: int,
               peaks: Peaks) -> dict:
    """fused_resnet.bench.floors' whole-model estimate (what `fused-resnet bench` reports its
    fractions against), for comparison with this table's totals. Run on the meta model with
    meta as the default device, so the input image floors.py creates is a meta tensor too:
    shapes only, nothing computed."""
    with torch.device("meta"):
        estimate = floors.floors(model, image_size, batch_size, e)
    return {mode: {**cost, "floor_seconds": peaks.floor_seconds(cost["flops"], cost["bytes"])}
            for mode, cost in estimate.items()}


# ---- rendering --------------------------------------------------------------------------------
def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.3f}"


def _measured_cells(measured: Optional[dict], unit=_us) -> list:
    if not measured:
        return [NOT_MEASURED, "-"]
    return [f"{unit(measured['seconds'])} ({measured['provider']}; {measured['timed']})",
            f"{100 * measured['fraction_of_floor']:.0f}%"]


def _row_cells(row: Row, peaks: Peaks) -> list:
    flops, nbytes = row.cost
    return [row.block, row.layer, row.op + (" **(library path only)**" if row.path == LIBRARY
                                            else ""),
            row.shape, f"{flops / 1e9:,.2f}", f"{nbytes / 1e6:,.2f}",
            f"{flops / nbytes:,.1f}", _us(peaks.floor_seconds(flops, nbytes)),
            peaks.bound(flops, nbytes), *_measured_cells(row.measured)]


def _table(header: list, rows: list) -> list:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] \
        + ["| " + " | ".join(cells) + " |" for cells in rows]


def _header(report: Report, command: str) -> list:
    c = report.config
    title = f"# Roofline: {c['model']}, batch {c['batch_size']}, {c['image_size']}x" \
            f"{c['image_size']}, {c['dtype']}, {c['device_name']}"
    lines = [title, "", f"Generated by `{command}` (from the repository root)", "",
             f"Peaks: **{c['peak_flops'] / 1e12:.0f} TFLOP/s** dense {c['dtype']} and "
             f"**{c['bandwidth'] / 1e12:.2f} TB/s** (the lent H100s measured ~790 TFLOP/s "
             f"bf16 matmul and 3.0-3.35 TB/s copy; an H200 4.3 TB/s). Time floor of an op = "
             f"max(FLOPs / peak FLOP/s, bytes / bandwidth); bound = the larger term.", "",
             "These are lower bounds. Counted and approximated:", ""]
    lines += [f"- {text}" for text in ASSUMPTIONS]
    m = report.measured
    lines += ["", f"Measured: `fraction` = floor of what the benchmark timed (named in the "
              f"cell; where it times more than the row's op, the floor of all it times) / its "
              f"median time; 100% = at the floor. Only the fastest `fused*` provider of a "
              f"row from a device whose name contains \"{c['device_name']}\", in {c['dtype']} "
              f"at batch {c['batch_size']}, is used."]
    if m["sources"]:
        skipped = "; ".join(f"{n} from {why}" for why, n in sorted(m["skipped"].items()))
        lines += ["", f"Measured sources: {', '.join(f'`{s}`' for s in m['sources'])}: "
                  f"{m['measurements']} rows read, {m['used']} used, {m['rows_filled']} table "
                  f"rows filled" + (f"; left out: {skipped}" if skipped else "") + "."]
    else:
        lines += ["", f"No benchmark JSON given: every measured cell says "
                  f"\"{NOT_MEASURED}\" (rerun with `--measured` on a GPU run's JSON)."]
    return lines


def _totals_section(report: Report) -> list:
    t = report.totals
    rows = []
    for mode in MODES + (TRAIN_STEP,):
        s = t[mode]
        rows.append([mode, f"{s['flops'] / 1e9:,.1f}", f"{s['bytes'] / 1e9:,.2f}",
                     _ms(s["compute_seconds"]), _ms(s["memory_seconds"]),
                     _ms(s["aggregate_floor_seconds"]), f"**{_ms(s['floor_seconds'])}**",
                     f"{100 * s['memory_bound_share']:.0f}%",
                     *_measured_cells(report.totals_measured.get(mode), _ms)])
    lines = ["", "## Whole network (stem + residual blocks)", ""]
    lines += _table(["mode", "GFLOP", "GB moved", "compute floor ms", "memory floor ms",
                     "aggregate floor ms", "floor ms (sum of ops)", "memory-bound ops' share",
                     "measured ms", "fraction"], rows)
    lib = report.notes["library_extra"]
    lines += ["", f"- The library-conv path adds {lib['bytes'] / 1e9:,.2f} GB "
              f"({_ms(lib['floor_seconds'])} ms) per training forward: its separate statistics "
              f"passes and the BN + ReLU written before each conv2 / conv3."]
    duals = sum(1 for r in report.rows if r.op.startswith("conv2d_dual_epilogue"))
    if duals:
        extra = report.notes["autocast_projection_extra"]
        lines.append(f"- Under autocast (how `fused-resnet bench` and test_bench_blocks run "
                     f"bf16), the {duals} projection blocks write the shortcut and read it "
                     f"back: +{extra['bytes'] / 1e6:,.1f} MB, +{_ms(extra['floor_seconds'])} ms "
                     f"of inference floor.")
    bands = report.notes["bandwidths"]
    lines += ["", "Floors (sum of ops) at other bandwidths, same FLOP/s peak:", ""]
    lines += _table(["bandwidth TB/s", "inference ms", "training step ms"],
                    [[f"{b['bandwidth'] / 1e12:.2f}", _ms(b[INFERENCE]), _ms(b[TRAIN_STEP])]
                     for b in bands])
    fp = report.notes["floors_py"]
    lines += ["", "For comparison, `fused_resnet.bench.floors` (the whole-model floors "
              "`fused-resnet bench` reports its fractions against: FlopCounterMode FLOPs incl. "
              "the classifier; every conv's input + output, one residual read per block and "
              "the weights; training 3x inference): "
              + "; ".join(f"{mode} {fp[mode]['flops'] / 1e9:,.1f} GFLOP, "
                          f"{fp[mode]['bytes'] / 1e9:,.2f} GB, floor "
                          f"{_ms(fp[mode]['floor_seconds'])} ms" for mode in fp) + "."]
    return lines


def _blocks_section(report: Report) -> list:
    rows = []
    for b in report.blocks:
        modes = b["modes"]
        rows.append([b["name"], b["input"], *(_us(modes[m]["floor_seconds"])
                                              for m in MODES + (TRAIN_STEP,)),
                     *_measured_cells(b["measured"].get(INFERENCE)),
                     *_measured_cells(b["measured"].get(TRAIN_STEP))])
    return ["", "## Per block (floor µs, sum of the block's ops)", ""] + _table(
        ["block", "input", "inference", "training fwd", "training bwd", "training step",
         "measured inference µs", "fraction", "measured training step µs", "fraction"], rows)


ROW_HEADER = ["block", "layer", "op", "shape (in -> out, kxk/stride)", "GFLOP", "MB",
              "FLOP/B", "floor µs", "bound", "measured µs", "fraction"]


def _largest_section(report: Report, peaks: Peaks, count: int = 12) -> list:
    fused = [r for r in report.rows if r.path == FUSED]
    largest = sorted(fused, key=lambda r: -peaks.floor_seconds(*r.cost))[:count]
    return ["", f"## The {count} largest op floors", ""] + _table(
        ["mode"] + ROW_HEADER, [[r.mode] + _row_cells(r, peaks) for r in largest])


def render_markdown(report: Report, command: str) -> str:
    peaks = Peaks(report.config["peak_flops"], report.config["bandwidth"])
    lines = _header(report, command) + _totals_section(report) + _blocks_section(report) \
        + _largest_section(report, peaks)
    for mode in MODES:
        lines += ["", f"## Ops: {mode}", ""]
        lines += _table(ROW_HEADER, [_row_cells(r, peaks) for r in report.rows
                                     if r.mode == mode])
    return "\n".join(lines) + "\n"


def _row_json(row: Row, peaks: Peaks) -> dict:
    return {"block": row.block, "layer": row.layer, "mode": row.mode, "op": row.op,
            "path": row.path, "shape": row.shape, "flops": row.cost.flops,
            "bytes": row.cost.bytes, "intensity": row.cost.flops / row.cost.bytes,
            "floor_seconds": peaks.floor_seconds(*row.cost), "bound": peaks.bound(*row.cost),
            "measured": row.measured}


def render_json(report: Report, command: str) -> str:
    peaks = Peaks(report.config["peak_flops"], report.config["bandwidth"])
    data = {"command": command, "config": report.config, "assumptions": ASSUMPTIONS,
            "totals": report.totals, "totals_measured": report.totals_measured,
            "blocks": report.blocks, "notes": report.notes,
            "measured": report.measured, "rows": [_row_json(r, peaks) for r in report.rows]}
    return json.dumps(data, indent=1) + "\n"


# ---- command line -----------------------------------------------------------------------------
def _package_doc() -> str:
    """The package's docstring (the table's description and usage), read when the parser is
    built: by then the package has been imported, since this module lives inside it."""
    return importlib.import_module(__package__).__doc__


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fused_resnet.bench.roofline",
                                     description=_package_doc().split("\n\n")[0])
    parser.add_argument("--model", default="resnet50",
                        help="a torchvision ResNet constructor name (default resnet50)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dtype", choices=sorted(ELEMENT_SIZES), default="bf16")
    parser.add_argument("--bandwidth", type=float, default=BANDWIDTH,
                        help="bytes/s (3.0e12 and 3.35e12 measured on H100s; 4.3e12 H200)")
    parser.add_argument("--flops", type=float, default=PEAK_FLOPS, help="peak FLOP/s")
    parser.add_argument("--device-name", default="H100",
                        help="measured rows count only from a device whose name contains "
                             "this (case-insensitive); also the title")
    parser.add_argument("--measured", nargs="*", default=[], metavar="JSON",
                        help="pytest-benchmark JSON of benchmarks/test_bench_{conv,"
                             "bn_add_relu,blocks}.py, or fused-resnet bench's results.json")
    parser.add_argument("-o", "--output", help="markdown here (default: stdout)")
    parser.add_argument("--json", help="also the JSON here")
    return parser.parse_args(argv)


def command_line(argv: list) -> str:
    return "python -m fused_resnet.bench.roofline " + shlex.join(argv)


def report_from_args(args: argparse.Namespace) -> Report:
    return build(args.model, args.batch_size, args.image_size, args.dtype,
                 Peaks(args.flops, args.bandwidth), args.device_name, args.measured)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    report = report_from_args(args)
    command = command_line(argv)
    text = render_markdown(report, command)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        print(text, end="")
    if args.json:
        with open(args.json, "w") as f:
            f.write(render_json(report, command))
    return 0

