"""The Triton kernels compile for the H100 (sm_90, fp16 and bf16) with no GPU present: no
compile error, no register spills, shared memory within the H100's limit."""

import json
import os
import subprocess
import sys

import pytest

from triton_aot import H100_MAX_SHARED_BYTES

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "triton_aot.py")
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_every_variant_compiled(compiled):
    names = {(r["kernel"], r["dtype"]) for r in compiled}
    for kernel in ("apply", "grad_apply", "stats_partial_nchw", "stats_partial_nhwc",
                   "grad_reduce_partial_nchw", "grad_reduce_partial_nhwc"):
        for dtype in ("fp16", "bf16"):
            assert (kernel, dtype) in names
    from fused_resnet.kernels import conv

    for kernel in ("conv1x1_bn_relu", "conv3x3_bn_add_relu", "conv3x3_stats", "stem7x7_cin3",
                   "conv1x1_plus_shortcut"):
        for bm, bn, bk, warps in conv.gpu_configs(3 if kernel == "stem7x7_cin3" else 64):
            for dtype in ("fp16", "bf16"):
                assert (f"{kernel}@{bm}x{bn}x{bk}w{warps}", dtype) in names
    failed = [r for r in compiled if not r["ok"]]
    assert not failed, failed


def test_no_spills_and_shared_memory_fits(compiled):
    for r in compiled:
        if not r["ok"]:
            continue
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["shared"] <= H100_MAX_SHARED_BYTES, r
