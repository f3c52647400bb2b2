"""Triton implicit-GEMM 2-D convolution over NHWC (channels_last) input with fused epilogues:
the kernel, its tile configurations and its launcher, which measures the tiles once per shape
(fused_resnet.tuning). The torch.library ops and the per-shape dispatcher that choose this
kernel or another implementation live in fused_resnet.ops.conv.

    out[m, n] = epilogue( sum_k A[m, k] * B[k, n]  (+ sum_k' A2[m, k'] * B2[k', n]) )

m runs over output pixels (N*OH*OW), n over output channels, k over (kh, kw, c_in). A is read
straight from the NHWC input (implicit im2col, zero padding by masking), B is the weight packed
as [KH, KW, C_in, C_out]. The optional second pair is the projection shortcut of a bottleneck
(a strided 1x1 conv of another NHWC tensor) accumulated into the same tile: one GEMM over the
concatenated K, as relu(conv3(y)*s3 + conv_ds(x)*sd + b) with the BN scales folded into B, B2.

Epilogue options are constexprs (unused ones cost nothing): per-output-channel scale and bias,
residual add, ReLU, and per-tile mean / M2 of the raw conv output for training-mode BatchNorm
statistics (merged exactly afterwards: no E[x^2] - E[x]^2).

Prologue option ("ConvBNfprop"): A = relu((x - pmean[c]) * pscale[c] + pshift[c]) applied to
each input tile as it is loaded, with the previous layer's training BN in its centred form
(per input channel: batch mean, weight/std, bias): the normalised activation is never written
to memory. The zero padding stays zero (the
transform applies to in-bounds elements only), as padding the activation would.
"""

import contextlib
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from fused_resnet import devices, layout, tuning, weight_cache
from fused_resnet.kernels import bn_act

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). GPU: the launcher measures the configs
# that suit a problem once per shape and keeps the fastest; every config it can launch compiles
# for sm_90 without spills and with 16-byte loads (python -m fused_resnet.aot checks the PTX).
# Interpreter (CPU): one config with few, large programs.
GPU_CONFIGS_16BIT = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4),
                     (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)]
# fp32 operands take twice the shared memory per tile, and without TF32 the products run on
# the FMA units (registers per thread grow with the tile): smaller K steps.
GPU_CONFIGS_FP32 = [(128, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 64, 32, 4, 3)]
INTERPRETER_CONFIG = (64, 32, 16, 4, 1)
# Configs measured per problem at most (gpu_configs says which).
MAX_MEASURED = 3
# Consecutive programs walk GROUP_M row tiles across every column tile, so an activation tile
# is still in L2 when the next column tile reads it (the weights are small and stay there).
GROUP_M = 8
# Channel counts are padded to a multiple of this (the C_in = 3 stem to 8, as cuDNN does) so
# every pixel's channel run starts on a 16-byte boundary and loads as whole vectors.
CHANNEL_ALIGN = 8


