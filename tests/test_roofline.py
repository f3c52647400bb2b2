"""The roofline table (fused_resnet.bench.roofline): FLOPs against torch's flop counter, bytes of
known rows worked out by hand, the floor formula, measured-time matching (device, dtype,
provider) and that the committed table is what its command produces now. Shapes only: the
model runs on the meta device, so this takes a few seconds."""

import json
import pathlib
import shlex

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fused_resnet.bench import roofline as rl

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMITTED = REPO / "benchmarks" / "results" / "roofline-resnet50-bf16-b256-H100"
H100 = "NVIDIA H100 80GB HBM3"
E = 2  # bf16


@pytest.fixture(scope="module")
def convs():
    return rl.trace_convs(rl.meta_model("resnet50"), 256, 224)


@pytest.fixture(scope="module")
def report():
    return rl.build()


def _row(report, layer, mode, op_prefix):
    found = [r for r in report.rows
             if r.layer == layer and r.mode == mode and r.op.startswith(op_prefix)]
    assert len(found) == 1, (layer, mode, op_prefix, found)
    return found[0]


def test_every_conv_of_resnet50_is_found(convs):
    # stem + 16 bottlenecks x 3 + 4 projections
    assert len(convs) == 1 + 16 * 3 + 4
    assert convs["layer2.0.conv2"].describe() == "256x128x56x56 -> 256x128x28x28, 3x3/2"
    assert convs["layer4.0.downsample.0"].stride == (2, 2)


def test_conv_flops_equal_torch_flop_counter(convs):
    for conv in convs.values():
        x = torch.empty(conv.batch, conv.c_in, conv.height, conv.width, device="meta")
        w = torch.empty(conv.c_out, conv.c_in // conv.groups, *conv.kernel, device="meta")
        with FlopCounterMode(display=False) as counter:
            F.conv2d(x, w, None, conv.stride, conv.padding, 1, conv.groups)
        row_flops = rl.conv2d_epilogue_cost(conv, E, residual=False).flops
        assert row_flops == counter.get_total_flops(), conv.name


def test_whole_network_inference_flops_match_flop_counter_but_the_classifier():
    batch = 2
    model = rl.meta_model("resnet50")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.empty(batch, 3, 224, 224, device="meta"))
    classifier = 2 * batch * 2048 * 1000  # fc; the pools count no FLOPs there
    ours = rl.build(batch_size=batch).totals
    assert ours[rl.INFERENCE]["flops"] + classifier == counter.get_total_flops()
    # a training step: forward, then dgrad + wgrad of every conv but the stem's dgrad
    stem = rl.trace_convs(model, batch, 224)["conv1"].flops
    assert ours[rl.TRAIN_FWD]["flops"] == ours[rl.INFERENCE]["flops"]
    assert ours[rl.TRAIN_BWD]["flops"] == 2 * ours[rl.INFERENCE]["flops"] - stem


