"""`fused-resnet bench` end to end on a tiny CPU configuration: exit status, the JSON schema,
that every provider was checked before it was timed, that a wrong or crashing provider is
reported and not timed, and that the report (markdown + PNGs) renders from a recorded JSON."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fused_resnet import cli
from fused_resnet.bench import providers, report, suite

TINY = ["--model", "resnet18", "--batch-size", "2", "--image-size", "32", "--warmup", "1",
        "--repeats", "2", "--check-batch", "4", "--device", "cpu"]
ROW_KEYS = {"model", "mode", "provider", "status", "check", "median_s", "min_s", "max_s",
            "iqr_s", "samples_s", "latency_ms", "images_per_s", "images_per_s_range",
            "peak_memory_bytes", "floor_bytes", "floor_flops", "fraction_of_memory_floor",
            "fraction_of_compute_floor", "speedup_vs_eager_cl"}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One tiny bench run through the CLI (module-scoped: several tests read its output)."""
    out = tmp_path_factory.mktemp("bench")
    status = cli.main(["bench", *TINY, "--providers", "eager", "eager_cl", "fused",
                       "fused_triton", "--out", str(out)])
    with open(out / "results.json") as f:
        return status, json.load(f), out


def test_bench_runs_and_writes_every_output(recorded):
    status, result, out = recorded
    assert status == 0
    assert set(result) >= {"environment", "config", "ceilings", "rows", "command"}
    assert set(result["environment"]) >= {"device", "torch", "cuda", "triton", "fused_resnet",
                                          "date"}
    assert result["ceilings"]["copy_bandwidth_gbps"] > 0
    assert result["ceilings"]["matmul_tflops"] > 0
    for name in ("report.md", "throughput.png", "memory.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "throughput.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_every_timed_provider_was_checked_first(recorded):
    _, result, _ = recorded
    rows = {(r["provider"], r["mode"]): r for r in result["rows"]}
    for provider in ("eager", "eager_cl", "fused"):
        for mode in ("inference", "training"):
            row = rows[(provider, mode)]
            assert row["status"] == "ok", row
            assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
            assert row["check"]["ok"] and row["check"]["logits_error"] <= \
                row["check"]["logits_allowed"]
            assert row["images_per_s"] == pytest.approx(2 / row["median_s"])
    assert "grad_error" in rows[("fused", "training")]["check"]
    assert rows[("fused", "training")]["saved_activation_bytes"] > 0
    assert rows[("eager_cl", "inference")]["speedup_vs_eager_cl"] == 1.0
    for mode in ("inference", "training"):  # the speed-up's spread, round by round
        base, fused = rows[("eager_cl", mode)]["samples_s"], rows[("fused", mode)]["samples_s"]
        ratios = sorted(b / f for b, f in zip(base, fused))  # two rounds: the quartiles are
        q1, q3 = rows[("fused", mode)]["speedup_rounds_iqr"]  # 3/4 low + 1/4 high and back
        assert q1 == pytest.approx(0.75 * ratios[0] + 0.25 * ratios[1])
        assert q3 == pytest.approx(0.25 * ratios[0] + 0.75 * ratios[1])
        assert "speedup_rounds_iqr" not in rows[("eager_cl", mode)]
    triton = rows[("fused_triton", "inference")]
    assert triton["status"] == "unavailable" and "CUDA" in triton["reason"]


def test_report_renders_from_the_recorded_json(recorded, tmp_path):
    _, result, out = recorded
    subprocess.run([sys.executable, "-m", "fused_resnet.bench.report",
                    str(out / "results.json"), "-o", str(tmp_path)], check=True)
    text = (tmp_path / "report.md").read_text()
    assert text == report.markdown(result)
    assert "### resnet18, training" in text and "| fused | ok (" in text
    assert "## Goals" in text
    assert (tmp_path / "throughput.png").exists() and (tmp_path / "memory.png").exists()


_build = providers.build  # the real one (a test monkeypatches providers.build)


def _broken_build(name, model, device, dtype):
    """'broken': the fused model with one BN's scale off by 20%; 'crashing': raises."""
    if name == "crashing":
        runner = _build("eager", model, device, dtype)
        runner.model = lambda x: (_ for _ in ()).throw(RuntimeError("kernel exploded"))
        return runner
    runner = _build("fused" if name == "broken" else name, model, device, dtype)
    if name == "broken":
        with torch.no_grad():
            runner.module.layer3[0].bn2.weight.mul_(1.2)
    return runner


def test_wrong_and_crashing_providers_are_reported_not_timed(tmp_path):
    config = suite.Config(models=["resnet18"], modes=["inference", "training"], batch_size=2,
                          image_size=32, warmup=0, repeats=1, check_batch=4,
                          providers=["eager_cl", "broken", "crashing"], out_dir=str(tmp_path),
                          plots=False)
    result = suite.run(config, build=_broken_build)
    rows = {(r["provider"], r["mode"]): r for r in result["rows"]}
    for mode in ("inference", "training"):
        assert rows[("eager_cl", mode)]["status"] == "ok"
        broken = rows[("broken", mode)]
        assert broken["status"] == "wrong" and not broken["check"]["ok"]
        assert "median_s" not in broken and "images_per_s" not in broken
        crashing = rows[("crashing", mode)]
        assert crashing["status"] == "error" and "kernel exploded" in crashing["reason"]
    text = report.markdown(result)
    assert "**wrong**" in text and "**error**" in text


def test_cli_exit_status_flags_a_wrong_provider(monkeypatch, tmp_path):
    monkeypatch.setattr(providers, "build", _broken_build)
    monkeypatch.setattr(providers, "ALL_PROVIDERS", providers.ALL_PROVIDERS + ("broken",))
    argv = ["bench", *TINY, "--mode", "inference", "--providers", "eager_cl", "broken",
            "--out", str(tmp_path), "--no-plots"]
    assert cli.main(argv) == 1


@pytest.mark.slow
def test_compile_providers(tmp_path):
    """torch.compile of the eager and of the fused model, inference: checked and timed."""
    config = suite.Config(models=["resnet18"], modes=["inference"], batch_size=2, image_size=32,
                          warmup=1, repeats=1, check_batch=2,
                          providers=["eager_cl", "compile", "fused_compile"],
                          out_dir=str(tmp_path), plots=False)
    result = suite.run(config)
    assert [r["status"] for r in result["rows"]] == ["ok", "ok", "ok"], result["rows"]


def test_python_module_entry_point_shows_bench():
    out = subprocess.run([sys.executable, "-m", "fused_resnet", "bench", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--providers" in out and "--max-autotune" in out
    assert os.path.basename(sys.executable)


def test_committed_bench_reports_render():
    """Every committed `fused-resnet bench` result still renders with today's report code."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "benchmarks", "results")
    runs = [d for d in os.listdir(root) if d.startswith("bench-")]
    assert runs, "no committed fused-resnet bench result"
    for run in runs:
        with open(os.path.join(root, run, "results.json")) as f:
            results = json.load(f)
        text = report.markdown(results)
        modes = {row["mode"] for row in results["rows"]}
        assert modes and "## Goals" in text, run
        for mode in modes:  # a run of one mode (e.g. inference only) has that section alone
            assert f"### resnet50, {mode}" in text, (run, mode)


@pytest.mark.parametrize("name, inside", [("fused_nchw", True), ("fused_nchw_kept", False)])
def test_fused_nchw_provider_is_the_fused_model_in_nchw(name, inside):
    """fused_nchw: fr.fuse_ of the model as given (NCHW, parameters left so), fed NCHW input,
    computing in channels_last from its stem on; fused_nchw_kept: NCHW throughout (fuse_'s
    cpu_channels_last=False). Same logits."""
    import torchvision
    import fused_resnet as fr
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    runner = providers.build(name, model, "cpu", torch.float32)
    x = runner.prepare_input(torch.randn(2, 3, 32, 32))
    assert not runner.channels_last and x.is_contiguous()
    assert isinstance(runner.module.layer1[0], fr.FusedBasicBlock)
    assert runner.module.conv1.weight.is_contiguous()  # not converted to channels_last
    seen = []
    runner.module.layer1.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        torch.testing.assert_close(runner.inference(x), model(x), rtol=1e-4, atol=1e-4)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) == inside