def _block_k(c_in: int, block_k: int) -> int:
    """The config's K step, halved (down to 16, the smallest tensor-core K) until it divides
    C_in, so C_in = 16 or 32 still gets one tap per K step; else unchanged (the small-C_in
    path)."""
    for k in (block_k, block_k // 2, block_k // 4):
        if k >= 16 and c_in % k == 0:
            return k
    return block_k


def gpu_configs(c_in: int, c_out: int, dtype: torch.dtype = torch.float16,
                prologue: bool = False, residual: bool = False, rows: Optional[int] = None,
                sms: Optional[int] = None, limit: Optional[int] = MAX_MEASURED):
    """The tile configs worth measuring for a problem, largest tile first.

    Which can run well: no tile much wider than C_out. No 256-wide tiles where more than the
    accumulator lives in registers: with C_in not a multiple of 16 (the padded stem: the
    per-element (tap, channel) decomposition), with the BN + ReLU prologue (its fp32 transform
    of the A tile, and the statistics epilogue it comes with), with a residual (its tile,
    loaded in the epilogue). Each of those spills at 128x256 on sm_90 (python -m
    fused_resnet.aot shows it).

    Which are measured (each costs a compile and a timing at first use): one config per tile
    area. Two tiles of equal area do the same work per program and move the same bytes in all
    (the activations are read once per column tile, the weights once per row tile:
    M*K*C_out*(1/BLOCK_M + 1/BLOCK_N) either way); the one with 128 rows is kept, for fewer
    row tiles (fewer partial BN statistics to merge). Knowing the output rows (N*OH*OW) and
    the GPU's multiprocessor count `sms`, only tiles whose grid gives every multiprocessor a
    program (a larger tile leaves some idle; if none fills the GPU, the smallest). Then the
    `limit` largest: among tiles that fill the GPU, larger ones read less per output.
    limit=None: every config some problem could measure (static analysis compiles them)."""
    configs = GPU_CONFIGS_FP32 if dtype == torch.float32 else GPU_CONFIGS_16BIT
    widest_n = max(64, triton.next_power_of_2(c_out))
    keep = [(m, n, _block_k(c_in, k), w, s) for m, n, k, w, s in configs if n <= widest_n]
    if prologue or residual or any(c_in % cfg[2] for cfg in keep):
        keep = [cfg for cfg in keep if max(cfg[0], cfg[1]) <= 128]
    if prologue and dtype == torch.float32:
        # fp32 operands (FMA products, or three TF32 passes) beside the prologue's fp32
        # transform of the A tile: the 128-row tiles spill on sm_90 with Triton 3.6
        keep = [cfg for cfg in keep if cfg[0] * cfg[1] <= 64 * 64]
    keep = _one_per_area(keep)
    if rows is not None and sms is not None:
        keep = [cfg for cfg in keep
                if triton.cdiv(rows, cfg[0]) * triton.cdiv(c_out, cfg[1]) >= sms] or keep[-1:]
    return keep if limit is None else keep[:limit]


def _one_per_area(configs):
    """The first config of each tile area (the lists put the 128-row tile first)."""
    kept = {}
    for cfg in configs:
        kept.setdefault(cfg[0] * cfg[1], cfg)
    return list(kept.values())


@triton.jit
def _grouped_tile(pid, M, C_out, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  GROUP: tl.constexpr):
    """(row tile, column tile) of program `pid` in grouped order: GROUP row tiles at a time,
    every column tile of them before the next group."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(C_out, BLOCK_N)
    per_group = GROUP * tiles_n
    first_m = (pid // per_group) * GROUP
    rows = tl.minimum(tiles_m - first_m, GROUP)
    within = pid % per_group
    return first_m + within % rows, within // rows


# Sizes and strides are run-time values (one compiled variant serves every batch, image size
# and stride); channel counts are specialised, their divisibility by 16 is what lets the loads
# vectorise.
@triton.jit(do_not_specialize=["N", "H", "W", "OH", "OW", "H2", "W2", "stride", "pad", "stride2"])
def _conv_kernel(x_ptr, w_ptr, x2_ptr, w2_ptr, out_ptr, scale_ptr, bias_ptr, res_ptr,
                 tile_mean_ptr, tile_m2_ptr, pmean_ptr, pscale_ptr, pshift_ptr,
                 N, H, W, C_in, OH, OW, C_out, H2, W2, C2,
                 stride, pad, stride2,
                 KH: tl.constexpr, KW: tl.constexpr, HAS_SHORTCUT: tl.constexpr,
                 HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                 RELU: tl.constexpr, STATS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 SMALL_C_IN: tl.constexpr, PROLOGUE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP: tl.constexpr):
    M = N * OH * OW
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, C_out, BLOCK_M, BLOCK_N, GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # int32: N*OH*OW < 2^31 (checked)
    m_ok = offs_m < M
    img = offs_m // (OH * OW)
    pix = offs_m % (OH * OW)
    oh = pix // OW
    ow = pix % OW
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < C_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # One loop over K = KH*KW*C_in (a single pipelined loop; unrolling the taps would give
    # KH*KW loops and spill). SMALL_C_IN == 0: C_in is a multiple of BLOCK_K, so every chunk
    # lies in one tap (a scalar) and starts at a multiple of BLOCK_K within the pixel's
    # channels: the hint lets Triton load the A tile as 16-byte vectors through cp.async.
    # Otherwise (the stem) C_in == SMALL_C_IN, a compile-time multiple of 8: each k is
    # decomposed into (tap, channel), and runs of 8 channels are still whole 16-byte vectors.
    if SMALL_C_IN == 0:
        c_in = C_in
    else:
        c_in = SMALL_C_IN
    K = KH * KW * c_in
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if SMALL_C_IN == 0:
            tap = k0 // c_in
            ih = oh * stride - pad + tap // KW
            iw = ow * stride - pad + tap % KW
            row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            # int32 pixel index: N*H*W < 2^31 (checked by the launcher); int64 element offset
            x_row = ((img * H + ih) * W + iw).to(tl.int64) * c_in
            c = tl.multiple_of(k0 % c_in, BLOCK_K) + tl.arange(0, BLOCK_K)
            a_ok = row_ok[:, None]
            b_ok = n_ok[None, :]
            a = tl.load(x_ptr + x_row[:, None] + c[None, :], mask=a_ok, other=0.0)
        else:
            k_ok = offs_k < K
            c = offs_k % c_in
            tap = offs_k // c_in
            ih = oh[:, None] * stride - pad + (tap // KW)[None, :]
            iw = ow[:, None] * stride - pad + (tap % KW)[None, :]
            a_ok = (m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0)
                    & (iw < W))
            b_ok = k_ok[:, None] & n_ok[None, :]
            x_offs = ((img[:, None] * H + ih) * W + iw).to(tl.int64) * c_in + c[None, :]
            a = tl.load(x_ptr + x_offs, mask=a_ok, other=0.0)
        if PROLOGUE:  # the previous BN + ReLU, centred, in fp32, on in-bounds elements only
            pm = tl.load(pmean_ptr + c)[None, :]
            ps = tl.load(pscale_ptr + c)[None, :]
            pb = tl.load(pshift_ptr + c)[None, :]
            t = (a.to(tl.float32) - pm) * ps + pb
            # torch.relu keeps NaN (t != t); the zero padding stays zero
            a = tl.where(a_ok & ((t > 0.0) | (t != t)), t, 0.0).to(x_ptr.dtype.element_ty)
        b = tl.load(w_ptr + offs_k[:, None] * C_out + offs_n[None, :], mask=b_ok, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    if HAS_SHORTCUT:  # strided 1x1 conv of x2 into the same accumulator
        x2_row = ((img * H2 + oh * stride2) * W2 + ow * stride2).to(tl.int64) * C2
        for c0 in range(0, C2, BLOCK_K):
            offs_k = c0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < C2
            a = tl.load(x2_ptr + x2_row[:, None] + offs_k[None, :],
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w2_ptr + offs_k[:, None] * C_out + offs_n[None, :],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    if STATS:  # this tile's exact mean and sum of squared deviations, per output channel,
        # stored channel-major ([C_out, row tiles]) for the merge kernel
        rows = tl.sum(m_ok.to(tl.float32), axis=0)
        tile_mean = tl.sum(tl.where(m_ok[:, None], acc, 0.0), axis=0) / rows
        dev = tl.where(m_ok[:, None], acc - tile_mean[None, :], 0.0)
        stat_offs = offs_n * tl.cdiv(M, BLOCK_M) + pid_m
        tl.store(tile_mean_ptr + stat_offs, tile_mean, mask=n_ok)
        tl.store(tile_m2_ptr + stat_offs, tl.sum(dev * dev, axis=0), mask=n_ok)

    y = acc
    if HAS_SCALE:
        y = y * tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    out_offs = offs_m.to(tl.int64)[:, None] * C_out + offs_n[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if HAS_RESIDUAL:
        y = y + tl.load(res_ptr + out_offs, mask=ok, other=0.0).to(tl.float32)
    if RELU:  # as torch.relu: NaN stays NaN
        y = tl.where((y > 0.0) | (y != y), y, 0.0)
    tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------
def pack_weight(weight: torch.Tensor, scale=None) -> torch.Tensor:
    """[C_out, C_in, KH, KW] -> [KH, KW, C_in', C_out] contiguous (the kernel's B), C_in zero-
    padded to C_in' = a multiple of CHANNEL_ALIGN (the stem's 3 to 8, as conv2d_nhwc pads its
    input), optionally with a per-output-channel scale folded in (computed in fp32, then cast).
    Packed once per state of the weight (and scale) and reused (fused_resnet.weight_cache):
    an in-place update of either (optimizer step, load_state_dict) packs it again."""
    return weight_cache.derived(weight, "triton_conv_packed",
                                lambda: _pack_weight(weight, scale), extra=scale)


def _pack_weight(weight: torch.Tensor, scale) -> torch.Tensor:
    c_out, c_in, kh, kw = weight.shape
    w = weight if scale is None else weight.float() * scale.float().view(-1, 1, 1, 1)
    c_pad = _aligned_channels(c_in)
    packed = weight.new_empty((kh, kw, c_pad, c_out))  # fresh and dense, whatever w's strides
    if c_pad > c_in:
        packed[:, :, c_in:].zero_()
    packed[:, :, :c_in].copy_(w.permute(2, 3, 1, 0))  # one pass (and the cast back, if scaled)
    return packed


def _dot_precision(dtype, allow_tf32: bool) -> str:
    """fp32 input: exact fp32 products unless TF32 is allowed (as PyTorch decides for cuDNN's
    convs), then three TF32 passes (each operand split into a TF32 high part and a TF32 low
    part): Triton's single-pass TF32 truncates the operands where cuDNN rounds them, an error
    several times cuDNN's; the split gives about fp32 accuracy on the tensor cores.
    fp16/bf16: tensor cores ("tf32" is the default, ignored for them)."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32x3" if allow_tf32 else "ieee"


