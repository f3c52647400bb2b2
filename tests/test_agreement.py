"""The check a candidate conv path passes before tuning may choose it (fused_resnet.compare
.conv_agreement, called by ops.conv.agreeing): on the CPU, with precomputed outputs.

Correct candidates: the library conv's output against the same conv computed otherwise (float64
rounded to the dtype, unfold + matmul in fp32, channels_last, without oneDNN, TF32 products
for fp32, an epilogue applied once in fp64 where the library rounds the conv output first, batch
statistics of the unrounded output), bf16/fp16/fp32 at ResNet-50 layer shapes up to the full
K = 3*3*512 = 4608. Their largest error/bound ratio here is 0.14 (the variance of a channel
over 98 pixels); tiles reach 0.08 (the double-rounded epilogue, TF32 products): >= 7x headroom,
asserted as <= 1/4.

Planted faults, each rejected on its own (error/bound ratio, bf16 and fp16/fp32): one tile of
another tile's values (39x, 306x), of wild values (> 10^4), zeroed (32x, 248x), off by 5%
(1.6x, 12.4x); one channel's mean shifted by 5% of its RMS or its variance off by 5% (3.2x,
25x); a NaN where the library has a number. At 20,090 row tiles of 128 x 64 (a batch-256
stem's count is 25,088) one tile of another tile's values or off by 5% leaves the normwise
error under half its bound: only the tile check sees it.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from fused_resnet import compare
from fused_resnet.compare import conv_agreement
from fused_resnet.ops import conv as conv_ops

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (C_in, C_out, kernel, stride, input size) of ResNet-50 convs, at a small spatial size
LAYERS = {
    "stem 7x7/2": (3, 64, 7, 2, 32),
    "layer1 3x3": (64, 64, 3, 1, 16),
    "layer2 3x3/2": (128, 128, 3, 2, 16),
    "layer3 1x1 1024-256": (1024, 256, 1, 1, 8),
    "layer4 3x3 K=4608": (512, 512, 3, 1, 7),
    "layer4 1x1 512-2048": (512, 2048, 1, 1, 7),
}
HEADROOM = 1 / 4  # a correct candidate's error stays below this fraction of each bound


def _problem(layer, dtype, batch=2):
    c_in, c_out, k, stride, size = LAYERS[layer]
    x = torch.randn(batch, c_in, size, size)
    if c_in > 3:
        x = x.relu()  # a block's input: post-ReLU
    w = torch.randn(c_out, c_in, k, k) * math.sqrt(2 / (c_in * k * k))
    return x.to(dtype), w.to(dtype), stride, k // 2


def _tf32(t):
    """fp32 rounded to TF32's 10-bit mantissa (to nearest), as tensor cores read fp32 operands."""
    bits = t.float().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _conv_candidates(x, w, stride, padding, z64):
    """The same conv computed other ways (z64: in float64), each rounded to the dtype once."""
    dtype, k = x.dtype, w.shape[-1]
    n, c_out = x.shape[0], w.shape[0]
    cols = F.unfold(x.float(), k, padding=padding, stride=stride)
    size = (x.shape[-1] + 2 * padding - k) // stride + 1
    cl = torch.channels_last
    candidates = {
        "float64, rounded": z64.to(dtype),
        "unfold + matmul in fp32": (w.float().view(c_out, -1) @ cols).view(n, c_out, size, size)
        .to(dtype),
        "channels_last": F.conv2d(x.contiguous(memory_format=cl),
                                  w.contiguous(memory_format=cl), None, stride, padding),
        "without oneDNN": torch.ops.aten.thnn_conv2d(x, w, [k, k], None, [stride] * 2,
                                                     [padding] * 2),
    }
    if dtype == torch.float32:
        candidates["TF32 products"] = F.conv2d(_tf32(x).double(), _tf32(w).double(), None,
                                               stride, padding).float()
    return candidates


def _epilogue_pair(x, w, stride, padding, z64):
    """(fused, library) conv + per-channel scale and bias (a BN that cancels most of each
    channel's mean) + residual + ReLU: fused in one rounding, the library rounding the conv
    output first, as ops.conv's library path does."""
    mean, std = z64.mean((0, 2, 3)), z64.std((0, 2, 3))
    scale = (torch.rand_like(mean) + 0.5) / std
    bias = -mean * scale + 0.2 * torch.randn_like(mean)
    residual = torch.randn_like(z64).to(x.dtype)
    view = (1, -1, 1, 1)

    def epilogue(z, dtype):
        return torch.relu(z * scale.to(dtype).view(view) + bias.to(dtype).view(view)
                          + residual.to(dtype))

    fused = epilogue(z64, torch.float64).to(x.dtype)
    library = epilogue(F.conv2d(x, w, None, stride, padding).float(), torch.float32).to(x.dtype)
    return fused, library