def test_bytes_of_known_rows_by_hand(report):
    n = 256
    # layer3.1.conv3, inference: 1x1 256 -> 1024 at 14x14, identity residual, ReLU
    row = _row(report, "layer3.1.conv3", rl.INFERENCE, "conv2d_epilogue")
    x, w, out = n * 256 * 14 * 14, 1024 * 256, n * 1024 * 14 * 14
    assert row.cost.bytes == (x + w + out + out) * 2 + 1024 * 4  # + residual, + fp32 shift
    assert row.cost.flops == 2 * n * 14 * 14 * 1024 * 256

    # layer2.0 conv3 + projection as one GEMM: the stride-2 1x1 reads a quarter of its input
    row = _row(report, "layer2.0.conv3 + layer2.0.downsample.0", rl.INFERENCE,
               "conv2d_dual_epilogue")
    y, w3 = n * 128 * 28 * 28, 512 * 128
    x_sampled, wd, out = n * 256 * 28 * 28, 512 * 256, n * 512 * 28 * 28
    assert row.cost.bytes == (y + w3 + x_sampled + wd + out) * 2 + 512 * 4
    assert row.cost.flops == 2 * n * 28 * 28 * 512 * (128 + 256)

    # layer1.1's last BN + add + ReLU backward: grad, z and the 1-bit mask read by both passes,
    # grad_z and grad_residual written, 12 fp32 per-channel vectors
    row = _row(report, "layer1.1.conv3", rl.TRAIN_BWD, "bn_add_relu backward")
    numel = n * 256 * 56 * 56
    assert row.cost.bytes == 2 * (2 * numel * 2 + numel // 8) + 2 * numel * 2 + 12 * 256 * 4
    assert row.cost.flops == 0


def test_floor_is_the_larger_of_the_two_terms(report):
    peaks = rl.Peaks(flops=100.0, bandwidth=10.0)
    assert peaks.floor_seconds(1000, 10) == 10.0 and peaks.bound(1000, 10) == "compute"
    assert peaks.floor_seconds(10, 1000) == 100.0 and peaks.bound(10, 1000) == "memory"
    data = json.loads(rl.render_json(report, "cmd"))
    for row in data["rows"]:
        compute, memory = row["flops"] / rl.PEAK_FLOPS, row["bytes"] / rl.BANDWIDTH
        assert row["floor_seconds"] == max(compute, memory)
        assert row["bound"] == ("compute" if compute >= memory else "memory")
    totals = data["totals"][rl.TRAIN_STEP]
    assert totals["floor_seconds"] == pytest.approx(
        data["totals"][rl.TRAIN_FWD]["floor_seconds"]
        + data["totals"][rl.TRAIN_BWD]["floor_seconds"])


def _bench(op, mode, provider, seconds, device=H100, dtype="bfloat16", **fields):
    info = {"op": op, "mode": mode, "provider": provider, "device": device, "dtype": dtype,
            **fields.pop("info", {})}
    return {"extra_info": info, "params": fields.pop("params", {}),
            "stats": {"median": seconds, "iqr": 0.0, "rounds": 20}}


def _conv_bench(provider, seconds, device=H100, dtype="bfloat16", batch=256):
    layer = ["layer3.conv3", 256, 1024, 1, 1, 0, 14]
    return _bench("conv", "eval", provider, seconds, device, dtype,
                  info={"shape": [layer[0]], "images_per_s": batch / seconds},
                  params={"layer": layer, "mode": "eval", "provider": provider})


@pytest.fixture
def measured_json(tmp_path):
    benchmarks = [
        _conv_bench("fused-triton", 200e-6),
        _conv_bench("fused-cpp", 150e-6),              # the fastest fused provider: used
        _conv_bench("eager", 100e-6),                  # not the project's op: ignored
        _conv_bench("fused", 1e-6, device="cpu: x86_64 (2 threads)"),  # CPU: never used
        _conv_bench("fused", 1e-6, dtype="float32"),   # other dtype: not used
        _bench("bn_add_relu", "train_fwdbwd", "fused", 2e-3,
               info={"shape": [256, 1024, 14, 14]}),
        _bench("resnet50 block", "eval_fwd", "fused", 400e-6,
               info={"shape": ["layer3.1 256x1024x14x14"]}),
    ]
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"benchmarks": benchmarks}))
    suite = {"environment": {"device": H100}, "command": "fused-resnet bench",
             "config": {"image_size": 224, "batch_size": 256, "dtype": "bf16"},
             "rows": [{"model": "resnet50", "mode": "inference", "provider": "fused",
                       "status": "ok", "median_s": 10e-3}]}
    suite_path = tmp_path / "results.json"
    suite_path.write_text(json.dumps(suite))
    return str(path), str(suite_path)


