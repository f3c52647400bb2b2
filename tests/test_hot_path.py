"""What the hot path must not repeat on every call: packing a conv weight (the Triton conv's
[KH, KW, C_in, C_out] weight, the CUTLASS conv's channels_last weight: cached per weight state
in fused_resnet.weight_cache, never stale), padding the stem's 3 input channels (one pass),
allocating constant per-channel vectors (_affine), and 64-bit divisions in the elementwise BN
kernels' index math (multiply-high instead: checked at the integer boundaries on the CPU, by
the C++ kernels on awkward geometries, and in the compiled PTX where nvcc is present)."""

import copy
import gc
import os
import pickle
import re
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fused_resnet import _extension, backend, weight_cache
from fused_resnet.ops import conv as conv_ops
from native_tools import nvcc, run_cpp_simulation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_triton = pytest.mark.skipif(backend.why_not("triton", "cpu") is not None,
                                  reason=f"Triton on CPU: {backend.why_not('triton', 'cpu')}")
needs_cpp = pytest.mark.skipif(not _extension.available(), reason="fused_resnet._C not built")

# aten ops that allocate or make views: they move no data
_NO_DATA = re.compile(r"^(empty|empty_strided|empty_like|new_empty|new_empty_strided|slice|"
                      r"select|view|_unsafe_view|as_strided|permute|alias|detach|t|"
                      r"expand|unsqueeze|squeeze)\b")


