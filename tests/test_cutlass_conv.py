"""The CUTLASS conv path (csrc/cutlass_conv/): on this machine, the build (compiled into _C and
registered with a CUDA kernel whenever nvcc and the headers are present), the host-side plan
(which problems it takes, channel padding, alignment and size errors), the Python dispatch
rules and the on-disk cache of measured choices; on a GPU, every ResNet conv shape against
F.conv2d + the reference epilogue."""

import importlib.util
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import requires_cuda
from fused_resnet import _extension, backend, tuning
from fused_resnet.ops import conv as conv_ops

ops = torch.ops.fused_resnet
_C = _extension.load()
needs_ext = pytest.mark.skipif(_C is None, reason=f"no extension: {_extension.error()}")

# (C_in, C_out, kernel, stride, padding, H=W): every conv kind of ResNet-18/50 at 224x224
RESNET_CONVS = [(3, 64, 7, 2, 3, 224), (64, 64, 3, 1, 1, 56), (64, 64, 1, 1, 0, 56),
                (64, 256, 1, 1, 0, 56), (256, 64, 1, 1, 0, 56), (256, 128, 1, 1, 0, 56),
                (128, 128, 3, 2, 1, 56), (256, 512, 1, 2, 0, 56), (128, 512, 1, 1, 0, 28),
                (256, 256, 3, 1, 1, 14), (1024, 2048, 1, 2, 0, 14), (512, 512, 3, 1, 1, 7),
                (2048, 512, 1, 1, 0, 7), (64, 128, 3, 2, 1, 56), (128, 128, 3, 1, 1, 28)]


def _plan(n, cin, cout, k, s, p, hw, element_bytes=2, dilation=1, groups=1):
    return _C.cutlass_conv_plan(n, hw, hw, cin, cout, k, k, s, p, dilation, groups,
                                element_bytes)


@needs_ext
@pytest.mark.parametrize("cfg", RESNET_CONVS, ids=str)
def test_plan_accepts_every_resnet_conv(cfg):
    cin, cout, k, s, p, hw = cfg
    reason, padded_c, out_h, out_w, tile = _plan(256, cin, cout, k, s, p, hw)
    assert reason is None
    expected = F.conv2d(torch.empty(1, cin, hw, hw, device="meta"),
                        torch.empty(cout, cin, k, k, device="meta"), stride=s, padding=p).shape
    assert (out_h, out_w) == tuple(expected[2:])
    assert padded_c == (8 if cin == 3 else cin)  # the stem's 3 channels padded, as cuDNN does
    assert tile in (0, 1)


@needs_ext
def test_plan_tile_follows_problem_size():
    assert _plan(256, 64, 64, 3, 1, 1, 56)[4] == 0   # 802816 output pixels: large tiles
    assert _plan(1, 512, 512, 3, 1, 1, 7)[4] == 1    # 49 output pixels: small tiles


@needs_ext
@pytest.mark.parametrize("kwargs, reason", [
    (dict(element_bytes=4), "dtype"),
    (dict(groups=32), "grouped"),
    (dict(dilation=2), "dilation"),
    (dict(cout=60), "multiple of 8"),
    (dict(n=70000, hw=64, cin=256), "2 GiB"),
    (dict(hw=2, k=7, p=0), "filter larger"),
    (dict(n=0), "empty"),
])
def test_plan_rejects_with_a_reason(kwargs, reason):
    args = dict(n=8, cin=64, cout=64, k=3, s=1, p=1, hw=16)
    args.update(kwargs)
    got = _plan(**args)[0]
    assert got is not None and reason in got, got


