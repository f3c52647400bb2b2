"""The CUTLASS conv path (csrc/cutlass_conv/): on this machine, the build (compiled into _C and
registered with a CUDA kernel whenever nvcc and the headers are present), the host-side plan
(which problems it takes, channel padding, alignment and size errors), the Python dispatch
rules and the on-disk cache of measured choices; on a GPU, every ResNet conv shape against
F.conv2d + the reference epilogue."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import requires_cuda
from fused_resnet import _extension, backend, tuning
from fused_resnet.ops import bn_relu_conv as bn_relu_conv_ops
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
    (dict(k=33, p=16, hw=40), "32x32"),          # the optimized iterators' filter mask bits
    (dict(n=1, hw=1, cin=8, cout=2 ** 24, k=1, p=0), "grid.y"),  # 131072 tiles of channels
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


# ---- pointer alignment (csrc/common/cutlass_conv_plan.h: cutlass_operand_info) ----------------
needs_cutlass_ops = pytest.mark.skipif(
    _C is None or not getattr(_C, "with_cutlass", 0),
    reason="_C was built without the CUTLASS conv kernels (and their glue)")

# operand -> (bytes CUTLASS's widest access through it needs, dtype, 4-D): derived from the
# instantiated templates (see the header); the bias is read as AlignedArray<float, 8>.
OPERAND_RULES = {"activation": (16, torch.float16, True), "filter": (16, torch.bfloat16, True),
                 "output": (16, torch.float16, True), "residual": (16, torch.bfloat16, True),
                 "bias": (32, torch.float32, False), "bn_scale": (16, torch.float16, False),
                 "bn_shift": (16, torch.float16, False)}


def _at_offset(t, offset):
    """`t`'s values in a new storage, `offset` elements into it, with t's strides."""
    storage = torch.zeros(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = storage.as_strided(t.shape, t.stride(), offset)
    view.copy_(t)
    return view


@needs_cutlass_ops
@pytest.mark.parametrize("operand", sorted(OPERAND_RULES))
def test_launch_operand_aligns_every_operand(operand):
    """What the CUTLASS ops launch with in place of a tensor (the glue's launch_operand, run on
    CPU tensors here): the tensor itself where its address is aligned, else an aligned copy
    with the same values, never a misaligned pointer."""
    align, dtype, four_d = OPERAND_RULES[operand]
    t = torch.randn(2, 16, 3, 5).to(dtype).contiguous(memory_format=torch.channels_last) \
        if four_d else torch.randn(40).to(dtype)
    size = t.element_size()
    for offset in range(0, 2 * align // size + 1):
        src = _at_offset(t, offset)
        got = ops.cutlass_launch_operand(src, operand)
        assert got.data_ptr() % align == 0, (operand, offset, got.data_ptr() % align)
        assert torch.equal(got, t)
        if four_d:
            assert got.is_contiguous(memory_format=torch.channels_last)
        aligned = src.data_ptr() % align == 0
        assert (got.data_ptr() == src.data_ptr()) == aligned, (operand, offset)  # copy only then
    if operand == "bias":  # 16-byte aligned is not enough for the fp32 bias
        src = _at_offset(t, 4)  # the CPU allocator aligns storage to 64 bytes
        assert src.data_ptr() % 32 == 16
        assert ops.cutlass_launch_operand(src, "bias").data_ptr() % 32 == 0


@needs_cutlass_ops
def test_launch_operand_layout_and_errors():
    x = torch.randn(2, 16, 4, 4).half()  # NCHW: the kernel reads NHWC
    got = ops.cutlass_launch_operand(x, "activation")
    assert got.is_contiguous(memory_format=torch.channels_last) and torch.equal(got, x)
    assert ops.cutlass_launch_operand(torch.randn(16)[::2], "bias").is_contiguous()
    with pytest.raises(RuntimeError, match="unknown operand"):
        ops.cutlass_launch_operand(x, "input")
    with pytest.raises(RuntimeError, match="bias must be 1-D"):
        ops.cutlass_launch_operand(x, "bias")


def _host_compile(tmp_path, source):
    """Compile and run `source` (host C++ including csrc headers and CUTLASS's) with the
    toolchain that builds the extension; skip where it is missing."""
    cxx = shutil.which("c++") or shutil.which("g++")
    cuda = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    spec = importlib.util.find_spec("cutlass_library")
    if cxx is None or spec is None or not os.path.exists(os.path.join(cuda, "include",
                                                                      "cuda_runtime.h")):
        pytest.skip("needs a C++ compiler, the CUDA toolkit and the CUTLASS headers")
    cutlass = os.path.join(os.path.dirname(spec.origin), "source", "include")
    csrc = os.path.join(os.path.dirname(__file__), "..", "csrc")
    if not os.path.isdir(csrc):
        pytest.skip("no csrc/ next to the tests")
    src, exe = tmp_path / "t.cpp", tmp_path / "t"
    src.write_text(source)
    includes = [csrc, cutlass, os.path.join(cuda, "include"), os.path.join(cuda, "include",
                                                                          "cccl")]
    cmd = [cxx, "-std=c++17", "-w", *[f"-I{d}" for d in includes if os.path.isdir(d)],
           str(src), "-o", str(exe), f"-L{os.path.join(cuda, 'lib64')}", "-lcudart_static",
           "-ldl", "-lpthread", "-lrt"]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=60).stdout


def test_launcher_errors_name_status_and_problem(tmp_path):
    """The launchers' messages (csrc/cutlass_conv/launch.h): CUTLASS's own status with its
    name, the problem size, and a misaligned pointer refused before any launch."""
    out = _host_compile(tmp_path, textwrap.dedent("""
        #include <cstdio>
        #include "cutlass_conv/launch.h"
        using namespace fused_resnet;
        int main() {
          const CutlassConvProblem pr{256, 56, 56, 3, 64, 7, 7, 2, 3, 1, 1, 2};
          const CutlassConvPlan plan = cutlass_conv_plan(pr);
          const std::string problem = cutlass_launch::describe(pr, plan, plan.padded_c);
          std::printf("%s\\n", cutlass_launch::step_error(
              "can_implement", cutlass::Status::kErrorMisalignedOperand, problem).c_str());
          alignas(64) static char buf[256];
          const CutlassOperandPtr bad[] = {{CutlassOperand::kActivation, buf},
                                           {CutlassOperand::kResidual, nullptr},
                                           {CutlassOperand::kBias, buf + 16}};
          std::printf("%s\\n", cutlass_launch::check_alignment(bad, problem).c_str());
          const CutlassOperandPtr ok[] = {{CutlassOperand::kActivation, buf + 16},
                                          {CutlassOperand::kOutput, buf + 48},
                                          {CutlassOperand::kBias, buf + 32}};
          std::printf("[%s]\\n", cutlass_launch::check_alignment(ok, problem).c_str());
        }
    """))
    status, misaligned, aligned = out.splitlines()
    assert "CUTLASS can_implement returned Error Misaligned Operand (cutlass::Status 1)" in status
    problem = ("input NHWC 256x56x56x8, filter KRSC 64x7x7x8, stride 2, pad 3, output NPQK "
               "256x28x28x64, 128x128 tile")
    assert problem in status
    assert "the bias pointer" in misaligned and "not 32-byte aligned (not launched" in misaligned
    assert problem in misaligned
    assert aligned == "[]"


def test_cutlass_unsupported_on_cuda_tensors_judged_on_cpu(monkeypatch):
    """cutlass_unsupported's CUDA-side rules, run here on stand-ins for CUDA tensors."""
    if _C is None:
        pytest.skip(f"no extension: {_extension.error()}")

    class Fake:  # what cutlass_unsupported reads of a tensor
        def __init__(self, shape, device="cuda:0", dtype=torch.float16):
            self.shape, self.device, self.dtype = shape, torch.device(device), dtype

        def dim(self):
            return len(self.shape)

    class WithCutlass:  # _C as built with the kernels, on a machine without them
        def __getattr__(self, name):
            return 1 if name == "with_cutlass" else getattr(_C, name)

    monkeypatch.setattr(conv_ops._extension, "load", lambda: WithCutlass())
    x, w = Fake((8, 64, 56, 56)), Fake((64, 64, 3, 3))
    args = ([1, 1], [1, 1], [1, 1], 1)
    assert conv_ops.cutlass_unsupported(x, w, *args) is None
    assert "weight on cpu" in conv_ops.cutlass_unsupported(x, Fake((64, 64, 3, 3), "cpu"), *args)
    assert "4-D" in conv_ops.cutlass_unsupported(Fake((8, 64, 56)), w, *args)
    assert "32x32" in conv_ops.cutlass_unsupported(x, Fake((64, 64, 33, 33)),
                                                   [1, 1], [16, 16], [1, 1], 1)
    assert "dtype" in conv_ops.cutlass_unsupported(Fake((8, 64, 56, 56), dtype=torch.float32),
                                                   w, *args)


# ---- ConvBNfprop precision: why bn_relu_conv2d_cutlass is not a candidate ----------------------
def _conv_output_like(n, c, hw, mean_over_std, device="cpu"):
    """A raw conv output in fp16 whose channels have |mean|/std ~ mean_over_std (0.5x-1.5x),
    std 0.5-2, and the training-BN scale/shift (fp32) that normalise it."""
    g = torch.Generator().manual_seed(1)
    std = torch.rand(c, generator=g) * 1.5 + 0.5
    sign = torch.where(torch.rand(c, generator=g) < 0.5, -1.0, 1.0)
    mean = sign * mean_over_std * std * (0.5 + torch.rand(c, generator=g))
    x = (torch.randn(n, c, hw, hw, generator=g) * std.view(1, -1, 1, 1)
         + mean.view(1, -1, 1, 1)).half()
    var, m = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
    gamma, beta = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g) * 0.5
    scale = gamma / torch.sqrt(var + 1e-5)
    return (x.to(device).contiguous(memory_format=torch.channels_last), scale.to(device),
            (beta - m * scale).to(device))