def _pad_channels(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """`t` with dimension `dim` zero-padded to `size` (the same tensor if already that size).
    The padded copy is dense in t's dimension order: F.pad keeps the stride order of its input,
    and a packed weight with size-1 dimensions (C_out = 1) can have any strides there, which
    would put the padded channels in the wrong place for the kernel's dense indexing."""
    if t.shape[dim] == size:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, size - t.shape[dim]]
    return torch.nn.functional.pad(t, pad).contiguous()


def _nhwc_padded(x: torch.Tensor, channels: int) -> torch.Tensor:
    """x as the kernel reads it: dense channels_last with C zero-padded to `channels`. x itself
    when it already is; else one pass over x: a fresh channels_last tensor whose pad channels
    alone are zeroed, x copied into the rest (F.pad fills the whole tensor first, and its
    result keeps x's layout, which may need another copy)."""
    c = x.shape[1]
    if c == channels:
        return x.contiguous(memory_format=torch.channels_last)
    padded = torch.empty((x.shape[0], channels, *x.shape[2:]), dtype=x.dtype, device=x.device,
                         memory_format=torch.channels_last)
    padded[:, c:].zero_()
    padded[:, :c].copy_(x)
    return padded


def _aligned_channels(c: int) -> int:
    return triton.cdiv(c, CHANNEL_ALIGN) * CHANNEL_ALIGN


