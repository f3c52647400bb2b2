"""What a measured choice is keyed on, which paths it may choose from, how its Triton tiles
are compiled, and the `fused-resnet tune` command that makes every choice up front.

Choices are measured on CUDA devices only; here the measuring is driven on the CPU through the
real ops.conv.choose_path and fused_resnet.tuning code by replacing tuning.measured_on,
can_measure and the timer (the documented test hook), with the Triton conv kept out where it
would only slow the interpreter down (FUSED_RESNET_CONV_PATHS)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fused_resnet import tuning
from fused_resnet.ops import conv as conv_ops

CL = torch.channels_last


@pytest.fixture
def measuring(monkeypatch, tmp_path):
    """Choices measured on the CPU: a timer that runs nothing and ranks candidates in the order
    they are timed; a fresh cache. Yields the list of candidates timed."""
    timed = []

    def timer(fn):
        timed.append(fn)
        return float(len(timed))

    monkeypatch.setenv("FUSED_RESNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FUSED_RESNET_TUNING_QUIET", raising=False)
    monkeypatch.setattr(tuning, "_cache", {})
    monkeypatch.setattr(tuning, "_disk", None)
    monkeypatch.setattr(tuning, "measured_on", lambda device: True)
    monkeypatch.setattr(tuning, "can_measure", lambda: True)
    monkeypatch.setattr(tuning, "cuda_median_ms", timer)
    monkeypatch.setattr(conv_ops, "_agreed", {})
    monkeypatch.setenv("FUSED_RESNET_CONV_PATHS", "library,mkldnn")
    return timed


def _progress_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines()
            if line.startswith("fused_resnet tuning:")]


def _layer1(n=1, size=8):
    """layer1 of a ResNet-50 at a small image: the input of conv3 and of the downsample (after
    the stem and conv2 both have 64 channels at 56x56 there), their weights, and a residual."""
    x = torch.randn(n, 64, size, size).contiguous(memory_format=CL)
    w = torch.randn(256, 64, 1, 1) / 8
    return x, w, torch.randn(256), torch.randn(n, 256, size, size).contiguous(memory_format=CL)


def test_downsample_and_conv3_of_layer1_are_measured_apart(measuring, capsys):
    """Under autocast eval the downsample (bias only) and conv3 (bias, residual, ReLU) have the
    same input, weight, stride and padding: the epilogue tells their choices apart."""
    x, w, b, r = _layer1()
    args = (x, w, [1, 1], [0, 0], [1, 1], 1, None, b)
    for _ in range(2):
        conv_ops._epilogue_forward(*args, None, False)  # downsample
        conv_ops._epilogue_forward(*args, r, True)  # conv3
    keys = [k for k in tuning._cache if k[0] == "epilogue"]
    assert len(keys) == 2 and len(measuring) == 4, keys
    lines = _progress_lines(capsys)
    assert len(lines) == 2, lines
    assert "residual=" not in lines[0] and "relu=True" not in lines[0], lines[0]
    assert "residual=('float32', 'channels_last')" in lines[1] and "relu=True" in lines[1]


def test_dual_op_keys_hold_the_shortcut_geometry(measuring):
    x, w, b, _ = _layer1()
    ws = torch.randn(256, 64, 1, 1) / 8
    same_grid = torch.randn(1, 64, 8, 8).contiguous(memory_format=CL)
    strided = torch.randn(1, 64, 16, 16).contiguous(memory_format=CL)
    for shortcut, stride in ((same_grid, 1), (strided, 2), (same_grid.contiguous(), 1)):
        conv_ops._dual_forward(x, w, [1, 1], [0, 0], shortcut, ws, stride, b, True)
    shortcuts = {dict(k[10])["shortcut"] for k in tuning._cache if k[0] == "dual"}
    assert shortcuts == {((1, 64, 8, 8), ("float32", "channels_last"), (256, 64, 1, 1), 1),
                         ((1, 64, 16, 16), ("float32", "channels_last"), (256, 64, 1, 1), 2),
                         ((1, 64, 8, 8), ("float32", "nchw"), (256, 64, 1, 1), 1)}


def test_conv_paths_restrict_the_candidates(measuring, monkeypatch, capsys):
    x, w, b, r = _layer1()
    args = (x, w, [1, 1], [0, 0], [1, 1], 1, None, b, r, True)
    candidates, conv = conv_ops.dispatch_plan("conv2d_epilogue", *args)
    assert {"library", "mkldnn"} <= set(candidates)
    choose = lambda: conv_ops.choose_path("epilogue", candidates, *conv)  # noqa: E731
    monkeypatch.setenv("FUSED_RESNET_CONV_PATHS", "library")
    assert choose() == "library"
    monkeypatch.setenv("FUSED_RESNET_CONV_PATHS", " mkldnn ")
    assert choose() == "mkldnn"  # the one allowed path that can run, checked against library
    assert not measuring and not _progress_lines(capsys)  # one candidate: nothing to measure
    assert all(key[-1][0] == "paths" for key, _ in conv_ops._agreed)  # restriction in the key
    monkeypatch.setenv("FUSED_RESNET_CONV_PATHS", "library,mkldnn")
    assert choose() == "library" and len(measuring) == 2  # timed in order: library first


@pytest.mark.parametrize("value", ["library,cudnn", "Triton", "library;triton"])
def test_unknown_conv_paths_are_rejected(measuring, monkeypatch, value):
    monkeypatch.setenv("FUSED_RESNET_CONV_PATHS", value)
    x, w, b, r = _layer1()
    with pytest.raises(ValueError, match="FUSED_RESNET_CONV_PATHS.*unknown conv path.*known: "
                                         "library, triton, cutlass, mkldnn"):
        conv_ops._epilogue_forward(x, w, [1, 1], [0, 0], [1, 1], 1, None, b, r, True)


def test_conv_paths_reach_the_cpu_inference_fast_path(monkeypatch):
    x, w, _, _ = _layer1()
    monkeypatch.delenv("FUSED_RESNET_CONV_PATHS", raising=False)
    if not conv_ops.mkldnn_chosen(x, w):
        pytest.skip("oneDNN's fused conv cannot run here")
    monkeypatch.setenv("FUSED_RESNET_CONV_PATHS", "library,triton")
    assert not conv_ops.mkldnn_chosen(x, w)


# ---- tile configs -------------------------------------------------------------------------------
def test_at_most_three_tile_configs_are_measured():
    from fused_resnet.kernels import conv

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for c_in, c_out in ((8, 64), (64, 64), (64, 256), (256, 64), (512, 2048)):
            for flags in ({}, {"residual": True}, {"prologue": True}):
                configs = conv.gpu_configs(c_in, c_out, dtype, **flags)
                assert 1 <= len(configs) <= conv.MAX_MEASURED
                areas = [m * n for m, n, *_ in configs]
                assert areas == sorted(set(areas), reverse=True)  # one per area, largest first
    # ResNet-50 layer4 at batch 256 (M = 12,544): every tile fills 132 multiprocessors...
    assert conv.gpu_configs(512, 2048, rows=12544, sms=132)[0][:2] == (128, 256)
    # ...at batch 1 (M = 49) only the smallest gives each of them a program
    assert conv.gpu_configs(512, 512, rows=49, sms=132) == [(64, 64, 64, 4, 4)]
    # static analysis compiles every config some problem could measure
    assert len(conv.gpu_configs(64, 256, limit=None)) == 4


_FAKE_SM90 = textwrap.dedent("""
    # A Triton driver that compiles for sm_90 and cannot launch: the JIT's warmup (compile
    # only) runs as on an H100, without one.
    import threading, time
    import torch, triton, triton.compiler
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class FakeSm90:
        def get_current_device(self):
            return 0
        def get_current_stream(self, device=None):
            return 0
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)
        def __getattr__(self, name):
            raise AttributeError(f"no {name}: this driver compiles only")

    driver.set_active(FakeSm90())
    compiles = []  # (thread, BLOCK_M, BLOCK_N, start, end)
    real_compile = triton.compiler.compile

    def counting_compile(src, *args, **kwargs):
        start = time.perf_counter()
        kernel = real_compile(src, *args, **kwargs)
        names = [p.name for p in src.fn.params]
        block = tuple(src.constants[(names.index(n),)] for n in ("BLOCK_M", "BLOCK_N"))
        compiles.append((threading.get_ident(), *block, start, time.perf_counter()))
        return kernel

    triton.compiler.compile = counting_compile