class AtenLog(TorchDispatchMode):
    """The aten ops run inside it that move data: (name, largest numel among their tensors)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not _NO_DATA.match(name):
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out))
                       if isinstance(t, torch.Tensor)]
            self.ops.append((name, max((t.numel() for t in tensors), default=0)))
        return out


def _kernels():
    from fused_resnet.kernels import conv
    return conv


def _reference_pack(weight, scale=None):
    """[KH, KW, C_in padded to 8, C_out], the scale folded in fp32: what the kernel reads."""
    w = weight.double() if scale is None else weight.double() * scale.double().view(-1, 1, 1, 1)
    c_in = weight.shape[1]
    padded = F.pad(w.permute(2, 3, 1, 0), (0, 0, 0, -c_in % 8))
    return padded.to(weight.dtype).contiguous()


# ---- pack_weight: cached per weight state, never stale --------------------------------------
@needs_triton
def test_pack_weight_packs_and_pads():
    conv = _kernels()
    for shape in [(16, 3, 7, 7), (1, 3, 3, 3), (24, 16, 1, 1), (5, 12, 3, 3)]:
        w = torch.randn(shape)
        s = torch.rand(shape[0]) + 0.5
        got = conv.pack_weight(w)
        assert got.is_contiguous() and torch.equal(got, _reference_pack(w)), shape
        assert torch.equal(conv.pack_weight(w, s), _reference_pack(w, s)), shape
    w16 = torch.randn(8, 3, 3, 3).half()  # the scale folded in fp32, then rounded once
    s = torch.rand(8) + 0.5
    assert torch.equal(conv.pack_weight(w16, s), _reference_pack(w16, s))


@needs_triton
def test_pack_weight_hit_on_second_call_runs_nothing():
    conv = _kernels()
    w = torch.nn.Parameter(torch.randn(8, 3, 3, 3))
    first = conv.pack_weight(w)
    with AtenLog() as log:
        second = conv.pack_weight(w)
    assert second is first and log.ops == []


@needs_triton
def test_pack_weight_repacks_after_every_kind_of_update():
    """An optimizer step, load_state_dict, an in-place update under no_grad, a swapped .data, a
    changed or replaced scale: each gives a fresh pack equal to packing the new values."""
    conv = _kernels()
    layer = torch.nn.Conv2d(3, 8, 3, bias=False)
    w = layer.weight

    def fresh_and_right(before, scale=None):
        got = conv.pack_weight(w, scale)
        assert got is not before and torch.equal(got, _reference_pack(w.detach(), scale))
        assert conv.pack_weight(w, scale) is got  # and cached again
        return got

    packed = fresh_and_right(None)
    w.grad = torch.randn_like(w)
    torch.optim.SGD([w], lr=0.1).step()
    packed = fresh_and_right(packed)
    layer.load_state_dict({"weight": torch.randn(8, 3, 3, 3)})
    packed = fresh_and_right(packed)
    with torch.no_grad():
        w.mul_(2)
    packed = fresh_and_right(packed)
    w.data = torch.randn(8, 3, 3, 3)
    packed = fresh_and_right(packed)
    scale = torch.rand(8) + 0.5
    packed = fresh_and_right(packed, scale)
    scale.mul_(3)  # in place: the scale's version changes
    packed = fresh_and_right(packed, scale)
    fresh_and_right(packed, scale.clone())  # another tensor with the same values: its own pack


@needs_triton
def test_pack_cache_grows_with_live_weights_only():
    conv = _kernels()
    gc.collect()
    before = len(weight_cache._derived)
    weights = [torch.randn(8, 8, 1, 1) for _ in range(5)]
    for w in weights:
        conv.pack_weight(w)
    assert len(weight_cache._derived) == before + 5
    del weights, w
    gc.collect()
    assert len(weight_cache._derived) == before


@needs_triton
def test_pack_not_cached_for_fake_or_inference_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode
    conv = _kernels()
    with FakeTensorMode():
        fake = torch.randn(8, 3, 3, 3)
        packed = conv.pack_weight(fake)
        assert packed.shape == (3, 3, 8, 8)
    assert fake not in weight_cache._derived
    with torch.inference_mode():
        frozen = torch.randn(8, 3, 3, 3)
        first = conv.pack_weight(frozen)
        with torch.no_grad():
            frozen.mul_(2)  # inference tensors change without a version counter
        assert torch.equal(conv.pack_weight(frozen), _reference_pack(frozen))
    assert first is not None and frozen not in weight_cache._derived


@needs_triton
def test_modules_with_packed_weights_pickle_and_deepcopy():
    conv = _kernels()
    layer = torch.nn.Conv2d(3, 8, 3)
    packed = conv.pack_weight(layer.weight)
    twin = copy.deepcopy(layer)
    restored = pickle.loads(pickle.dumps(layer))
    assert torch.equal(restored.weight, layer.weight)
    twin_packed = conv.pack_weight(twin.weight)
    assert twin_packed is not packed and torch.equal(twin_packed, packed)


def test_cutlass_weight_is_krsc_cached_and_refreshed():
    w = torch.randn(16, 8, 3, 3).half()
    got = conv_ops._cutlass_weight(w)
    assert got.is_contiguous(memory_format=torch.channels_last) and torch.equal(got, w)
    assert conv_ops._cutlass_weight(w) is got
    with torch.no_grad():
        w.add_(1)
    again = conv_ops._cutlass_weight(w)
    assert again is not got and torch.equal(again, w)
    # already KRSC: the weight itself, and no cache entry (it would keep the weight alive)
    krsc = torch.randn(16, 8, 3, 3).half().contiguous(memory_format=torch.channels_last)
    assert conv_ops._cutlass_weight(krsc) is krsc and krsc not in weight_cache._derived


# ---- the stem's padding: one pass ---------------------------------------------------------------
def _old_padding(x, channels):
    """What conv2d_nhwc did before (F.pad, then two layout copies): the reference values."""
    padded = F.pad(x, [0, 0, 0, 0, 0, channels - x.shape[1]]).contiguous()
    return padded.contiguous(memory_format=torch.channels_last)


@needs_triton
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_stem_input_padded_in_one_pass(channels_last):
    conv = _kernels()
    x = torch.randn(2, 3, 13, 11)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with AtenLog() as log:
        padded = conv._nhwc_padded(x, 8)
    assert torch.equal(padded, _old_padding(x, 8))
    assert padded.is_contiguous(memory_format=torch.channels_last)
    # one copy of x into its channels, one fill of the 5 pad channels; nothing the padded
    # tensor's size
    assert sorted(log.ops) == [("copy_", x.numel()), ("zero_", x.numel() // 3 * 5)], log.ops
    aligned = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    assert conv._nhwc_padded(aligned, 8) is aligned


@needs_triton
def test_stem_conv_moves_its_input_once(monkeypatch):
    """conv2d_nhwc on the stem (kernel launch stubbed out, weight packed beforehand): the only
    data movement of the input's size is the one copy into the padded tensor."""
    conv = _kernels()

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    w = conv.pack_weight(torch.randn(8, 3, 7, 7))
    monkeypatch.setattr(conv, "_conv_kernel", NoLaunch())
    with AtenLog() as log:
        conv.conv2d_nhwc(x, w, 2, 3, config=conv.INTERPRETER_CONFIG)
    big = [op for op in log.ops if op[1] >= x.numel()]
    assert sorted(big) == [("copy_", x.numel()), ("zero_", x.numel() // 3 * 5)], log.ops


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_stem_conv_output_identical_to_the_old_padding(monkeypatch, dtype):
    conv = _kernels()
    x = torch.randn(2, 3, 13, 13).to(dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(16, 3, 7, 7) / 12).to(dtype)
    new, _ = conv.conv2d_nhwc(x, conv.pack_weight(w), 2, 3, relu=True)
    monkeypatch.setattr(conv, "_nhwc_padded", _old_padding)
    old, _ = conv.conv2d_nhwc(x, conv.pack_weight(w), 2, 3, relu=True)
    assert torch.equal(new, old)


# ---- _affine: no allocation per call ------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_affine_allocates_nothing_per_call(dtype):
    like = torch.empty(2, 16, 4, 4, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ones, zeros = conv_ops._affine(16, None, None, like)
    assert torch.equal(ones, torch.ones(16, dtype=acc))
    assert torch.equal(zeros, torch.zeros(16, dtype=acc))
    scale, bias = torch.rand(16, dtype=acc), torch.randn(16, dtype=acc)
    with AtenLog() as log:
        again = conv_ops._affine(16, None, None, like)
        given = conv_ops._affine(16, scale, bias, like)
    assert log.ops == []
    assert again[0] is ones and again[1] is zeros and given[0] is scale and given[1] is bias
    assert conv_ops._affine(24, None, None, like)[0].shape == (24,)  # per size


def test_triton_epilogue_passes_absent_terms_as_none(monkeypatch):
    """The Triton conv skips an absent scale or bias (a constexpr): nothing is made for it."""
    seen = {}

    class Kernels:
        @staticmethod
        def pack_weight(w):
            return w

        @staticmethod
        def conv2d_nhwc(x, w, stride, padding, **kwargs):
            seen.update(kwargs)
            return torch.empty(2, 8, 4, 4).contiguous(memory_format=torch.channels_last), None

    monkeypatch.setattr(conv_ops, "_conv_kernels", lambda: Kernels)
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    conv_ops._epilogue_triton(x, torch.randn(8, 8, 1, 1), [1, 1], [0, 0], None, None, None,
                              True)
    assert seen["scale"] is None and seen["bias"] is None
    conv_ops._dual_triton(x, torch.randn(8, 8, 1, 1), [1, 1], [0, 0], x,
                          torch.randn(8, 8, 1, 1), 1, None, True)
    assert seen["bias"] is None


def test_constants_not_kept_for_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode
    before = len(weight_cache._constants)
    with FakeTensorMode():
        like = torch.empty(2, 7, 3, 3)
        ones, _ = conv_ops._affine(7, None, None, like)
        assert ones.shape == (7,)
    assert len(weight_cache._constants) == before


# ---- index math of the elementwise BN kernels ----------------------------------------------------
# (N, C, H, W): C = 1, C = 3 and 9 (not multiples of the 8-element vector), HW = 1, planes and
# pixel rows that straddle the CPU kernels' 4096-element chunks.
GEOMETRIES = [(3, 1, 37, 41), (5, 3, 17, 19), (2, 9, 45, 45), (700, 9, 1, 1), (1, 7, 64, 65),
              (2, 64, 7, 7)]


def _channel_index_kernels(shape, channels_last, device, dtype=torch.float32):
    """apply with scale 0 and shift c, grad_apply with k = b = 0 and c: each output is exactly
    its element's channel index, so a misplaced run, chunk boundary or thread shows as a wrong
    integer. Returns (out, dx, the channel index of every element, broadcast)."""
    ops = torch.ops.fused_resnet
    c = shape[1]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    channel = torch.arange(c, dtype=torch.float32, device=device)
    zeros = torch.zeros(c, device=device)
    out, mask = ops.bn_add_relu_apply_cpp(x, None, zeros, channel, False, True)
    dx, _ = ops.bn_add_relu_grad_apply_cpp(x, mask, x, zeros, zeros, zeros, channel, False,
                                           False)
    return out, dx, channel.to(dtype).view(1, c, 1, 1).expand(shape)


@needs_cpp
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", GEOMETRIES, ids=lambda s: "x".join(map(str, s)))
def test_elementwise_kernels_find_every_elements_channel(shape, channels_last, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    out, dx, want = _channel_index_kernels(shape, channels_last, device)
    assert torch.equal(out, want) and torch.equal(dx, want)


@needs_cpp
@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_elementwise_kernels_past_2_to_the_32_elements():
    """Threads placed at offsets beyond 2^32 (an fp16 tensor of 2^32 + 33 elements, C = 3, 17
    GB with its output): the multiply-high division of the device (__umul64hi) at sizes the
    CPU simulation covers without allocating."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    n = (2 ** 32 + 33) // 3
    out, dx, _ = _channel_index_kernels((n, 3, 1, 1), True, "cuda", torch.float16)
    channel = torch.arange(3, device="cuda", dtype=torch.float16)
    assert bool((out.view(n, 3) == channel).all()) and bool((dx.view(n, 3) == channel).all())


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
def test_fast_divmod_exact_at_the_boundaries(tmp_path):
    """FastDivmod and ChannelMap (what the CUDA kernels place each thread with) against plain
    64-bit division, around 2^31, 2^32 and 2^63 (tests/cpp/index_math_sim.cpp)."""
    run_cpp_simulation("index_math_sim", tmp_path, timeout=120)


WIDE_DIVISION = re.compile(r"\b(?:div|rem)\.[su]64\b")


@pytest.mark.skipif(nvcc() is None, reason="no CUDA toolkit (nvcc)")
def test_elementwise_kernels_have_no_64_bit_division(tmp_path):
    """The compiled apply / grad_apply kernels place each thread by multiply-high (mul.hi.u64),
    never by the 64-bit division subroutine (div/rem .s64/.u64)."""
    ptx = tmp_path / "bn_add_relu.ptx"
    result = subprocess.run([nvcc(), "-O3", "-std=c++17", "-arch=sm_90", "--ptx",
                             "-I", os.path.join(ROOT, "csrc"),
                             os.path.join(ROOT, "csrc", "cuda", "bn_add_relu.cu"), "-o", str(ptx)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    entries = re.split(r"\n(?=(?:\.visible |\.weak )?\.entry )", ptx.read_text())
    elementwise = {}
    for text in entries:
        name = re.match(r"(?:\.visible |\.weak )?\.entry (\w+)", text)
        if name and re.search(r"\d+(?:grad_)?apply_kernel", name.group(1)):
            elementwise[name.group(1)] = text
    # (apply: with a mean or not) x 3 dtypes x vector or not
    assert len(elementwise) == 18, list(elementwise)
    for name, text in elementwise.items():
        assert not WIDE_DIVISION.search(text), f"{name}: 64-bit division"
        assert "mul.hi.u64" in text, f"{name}: no multiply-high placement"