def check_index_range(n: int, pixels: int, what: str) -> None:
    """Every tensor the kernel indexes by pixel must fit its int32 pixel index."""
    if not layout.fits_int32_pixel_index(n, pixels):
        raise ValueError(f"conv2d_nhwc: {n * pixels} {what} pixels exceed the kernel's int32 "
                         f"pixel index")


@devices.launches_on_input_device
def conv2d_nhwc(x, w_packed, stride, padding, *, scale=None, bias=None, residual=None,
                relu=False, stats=False, shortcut=None, prologue=None, allow_tf32=False,
                config=None):
    """Fused conv over an NHWC (channels_last) input.

    prologue: optional fp32 (mean, scale, shift) per input channel: the conv then reads
    relu((x - mean) * scale + shift) instead of x (not with a shortcut).

    x: [N, C_in, H, W] channels_last; w_packed: pack_weight(...) of a [C_out, C_in, KH, KW]
    weight; shortcut: optional (x2, w2_packed, stride2) with x2 channels_last [N, C2, H2, W2]
    and w2 packed from a [C_out, C2, 1, 1] weight. config: a (BLOCK_M, BLOCK_N, BLOCK_K,
    num_warps, num_stages) tuple, else chosen (measured once per shape on a GPU). Returns out
    (channels_last [N, C_out, OH, OW]) and, if stats, the per-channel (mean, biased var) of the
    raw conv output (before scale/bias/residual/ReLU), in fp32.
    """
    n, c_in, h, w = x.shape
    kh, kw, _, c_out = w_packed.shape
    oh = (h + 2 * padding - kh) // stride + 1
    ow = (w + 2 * padding - kw) // stride + 1
    if prologue is not None and shortcut is not None:
        raise ValueError("conv2d_nhwc: the BN + ReLU prologue applies to the main input only; "
                         "no shortcut with it")
    check_index_range(n, oh * ow, "output")
    check_index_range(n, h * w, "input")
    # Whole 16-byte channel runs: pad C_in (the stem's 3) with zero channels, which add
    # nothing to the products (and a zero prologue mean/scale/shift keeps them zero).
    c_pad = _aligned_channels(c_in)
    x = _nhwc_padded(x, c_pad)
    w_packed = _pad_channels(w_packed, 2, c_pad)
    if prologue is not None:
        prologue = tuple(_pad_channels(p, 0, c_pad).contiguous() for p in prologue)
    out = torch.empty((n, c_out, oh, ow), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    if shortcut is not None:
        x2, w2, stride2 = shortcut
        c2_pad = _aligned_channels(x2.shape[1])
        x2 = _nhwc_padded(x2, c2_pad)
        w2 = _pad_channels(w2, 2, c2_pad)
        h2, w2_size, c2 = x2.shape[2], x2.shape[3], x2.shape[1]
        check_index_range(n, h2 * w2_size, "shortcut input")
    else:
        x2, w2, stride2, h2, w2_size, c2 = x, w_packed, 1, 1, 1, 1
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)

    def launch(cfg, compile_only=False):
        block_m, block_n, block_k, num_warps, num_stages = cfg
        tiles_m = triton.cdiv(n * oh * ow, block_m)
        grid = (tiles_m * triton.cdiv(c_out, block_n),)
        tile_mean = tile_m2 = out  # placeholders when STATS is off
        if stats:
            tile_mean = torch.empty((c_out, tiles_m), dtype=torch.float32, device=x.device)
            tile_m2 = torch.empty_like(tile_mean)
        _kernel_call(grid, compile_only)(
            x, w_packed, x2, w2, out,
            scale if scale is not None else out, bias if bias is not None else out,
            residual if residual is not None else out, tile_mean, tile_m2,
            *(prologue if prologue is not None else (out, out, out)),
            n, h, w, c_pad, oh, ow, c_out, h2, w2_size, c2, stride, padding, stride2,
            KH=kh, KW=kw, HAS_SHORTCUT=shortcut is not None, HAS_SCALE=scale is not None,
            HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, RELU=relu,
            STATS=stats, DOT_PRECISION=_dot_precision(x.dtype, allow_tf32),
            SMALL_C_IN=0 if c_pad % block_k == 0 else c_pad, PROLOGUE=prologue is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP=GROUP_M,
            num_warps=num_warps, num_stages=num_stages)
        return tile_mean, tile_m2, block_m

    if config is None:
        config = _choose_config(x, w_packed, stride, padding, launch, (
            ("shortcut", None if shortcut is None else (tuple(x2.shape), tuple(w2.shape),
                                                        stride2)),
            ("scale", scale is not None), ("bias", bias is not None),
            ("residual", None if residual is None else residual.dtype), ("relu", relu),
            ("stats", stats), ("prologue", prologue is not None),
            ("dot", _dot_precision(x.dtype, allow_tf32))))
    tile_mean, tile_m2, block_m = launch(config)
    if not stats:
        return out, None
    return out, bn_act.merge_partial_stats(tile_mean, tile_m2, n * oh * ow, block_m,
                                           channel_major=True)


