"""What was built, what fr.info() and the CLI report, and the fallback when _C is missing."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import fused_resnet as fr
from fused_resnet import _extension, backend


def _nvcc_present() -> bool:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return os.path.exists(os.path.join(home, "bin", "nvcc")) or shutil.which("nvcc") is not None


def test_cpu_kernels_built():
    assert _extension.available(), _extension.error()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fused_resnet::bn_stats_cpp", "CPU")


@pytest.mark.skipif(not _nvcc_present() or torch.version.cuda is None,
                    reason="no CUDA toolkit or CPU-only torch: CUDA kernels are not expected")
@pytest.mark.skipif(os.environ.get("FUSED_RESNET_SKIP_CUDA") == "1",
                    reason="FUSED_RESNET_SKIP_CUDA=1")
def test_cuda_kernels_compiled_when_nvcc_present():
    assert _extension.with_cuda(), "nvcc and a CUDA torch are present but _C has no CUDA kernels"
    for piece in ("bn_stats", "bn_add_relu_apply", "bn_add_relu_grad_reduce",
                  "bn_add_relu_grad_apply"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(
            f"fused_resnet::{piece}_cpp", "CUDA"), piece


def test_info_reports_backends():
    data = fr.info()
    for key in ("fused_resnet", "torch", "triton", "device", "backends", "tuning_cache",
                "conv_choices"):
        assert key in data
    assert set(data["backends"]) == {"cpu_ext", "cuda_ext", "cutlass_conv", "triton", "torch"}
    assert data["backends"]["cpu_ext"]["built"] and data["backends"]["cpu_ext"]["usable"]
    for entry in data["backends"].values():
        assert entry["usable"] or entry.get("reason")


@pytest.mark.parametrize("command", [["fused-resnet"], [sys.executable, "-m", "fused_resnet"]],
                         ids=["console_script", "python_m"])
def test_cli_info(command, tmp_path):
    # cwd outside the source tree: `python -m` must import the installed package
    if command[0] == "fused-resnet" and shutil.which("fused-resnet") is None:
        pytest.skip("console script not on PATH")
    text = subprocess.run(command + ["info"], check=True, capture_output=True, text=True,
                          cwd=tmp_path).stdout
    assert "cpu_ext" in text and "torch" in text
    data = json.loads(subprocess.run(command + ["info", "--json"], check=True,
                                     capture_output=True, text=True, cwd=tmp_path).stdout)
    assert data["backends"]["torch"]["usable"]


def test_cli_verify_cpu(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fused_resnet", "verify", "--device", "cpu"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verify: OK" in result.stdout


def test_works_without_extension(tmp_path):
    """If _C cannot be imported the package still imports, says why once, and computes the op
    through the reference backend."""
    code = """
import sys, warnings
sys.modules['fused_resnet._C'] = None   # makes `import fused_resnet._C` fail
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    import torch, fused_resnet as fr
    import torch.nn.functional as F
    x, r = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = fr.functional.batch_norm_add_relu(x, r, None, None, training=True)
    out = fr.functional.batch_norm_add_relu(x, r, None, None, training=True)
ref = torch.relu(F.batch_norm(x, None, None, training=True) + r)
assert torch.allclose(out, ref, atol=1e-5)
msgs = [str(w.message) for w in caught if 'fused_resnet._C' in str(w.message)]
assert len(msgs) == 1, msgs
info = fr.info()
assert not info['backends']['cpu_ext']['usable'] and 'could not be imported' in info['backends']['cpu_ext']['reason']
print('fallback ok')
"""
    env = {k: v for k, v in os.environ.items() if k != "FUSED_RESNET_BACKEND"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fallback ok" in result.stdout


def test_forced_backend_that_cannot_run_names_the_reason():
    reason = backend.why_not("cpp", "mps")
    assert reason
    with backend.use("cpp"), pytest.raises(RuntimeError, match="cannot run on mps"):
        backend.choose(torch.device("mps"))


def test_env_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("FUSED_RESNET_BACKEND", "torch")
    assert backend.choose(torch.device("cpu")) == "torch"
    monkeypatch.setenv("FUSED_RESNET_BACKEND", "cuda")  # alias of the C++ extension
    assert backend.requested() == "cpp"