""")


def test_tile_configs_compile_in_parallel_once_each(tmp_path):
    """The conv's tile choice on an sm_90 target (meta tensors, every config the tuner could
    measure for this shape): prepare compiles each config once, all at the same time on pool
    threads, before any is timed; the timed launches compile nothing more."""
    script = _FAKE_SM90 + textwrap.dedent("""
        from fused_resnet import tuning
        from fused_resnet.kernels import conv

        timed = []
        tuning.can_measure = lambda: True
        tuning.cuda_median_ms = lambda fn: timed.append(len(compiles)) or 1.0
        x = torch.empty(2, 64, 16, 16, dtype=torch.float16, device="meta").contiguous(
            memory_format=torch.channels_last)
        w = torch.empty(3, 3, 64, 64, dtype=torch.float16, device="meta")
        try:
            conv.conv2d_nhwc(x, w, 1, 1, relu=True)
        except AttributeError as exc:  # the chosen config's launch: this driver cannot
            assert "compiles only" in str(exc), exc
        configs = conv.gpu_configs(64, 64, torch.float16, limit=None)
        print(json.dumps({"configs": [list(c[:2]) for c in configs], "timed": timed,
                          "main": threading.get_ident(), "compiles": compiles}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(FUSED_RESNET_CACHE_DIR=str(tmp_path / "cache"),
               TRITON_CACHE_DIR=str(tmp_path / "triton"))
    result = subprocess.run([sys.executable, "-c", "import json\n" + script], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    compiled = sorted([c[1], c[2]] for c in out["compiles"])
    assert compiled == sorted(out["configs"]) and len(compiled) == 2  # each config once
    assert all(c[0] != out["main"] for c in out["compiles"])  # on the pool's threads
    if (os.cpu_count() or 1) > 1:  # the pool has min(configs, cores) threads: overlapping
        (_, _, _, _, first_end), (_, _, _, second_start, _) = sorted(
            out["compiles"], key=lambda c: c[3])[:2]
        assert second_start < first_end, out["compiles"]
    assert out["timed"] == [2, 2]  # every compile done before the first timing


# ---- fused-resnet tune ------------------------------------------------------------------------
_DRIVER = textwrap.dedent("""
    # fused-resnet tune with the measuring driven on the CPU (see the module docstring)
    import sys
    from fused_resnet import cli, tuning

    timed = []
    tuning.measured_on = lambda device: True
    tuning.can_measure = lambda: True
    tuning.cuda_median_ms = lambda fn: timed.append(fn) or float(len(timed))
    code = cli.main(sys.argv[1:])
    print(f"TIMED {len(timed)}")
    sys.exit(code)
""")


def _tune(tmp_path, *args):
    env = {**os.environ, "FUSED_RESNET_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("FUSED_RESNET_CONV_PATHS", None)
    env.pop("FUSED_RESNET_TUNING_QUIET", None)
    return subprocess.run([sys.executable, "-c", _DRIVER, "tune", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def test_tune_writes_a_cache_a_second_process_uses_without_measuring(tmp_path):
    args = ("--model", "cifar_resnet8", "--batch-size", "2", "--image-size", "8", "--dtype",
            "fp32", "--mode", "train", "--device", "cpu")
    first = _tune(tmp_path, *args)
    assert first.returncode == 0, first.stdout + first.stderr[-3000:]
    lines = [line for line in (first.stdout + first.stderr).splitlines()
             if "fused_resnet tuning:" in line]
    with open(tmp_path / "cache" / "tuning.json") as f:
        entries = json.load(f)
    # one progress line per measured key, each key written once, both candidates timed
    assert len(lines) == len(entries) > 0, lines
    assert f"TIMED {2 * len(entries)}" in first.stdout
    assert f"{len(entries)} choice(s) measured" in first.stdout
    assert all(e["stack"] == entries[next(iter(entries))]["stack"] for e in entries.values())
    second = _tune(tmp_path, *args)
    assert second.returncode == 0, second.stdout + second.stderr[-3000:]
    assert "TIMED 0" in second.stdout and "0 choice(s) measured" in second.stdout
    assert "fused_resnet tuning:" not in second.stdout + second.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_tune_without_cuda_says_there_is_nothing_to_measure(tmp_path, monkeypatch, capsys):
    from fused_resnet import cli

    monkeypatch.setenv("FUSED_RESNET_CACHE_DIR", str(tmp_path / "cache"))
    assert cli.main(["tune", "--model", "resnet18"]) == 1
    assert "nothing to measure on cpu" in capsys.readouterr().out
    assert not (tmp_path / "cache").exists()