def _kernel_call(grid, compile_only: bool):
    """_conv_kernel launched on `grid`, or only compiled for the arguments it is given (Triton's
    warmup: nothing runs)."""
    if compile_only:
        return functools.partial(_conv_kernel.warmup, grid=grid)
    return _conv_kernel[grid]


def _choose_config(x, w_packed, stride, padding, launch, flavour: tuple):
    """The tile config to launch: measured once per key on a GPU, every candidate compiled
    first, in parallel. flavour: (name, value) pairs of everything else that changes the
    compiled kernel or its speed (epilogue, prologue, shortcut geometry, dot precision)."""
    if x.device.type == "cpu":
        return INTERPRETER_CONFIG
    n, c_in, h, w = x.shape
    kh, kw, _, c_out = w_packed.shape
    rows = n * ((h + 2 * padding - kh) // stride + 1) * ((w + 2 * padding - kw) // stride + 1)
    flags = dict(flavour)
    if x.device.type == "cuda":
        sms, limit = _multiprocessors(x.device.index), MAX_MEASURED
    else:  # meta tensors (static analysis): every config some problem could measure
        sms, limit = None, None
    configs = gpu_configs(c_in, c_out, x.dtype, flags["prologue"], flags["residual"] is not None,
                          rows=rows, sms=sms, limit=limit)
    key = ("conv_tile", x.device.index, x.dtype, tuple(x.shape), tuple(w_packed.shape), stride,
           padding, flavour)
    if not tuning.can_measure():  # e.g. during CUDA-graph capture: the earlier choice, else
        return tuning.cached(key, configs) or configs[-1]  # the smallest tile (fits every GPU)
    return tuning.tuned_choice(
        key, {cfg: (lambda cfg=cfg: launch(cfg)) for cfg in configs}, persist=True,
        describe=lambda: _describe_tile_key(key),
        prepare=lambda: compile_in_parallel(lambda cfg: launch(cfg, compile_only=True),
                                            configs))


def _describe_tile_key(key: tuple) -> str:
    """A tile key as one readable line (the tuner's progress line)."""
    _, _, dtype, x_shape, w_shape, stride, padding, flavour = key
    return (f"conv tile {str(dtype).removeprefix('torch.')} x{'x'.join(map(str, x_shape))} "
            f"w{'x'.join(map(str, w_shape))} stride {stride} padding {padding} "
            + " ".join(f"{k}={v}" for k, v in flavour if v not in (None, False)))


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def compile_in_parallel(compile_one: Callable, configs, workers: Optional[int] = None) -> None:
    """compile_one(cfg) (a compile-only launch) for every config, the compiles running at once
    in a thread pool: each call binds its arguments and looks up Triton's caches on this
    thread, and Triton's AsyncCompileMode hands the compile itself to the pool (Triton 3.6 to
    3.8 have it; Triton releases the GIL while it compiles, ptxas is a separate process).
    Returns when every compile has finished. A config that fails to compile is left to its
    timed launch, which raises the same error (the tuner then drops that config, warning);
    without AsyncCompileMode the configs compile one after another."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        AsyncCompileMode = None
    workers = workers or min(len(configs), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        mode = AsyncCompileMode(pool, ignore_errors=True) if AsyncCompileMode and workers > 1 \
            else contextlib.nullcontext()
        with mode:
            for cfg in configs:
                try:
                    compile_one(cfg)
                except Exception:  # noqa: BLE001 - raised again by the config's timed launch
                    pass