def _with_stats(z, exact=None):
    """(z, mean, biased var): the statistics of `exact` (the fused kernel's fp32 accumulator)
    or of z itself (the library path), returned in fp32."""
    var, mean = torch.var_mean((z if exact is None else exact).double(), dim=(0, 2, 3),
                               correction=0)
    return z, mean.float(), var.float()


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_differently_rounded_candidates_agree(dtype, layer):
    x, w, stride, padding = _problem(layer, dtype)
    library = F.conv2d(x, w, None, stride, padding)
    z64 = F.conv2d(x.double(), w.double(), None, stride, padding)
    outputs = {name: ((got,), (library,))
               for name, got in _conv_candidates(x, w, stride, padding, z64).items()}
    fused, library_epilogue = _epilogue_pair(x, w, stride, padding, z64)
    outputs["epilogue in one rounding"] = ((fused,), (library_epilogue,))
    outputs["statistics of the unrounded output"] = (_with_stats(z64.to(dtype), z64),
                                                     _with_stats(library))
    for name, (got, ref) in outputs.items():
        verdict = conv_agreement(got, ref)
        assert verdict.ratio <= HEADROOM, f"{name}: {verdict}"


def _fault_case(dtype, batch=8):
    """A correct candidate and the library output of layer1's 3x3 conv: 2048 pixels (16 row
    tiles of 128) x 64 channels."""
    x, w, stride, padding = _problem("layer1 3x3", dtype, batch)
    z64 = F.conv2d(x.double(), w.double(), None, stride, padding)
    library = _with_stats(F.conv2d(x, w, None, stride, padding))
    return _with_stats(z64.to(dtype), z64), library


def _tile(z, rows, channels=slice(None)):
    """The [pixels, channels] view of a channels_last output, sliced: where a kernel's tile
    writes."""
    assert z.is_contiguous(memory_format=torch.channels_last)
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])[rows, channels]


def _planted(outputs, fault):
    z, mean, var = (t.clone() for t in outputs)
    z = z.contiguous(memory_format=torch.channels_last)
    tile = _tile(z, slice(128 * 5, 128 * 6))  # one 128 x 64 tile
    if fault == "tile of another tile's values":  # a wrong address: values of the right size
        tile.copy_(_tile(z, slice(128 * 9, 128 * 10)))
    elif fault == "tile of wild values":
        tile.copy_(torch.randn(tile.shape) * 1e3)
    elif fault == "zeroed tile":
        tile.zero_()
    elif fault == "64x64 tile off by 5%":
        tile[:64].mul_(1.05)
    elif fault == "NaN in one element":
        tile[7, 3] = float("nan")
    elif fault == "one channel's mean shifted by 5% of its RMS":
        mean[17] += 0.05 * (mean[17] ** 2 + var[17]).sqrt()
    elif fault == "one channel's variance off by 5%":
        var[17] *= 1.05
    return z, mean, var


FAULTS = ["tile of another tile's values", "tile of wild values", "zeroed tile",
          "64x64 tile off by 5%", "NaN in one element",
          "one channel's mean shifted by 5% of its RMS", "one channel's variance off by 5%"]


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_planted_fault_is_rejected(dtype, fault):
    correct, library = _fault_case(dtype)
    assert conv_agreement(correct, library).ratio <= HEADROOM
    verdict = conv_agreement(_planted(correct, fault), library)
    assert verdict.ratio > 1.4, f"{fault}: {verdict}"
    if fault.startswith("one channel"):
        # the normwise error over all channels' statistics does not see it
        got, ref = _planted(correct, fault), library
        assert max(compare.agreement_error(got[i], ref[i]) for i in (1, 2)) \
            < compare.NORMWISE_BOUND
        assert "channel 17" in str(verdict)


@pytest.fixture(scope="module")
def stem_at_scale():
    """A bf16 stem-like output [205, 64, 112, 112] channels_last: 2,571,520 pixels, 20,090
    row tiles of 128 (batch 256 has 25,088), and a correct candidate (the same values rounded
    after a relative perturbation of 2^-9, as a different summation order would leave them).
    The batch repeats one image's values: the tiles, not the values, are what is counted."""
    n, size, channels = 205, 112, 64
    exact = torch.randn(1, size, size, channels)
    perturbed = exact * (1 + 2 ** -9 * torch.randn_like(exact))

    def batch(t):
        return t.to(torch.bfloat16).expand(n, -1, -1, -1).contiguous().permute(0, 3, 1, 2)

    return batch(perturbed), batch(exact)


@pytest.mark.parametrize("fault", ["none", "another tile's values", "off by 5%"])
def test_one_bad_tile_among_20000_is_rejected(stem_at_scale, fault):
    got, library = stem_at_scale
    tile = _tile(got, slice(128 * 12345, 128 * 12346))
    assert tile.shape == (128, 64)
    kept = tile.clone()
    try:
        if fault == "another tile's values":
            tile.copy_(_tile(got, slice(128 * 777, 128 * 778)))
        elif fault == "off by 5%":
            tile.copy_(kept.float() * 1.05)
        verdicts = compare.conv_verdicts([got], [library])
    finally:
        tile.copy_(kept)
    normwise, verdict = verdicts[0], max(verdicts, key=lambda v: v.ratio)
    assert normwise.measure == "normwise error" and normwise.ratio < 1 / 2  # it alone passes
    if fault == "none":
        assert verdict.ratio <= HEADROOM, verdict
    else:
        assert verdict.ratio > 1.4, verdict
        # one of the tile's two 64-pixel halves
        assert verdict.where.split(",")[0] in ("pixels 1580160-1580223",
                                               "pixels 1580224-1580287"), verdict