def test_measured_time_fills_the_fraction_of_floor(measured_json):
    report = rl.build(measured_paths=measured_json)
    peaks = rl.Peaks()
    convs = rl.trace_convs(rl.meta_model("resnet50"), 256, 224)
    # every layer3 identity block's conv3 has the benchmarked geometry
    for index in range(1, 6):
        row = _row(report, f"layer3.{index}.conv3", rl.INFERENCE, "conv2d_epilogue")
        assert row.measured["seconds"] == 150e-6 and row.measured["provider"] == "fused-cpp"
        # the benchmark adds a residual to every layer: its floor is of that work
        conv = convs[row.layer]
        floor = peaks.floor_seconds(*rl.conv2d_epilogue_cost(conv, E, residual=True))
        assert row.measured["fraction_of_floor"] == pytest.approx(floor / 150e-6)
    # the bn_add_relu benchmark's fwd+bwd: statistics pass, apply with mask, both backward
    # passes, all memory-bound
    bwd = _row(report, "layer3.2.conv3", rl.TRAIN_BWD, "bn_add_relu backward")
    numel, c = 256 * 1024 * 14 * 14, 1024
    timed = (numel * 2 + 4 * c * 4) + (3 * numel * 2 + numel // 8 + 2 * c * 4) \
        + (2 * (2 * numel * 2 + numel // 8) + 2 * numel * 2 + 12 * c * 4)
    assert bwd.measured["fraction_of_floor"] == pytest.approx(timed / rl.BANDWIDTH / 2e-3)
    block = next(b for b in report.blocks if b.get("name") == "layer3.1")
    assert block["measured"][rl.INFERENCE]["fraction_of_floor"] == pytest.approx(
        block["modes"][rl.INFERENCE]["floor_seconds"] / 400e-6)
    assert report.totals_measured[rl.INFERENCE]["fraction_of_floor"] == pytest.approx(
        report.totals[rl.INFERENCE]["floor_seconds"] / 10e-3)
    # a layer no benchmark matched says so
    other = _row(report, "layer1.0.conv1", rl.INFERENCE, "conv2d_epilogue")
    assert other.measured is None
    text = rl.render_markdown(report, "cmd")
    assert rl.NOT_MEASURED in text and "fused-cpp" in text


def test_cpu_rows_are_never_used(measured_json, tmp_path):
    cpu_only = tmp_path / "cpu.json"
    # a CPU row that otherwise matches exactly (bf16, batch 256, same layer)
    cpu_only.write_text(json.dumps({"benchmarks": [
        _conv_bench("fused", 150e-6, device="cpu: x86_64 (2 threads)")]}))
    report = rl.build(measured_paths=[str(cpu_only)])
    assert all(row.measured is None for row in report.rows)
    assert report.measured["skipped"] == {"other device (cpu: x86_64 (2 threads))": 1}
    with_gpu = rl.build(measured_paths=measured_json)
    assert with_gpu.measured["skipped"]["other device (cpu: x86_64 (2 threads))"] == 1
    assert all(not r.measured or r.measured["seconds"] != 1e-6 for r in with_gpu.rows)


def test_the_committed_cpu_reports_parse_and_are_not_used():
    """The real JSON the benchmark suites wrote (format check), all CPU: none fills a row."""
    results = REPO / "benchmarks" / "results"
    kinds = {"conv-cpu-2cores-2026-11-23.json": {"conv", "dual"},
             "bn_add_relu-cpu-2cores-2026-11-23.json": {"bn_add_relu"},
             "blocks-cpu-2cores-2026-11-23.json": {"block"},
             "bench-cpu-2cores-2026-12-01/results.json": {"model"},
             "bench-cpu-2cores-224px-2026-12-01/results.json": {"model"}}
    paths = [str(results / name) for name in kinds]
    for path, expected in zip(paths, kinds.values()):
        assert {m.kind for m in rl.load_measurements(path)} == expected
    report = rl.build(measured_paths=paths)
    assert report.measured["used"] == 0 and report.measured["rows_filled"] == 0
    assert not report.totals_measured and not any(b["measured"] for b in report.blocks)


def test_committed_table_is_what_its_command_produces_now():
    markdown = (COMMITTED.with_suffix(".md")).read_text()
    first = next(line for line in markdown.splitlines() if line.startswith("Generated by"))
    command = first.split("`")[1]
    argv = shlex.split(command)[3:]  # after "python -m fused_resnet.bench.roofline"
    assert rl.command_line(argv) == command
    args = rl.parse_args(argv)
    assert args.output == "benchmarks/results/roofline-resnet50-bf16-b256-H100.md"
    assert args.json == "benchmarks/results/roofline-resnet50-bf16-b256-H100.json"
    report = rl.report_from_args(args)
    assert rl.render_markdown(report, command) == markdown, \
        f"regenerate it from the repository root: {command}"
    assert rl.render_json(report, command) == COMMITTED.with_suffix(".json").read_text()


def test_torchvision_resnet_walk_is_not_hard_coded():
    """The same walk serves a BasicBlock network: no dual GEMM, a projection conv instead."""
    model = rl.meta_model("resnet18")
    blocks = rl.residual_blocks(model, rl.trace_convs(model, 2, 64))
    assert [b.name for b in blocks][:3] == ["layer1.0", "layer1.1", "layer2.0"]
    assert not any(b.dual for b in blocks)
    rows = rl.inference_rows(blocks[2], E)
    assert [r.op for r in rows] == ["conv2d_epilogue (relu)", "conv2d_epilogue (no relu)",
                                    "conv2d_epilogue (residual, relu)"]