def _normwise(got, want):
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("mean_over_std, worse", [(0, False), (20, True)])
def test_fp16_bn_scale_shift_error_emulated(mean_over_std, worse):
    """CUTLASS's ConvBNfprop numerics emulated in float64: scale and shift rounded to fp16,
    one fp16 rounding of relu(x*scale + shift) (fma.rn.f16x2.relu). With |mean|/std ~ 20 the
    activations are >10x worse than BN applied in fp32 then rounded once (the library and
    Triton paths), ~0.7% normwise, systematic per channel; with centred channels they are not."""
    x, scale, shift = _conv_output_like(2, 32, 8, mean_over_std)
    xd, view = x.double(), (1, -1, 1, 1)
    exact = torch.relu(xd * scale.double().view(view) + shift.double().view(view))
    fp32 = torch.relu(x.float() * scale.view(view) + shift.view(view)).half()
    fp16 = torch.relu(xd * scale.half().double().view(view)
                      + shift.half().double().view(view)).half()
    err32, err16 = _normwise(fp32, exact), _normwise(fp16, exact)
    if worse:
        assert err16 > 10 * err32 and err16 > 3e-3, (err16, err32)
    else:
        assert err16 < 4 * err32, (err16, err32)


def test_bn_relu_conv_candidates_leave_out_cutlass():
    """bn_relu_conv2d_bn_stats offers the library and Triton paths only: the CUTLASS
    ConvBNfprop rounds BN's scale/shift to fp16 (see fused_resnet/ops/bn_relu_conv.py)."""
    for dtype, expected in ((torch.float16, {"library", "triton"}),
                            (torch.bfloat16, {"library", "triton"}),
                            (torch.float32, {"library", "triton"}),
                            (torch.float64, {"library"})):
        x = torch.randn(2, 16, 6, 6).to(dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(16, 16, 3, 3).to(dtype)
        mean, var = torch.randn(16), torch.rand(16) + 0.5
        candidates, _ = bn_relu_conv_ops.dispatch_plan(
            x, None, None, mean, var, 1e-5, w, [1, 1], [1, 1], [1, 1], 1)
        assert set(candidates) == expected, (dtype, sorted(candidates))


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
    assert [entry["choice"] for entry in stored.values()] == ["cutlass"]
    assert repr(key) in next(iter(stored))
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
    w = torch.randn(16, 16, 3, 3, device="cuda").half()
    bias = torch.zeros(16, device="cuda")
    with pytest.raises(RuntimeError, match="bias must be on cuda"):
        ops.conv2d_bias_act_cutlass(x, w, 1, 1, bias.cpu(), None, True)
    with pytest.raises(RuntimeError, match="residual must be"):
        ops.conv2d_bias_act_cutlass(x, w, 1, 1, bias, torch.zeros(2, 16, 8, 8).half(), True)
    # ConvBNfprop: scale and shift are checked alike (a CPU shift used to reach the kernel)
    scale = torch.ones(16, device="cuda")
    with pytest.raises(RuntimeError, match="shift must be on cuda"):
        ops.bn_relu_conv2d_cutlass(x, scale, scale.cpu(), w, 1, 1)
    with pytest.raises(RuntimeError, match="scale must be on cuda"):
        ops.bn_relu_conv2d_cutlass(x, scale.cpu(), scale, w, 1, 1)
    with pytest.raises(RuntimeError, match=r"shift must have shape \(16\)"):
        ops.bn_relu_conv2d_cutlass(x, scale, torch.ones(8, device="cuda"), w, 1, 1)
    with pytest.raises(RuntimeError, match="shift must be floating point"):
        ops.bn_relu_conv2d_cutlass(x, scale, torch.ones(16, device="cuda", dtype=torch.int32),
                                   w, 1, 1)
    torch.cuda.synchronize()  # and nothing was launched on a bad pointer


# Runs in a child process: if a misaligned pointer ever reached a CUTLASS kernel again, the
# fault would poison that process's CUDA context, not this one's.
_MISALIGNED_SCRIPT = """
import torch
import fused_resnet  # noqa: F401
ops = torch.ops.fused_resnet
cl = torch.channels_last


def at_offset(t, offset):  # t's values and strides, `offset` elements into a new storage
    view = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device).as_strided(
        t.shape, t.stride(), offset)
    return view.copy_(t)


torch.manual_seed(0)
for dtype in (torch.float16, torch.bfloat16):
    x = torch.randn(2, 64, 15, 15, device="cuda").to(dtype).contiguous(memory_format=cl)
    w = (torch.randn(64, 64, 3, 3, device="cuda") / 24).to(dtype).contiguous(memory_format=cl)
    bias, r = torch.randn(64, device="cuda"), torch.randn_like(x)
    want = ops.conv2d_bias_act_cutlass(x, w, 1, 1, bias, r, True)
    cases = {"input": (at_offset(x, 1), w, bias, r), "weight": (x, at_offset(w, 1), bias, r),
             "bias+1": (x, w, at_offset(bias, 1), r), "bias+4": (x, w, at_offset(bias, 4), r),
             "residual": (x, w, bias, at_offset(r, 3)),
             "all": (at_offset(x, 5), at_offset(w, 7), at_offset(bias, 2), at_offset(r, 1))}
    for name, (xi, wi, bi, ri) in cases.items():
        got = ops.conv2d_bias_act_cutlass(xi, wi, 1, 1, bi, ri, True)
        assert torch.equal(got, want), (str(dtype), name)
x = torch.randn(2, 64, 15, 15, device="cuda").half().contiguous(memory_format=cl)
w = (torch.randn(64, 64, 3, 3, device="cuda") / 24).half().contiguous(memory_format=cl)
scale, shift = torch.rand(64, device="cuda").half() + 0.5, torch.randn(64, device="cuda").half()
want = ops.bn_relu_conv2d_cutlass(x, scale, shift, w, 1, 1)
for name, args in {"input": (at_offset(x, 1), scale, shift, w),
                   "scale": (x, at_offset(scale, 1), shift, w),
                   "shift": (x, scale, at_offset(shift, 3), w),
                   "weight": (x, scale, shift, at_offset(w, 1))}.items():
    assert torch.equal(ops.bn_relu_conv2d_cutlass(*args, 1, 1), want), name
torch.cuda.synchronize()
print("aligned: ok")
"""


@pytest.mark.gpu
@requires_cuda
def test_misaligned_operands_are_copied_not_launched():
    """Views with odd storage offsets (slices) as input, weight, bias (also 16- but not
    32-byte aligned), residual, BN scale and shift: the ops copy them to aligned storage and
    give the aligned inputs' result bit for bit, instead of a misaligned-address fault."""
    if not _cutlass_ready():
        pytest.skip("built without the CUTLASS kernels")
    run = subprocess.run([sys.executable, "-c", _MISALIGNED_SCRIPT], capture_output=True,
                         text=True, timeout=600, cwd=os.path.expanduser("~"))  # installed package
    assert run.returncode == 0 and "aligned: ok" in run.stdout, run.stderr[-4000:]


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


@pytest.mark.gpu
@requires_cuda
def test_cutlass_bn_relu_conv_error_with_real_bn_statistics(fresh_tuning):
    """Why bn_relu_conv2d_cutlass is not a candidate of bn_relu_conv2d_bn_stats: on a raw conv
    output with |mean|/std ~ 20 per channel (real ones have 10-30) it rounds BN's scale and
    shift to fp16, and its output is >4x further from float64 than the library path's
    (BN in fp32, the activation rounded once, cuDNN), ~0.7% normwise where
    compare.NORMWISE_BOUND allows 3%. bn_relu_conv2d_bn_stats, measured and chosen as in training, stays at the
    library path's error. (If this first assertion ever fails, the kernel applies scale/shift
    accurately: offer it again in ops/bn_relu_conv.py.)"""
    if not _cutlass_ready():
        pytest.skip("built without the CUTLASS kernels")
    x, scale, shift = _conv_output_like(8, 64, 28, 20, device="cuda")
    w = (torch.randn(64, 64, 3, 3, device="cuda") / 24).half()
    view = (1, -1, 1, 1)
    exact = F.conv2d(torch.relu(x.double() * scale.double().view(view)
                                + shift.double().view(view)), w.double(), None, 1, 1)
    library = F.conv2d(torch.relu(x.float() * scale.view(view) + shift.view(view)).half(), w,
                       None, 1, 1)
    cutlass = ops.bn_relu_conv2d_cutlass(x, scale, shift, w, 1, 1)
    err_library, err_cutlass = _normwise(library, exact), _normwise(cutlass, exact)
    assert err_cutlass > 4 * err_library and err_cutlass > 2e-3, (err_cutlass, err_library)
    var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
    gamma = scale * torch.sqrt(var + 1e-5)
    beta = shift + mean * scale
    z, _, _ = ops.bn_relu_conv2d_bn_stats(x, gamma, beta, mean, var, 1e-5, w, [1, 1], [1, 1],
                                          [1, 1], 1)
    assert _normwise(z, exact) <= 3 * err_library + 1e-4, (_normwise(z, exact), err_library)


def test_remembered_choice_no_longer_offered_is_remeasured(fresh_tuning):
    key = ("epilogue", 0, "shape")
    tuning._save_disk(key, "cutlass")  # measured by an earlier build that had CUTLASS
    assert tuning.cached(key) == "cutlass"
    candidates = {"triton": lambda: 2.0, "library": lambda: 1.0}
    assert tuning.tuned_choice(key, candidates, lambda fn: fn(), persist=True) == "library"