def test_a_bias_cancelling_the_conv_output_is_not_a_fault():
    """Where a bias cancels most of the conv output (|mean|/std of 32-64 per channel; real raw
    conv outputs have 10-30), the library's fp16 rounding of the conv output before the bias
    leaves an error of ~18 rounding units in every tile alike: no tile-local fault, and within
    the normwise bound. The median term accepts it; one tile off by 5% still stands out. (In
    bf16 the same error, 8x larger, is beyond the normwise bound too.)"""
    channels = 128
    mean = torch.empty(channels, dtype=torch.float64).uniform_(32, 64) \
        * torch.randn(channels).sign()
    z = (mean.view(1, -1, 1, 1) + torch.randn(4, channels, 24, 24, dtype=torch.float64))
    z = z.contiguous(memory_format=torch.channels_last)
    bias = -mean.view(1, -1, 1, 1)
    fused = (z + bias).half()
    library = (z.half().float() + bias.float()).half()
    errors, normwise = compare.tile_errors(fused, library)
    assert errors.min() > compare.TILE_ROUNDING_UNITS * compare.rounding_unit(torch.float16)
    assert normwise < compare.NORMWISE_BOUND
    verdict = conv_agreement([fused], [library])
    assert verdict.ratio <= 1 / 2, verdict
    _tile(fused, slice(128, 192)).mul_(1.05)
    verdict = conv_agreement([fused], [library])
    assert not verdict.ok, verdict
    assert "pixels 128-191" in verdict.where


def test_nan_and_inf_must_sit_in_the_same_places():
    ref = torch.randn(2, 64, 9, 9).contiguous(memory_format=torch.channels_last)
    ref[0, 3, 4, 4], ref[1, 5, 0, 0], ref[1, 6, 1, 1] = float("nan"), float("inf"), -float("inf")
    assert conv_agreement([ref * (1 + 1e-4)], [ref]).ok  # the data's own NaN/inf, carried
    for where, value in (((0, 0, 0, 0), float("nan")), ((0, 0, 0, 0), float("inf")),
                         ((1, 5, 0, 0), -float("inf")), ((0, 3, 4, 4), 0.0)):
        got = ref.clone()
        got[where] = value
        verdict = conv_agreement([got], [ref])
        assert not verdict.ok and "NaN/inf" in verdict.measure, (where, value)


def test_a_difference_beyond_the_dtype_range_is_a_fault():
    """fp16 garbage of opposite sign overflows got - ref: the check redoes the tile in fp32."""
    ref = torch.randn(1, 64, 16, 16).half()
    got = ref.clone()
    got[0, :, 0, 0], ref[0, :, 0, 0] = 60000.0, -60000.0
    assert not conv_agreement([got], [ref]).ok
    got[0, :, 0, 0] = -60000.0
    assert conv_agreement([got], [ref]).ok


def test_partial_tiles_at_the_edges_are_checked():
    """98 pixels x 72 channels: the last row tile has 34 pixels, the last channel group 8."""
    ref = torch.randn(2, 72, 7, 7)
    for rows, channels in ((slice(64, 98), slice(64, 72)), (slice(97, 98), slice(0, 72))):
        got = ref.clone(memory_format=torch.channels_last)
        _tile(got, rows, channels).zero_()
        verdict = conv_agreement([got], [ref])
        assert not verdict.ok, verdict
    # NCHW and channels_last measure alike
    cl = ref.contiguous(memory_format=torch.channels_last)
    noisy = ref * (1 + 1e-3 * torch.randn_like(ref))
    torch.testing.assert_close(compare.tile_errors(noisy, ref)[0],
                               compare.tile_errors(noisy.contiguous(
                                   memory_format=torch.channels_last), cl)[0])


def test_tuning_leaves_out_a_path_with_one_bad_tile(monkeypatch):
    """ops.conv.agreeing: a candidate with one zeroed tile among 64 row tiles, or with one
    channel's statistics wrong, is left out with a warning naming where."""
    monkeypatch.setattr(conv_ops, "_agreed", {})
    correct, library = _fault_case(torch.float16, batch=32)
    zeroed = _planted(correct, "zeroed tile")
    shifted = _planted(correct, "one channel's mean shifted by 5% of its RMS")
    candidates = {"library": lambda: library, "triton": lambda: correct,
                  "cutlass": lambda: zeroed, "mkldnn": lambda: shifted}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = conv_ops.agreeing("bn_stats", "key", candidates)
    assert sorted(kept) == ["library", "triton"]
    messages = " ".join(str(w.message) for w in caught)
    assert "cutlass path disagrees" in messages and "pixels 640-703" in messages
    assert "mkldnn path disagrees" in messages and "channel 17" in messages