@needs_ext
def test_cutlass_kernels_built_when_nvcc_and_headers_present():
    """setup.py builds them into _C whenever it builds the CUDA kernels and finds the headers
    (unless FUSED_RESNET_SKIP_CUTLASS=1); then the op has a CUDA kernel."""
    nvcc = shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")
    headers = importlib.util.find_spec("cutlass_library") is not None
    skipped = os.environ.get("FUSED_RESNET_SKIP_CUTLASS") == "1" or \
        os.environ.get("FUSED_RESNET_SKIP_CUDA") == "1"
    if nvcc and headers and not skipped and _C.with_cuda:
        assert _C.with_cutlass == 1
    if not _C.with_cutlass:
        pytest.skip("built without the CUTLASS kernels")
    for op in ("conv2d_bias_act_cutlass", "bn_relu_conv2d_cutlass"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_resnet::{op}", "CUDA")
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_resnet::{op}", "CPU")


def test_dispatch_rules_on_cpu():
    x = torch.randn(2, 16, 8, 8).half()
    w = torch.randn(16, 16, 3, 3).half()
    reason = conv_ops.cutlass_unsupported(x, w, [1, 1], [1, 1], [1, 1], 1)
    assert reason is not None and ("CUDA" in reason or "CUTLASS" in reason)
    with backend.use("cpp"):  # cpp on CPU: never the CUTLASS path
        assert conv_ops.conv_path(x.float(), w.float(), [1, 1], [1, 1], [1, 1], 1,
                                  cutlass=True) == "library"


@pytest.fixture
def fresh_tuning(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSED_RESNET_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_cache", {})
    monkeypatch.setattr(tuning, "_disk", None)
    return tmp_path


def test_measured_choices_persist_on_disk(fresh_tuning, monkeypatch):
    calls = []

    def timer(fn):
        calls.append(fn)
        return fn()

    key = ("epilogue", 0, torch.bfloat16, (8, 64, 56, 56), True, (64, 64, 3, 3), (1, 1), (1, 1))
    candidates = {"triton": lambda: 2.0, "cutlass": lambda: 1.0, "library": lambda: 3.0}
    assert tuning.tuned_choice(key, candidates, timer, persist=True) == "cutlass"
    assert len(calls) == 3
    path = tuning.cache_path()
    with open(path) as f:
        stored = json.load(f)
    assert list(stored.values()) == ["cutlass"] and repr(key) in next(iter(stored))
    # a new process (empty memory cache) reuses the disk entry without measuring
    monkeypatch.setattr(tuning, "_cache", {})
    monkeypatch.setattr(tuning, "_disk", None)
    assert tuning.tuned_choice(key, candidates, timer, persist=True) == "cutlass"
    assert len(calls) == 3
    assert tuning.cached(key) == "cutlass"
    # ... unless that candidate is no longer offered: measured again
    monkeypatch.setattr(tuning, "_cache", {})
    del candidates["cutlass"]
    assert tuning.tuned_choice(key, candidates, timer, persist=True) == "triton"
    assert any("|" in k for k in tuning.choices())


def test_corrupt_or_disabled_disk_cache(fresh_tuning, monkeypatch):
    os.makedirs(os.path.dirname(tuning.cache_path()), exist_ok=True)
    with open(tuning.cache_path(), "w") as f:
        f.write("{not json")
    assert tuning.tuned_choice("k", {"a": lambda: 1.0}, lambda fn: fn(), persist=True) == "a"
    monkeypatch.setenv("FUSED_RESNET_TUNING_CACHE", "0")
    assert tuning.cache_path() is None
    monkeypatch.setattr(tuning, "_cache", {})
    assert tuning.tuned_choice("k2", {"b": lambda: 1.0}, lambda fn: fn(), persist=True) == "b"


# ---- GPU (skipped without one) -------------------------------------------------------------------
def _cutlass_ready():
    return _C is not None and getattr(_C, "with_cutlass", 0) and torch.cuda.is_available()


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cfg", RESNET_CONVS, ids=str)
@pytest.mark.parametrize("residual, relu", [(True, True), (False, True), (False, False)],
                         ids=["residual_relu", "relu", "identity"])
def test_cutlass_conv_matches_reference(cfg, dtype, residual, relu):
    """act(conv + bias [+ residual]) vs F.conv2d in float64 + the same epilogue: within 2x
    the error of PyTorch's own conv in that dtype plus a rounding unit of the output."""
    if not _cutlass_ready():
        pytest.skip("built without the CUTLASS kernels")
    cin, cout, k, s, p, hw = cfg
    n = 4 if hw >= 56 else 8
    x = torch.randn(n, cin, hw, hw, device="cuda").to(dtype).contiguous(
        memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, k, k, device="cuda") / (cin * k * k) ** 0.5).to(dtype)
    bias = torch.randn(cout, device="cuda")
    out_hw = (hw + 2 * p - k) // s + 1
    r = torch.randn(n, cout, out_hw, out_hw, device="cuda").to(dtype) if residual else None
    got = ops.conv2d_bias_act_cutlass(x, w, s, p, bias, r, relu)

    def epilogue(z):
        z = z + bias.to(z.dtype).view(1, -1, 1, 1) + (r.to(z.dtype) if r is not None else 0)
        return torch.relu(z) if relu else z

    ref = epilogue(F.conv2d(x.double(), w.double(), None, s, p))
    torch_same = epilogue(F.conv2d(x, w, None, s, p).float())
    err = (got.double() - ref).abs().max().item()
    err_torch = (torch_same.double() - ref).abs().max().item()
    unit = torch.finfo(dtype).eps * (ref.abs().max().item() + 1)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert err <= 2 * err_torch + unit, f"error {err:.3e}, PyTorch {err_torch:.3e}"


@pytest.mark.gpu
@requires_cuda
def test_cutlass_conv_errors_name_the_problem():
    if not _cutlass_ready():
        pytest.skip("built without the CUTLASS kernels")
    x = torch.randn(2, 16, 8, 8, device="cuda").half()
    w = torch.randn(12, 16, 3, 3, device="cuda").half()
    with pytest.raises(RuntimeError, match="multiple of 8"):
        ops.conv2d_bias_act_cutlass(x, w, 1, 1, torch.zeros(12, device="cuda"), None, True)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        ops.conv2d_bias_act_cutlass(x.float(), w.float(), 1, 1, torch.zeros(12, device="cuda"),
                                    None, True)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cutlass_path_of_the_conv_ops(dtype):
    """conv2d_bn_stats (training statistics) and conv2d_dual_epilogue (conv3 + projection)
    forced onto the CUTLASS path vs the library path in the same dtype."""
    if not _cutlass_ready():
        pytest.skip("built without the CUTLASS kernels")
    x = torch.randn(8, 64, 28, 28, device="cuda").to(dtype).contiguous(
        memory_format=torch.channels_last)
    w = (torch.randn(128, 64, 3, 3, device="cuda") / 24).to(dtype)
    results = {}
    for path in ("cutlass", "library"):
        with conv_ops.use_path(path):
            results[path] = ops.conv2d_bn_stats(x, w, [2, 2], [1, 1], [1, 1], 1)
    for got, want in zip(results["cutlass"], results["library"]):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    y = torch.randn(8, 128, 14, 14, device="cuda").to(dtype).contiguous(
        memory_format=torch.channels_last)
    w3 = (torch.randn(256, 128, 1, 1, device="cuda") / 11).to(dtype)
    wd = (torch.randn(256, 64, 1, 1, device="cuda") / 8).to(dtype)
    bias = torch.randn(256, device="cuda")
    for path in ("cutlass", "library"):
        with conv_ops.use_path(path):
            results[path] = ops.conv2d_dual_epilogue(y, w3, [1, 1], [0, 0], x, wd, 2, bias, True)
    torch.testing.assert_close(results["cutlass"].float(), results["library"].float(),
                               rtol=2e-2, atol=2e-2)


def test_forcing_a_path_that_cannot_run_names_the_reason():
    x, w = torch.randn(1, 8, 4, 4), torch.randn(8, 8, 3, 3)
    with conv_ops.use_path("cutlass"), pytest.raises(RuntimeError, match="cannot run"):
        ops.conv2d_bn_stats(x, w, [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(ValueError, match="unknown conv path"):
        with conv_ops.use_path("cudnn"):
            pass


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("cfg", [c for c in RESNET_CONVS if c[0] % 8 == 0], ids=str)
def test_cutlass_bn_relu_conv_prologue(cfg):
    """ConvBNfprop on CUTLASS (fp16): conv(relu(x*scale + shift)) vs the same in float64 from
    the fp16 input, within 2x the error of PyTorch doing BN + ReLU and the conv in fp16 plus
    a few fp16 units (the kernel rounds scale and shift to fp16 for its fma)."""
    if not _cutlass_ready():
        pytest.skip("built without the CUTLASS kernels")
    cin, cout, k, s, p, hw = cfg
    n = 4 if hw >= 56 else 8
    x = (torch.randn(n, cin, hw, hw, device="cuda") * 2 + 0.5).half().contiguous(
        memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, k, k, device="cuda") / (cin * k * k) ** 0.5).half()
    scale, shift = torch.rand(cin, device="cuda") + 0.5, torch.randn(cin, device="cuda")
    got = ops.bn_relu_conv2d_cutlass(x, scale, shift, w, s, p)

    def act(t):
        return torch.relu(t * scale.to(t.dtype).view(1, -1, 1, 1) + shift.to(t.dtype).view(
            1, -1, 1, 1))

    ref = F.conv2d(act(x.double()), w.double(), None, s, p)
    torch_same = F.conv2d(act(x.float()).half(), w, None, s, p)
    err = (got.double() - ref).abs().max().item()
    err_torch = (torch_same.double() - ref).abs().max().item()
    unit = torch.finfo(torch.float16).eps * (ref.abs().max().item() + 1)
    assert err <= 2 * err_torch + 4 * unit, f"error {err:.3e}, PyTorch {err_torch:.3e}"


def test_remembered_choice_no_longer_offered_is_remeasured(fresh_tuning):
    key = ("epilogue", 0, "shape")
    tuning._save_disk(key, "cutlass")  # measured by an earlier build that had CUTLASS
    assert tuning.cached(key) == "cutlass"
    candidates = {"triton": lambda: 2.0, "library": lambda: 1.0}
    assert tuning.tuned_choice(key, candidates, lambda fn: fn(), persist=True) == "library"
