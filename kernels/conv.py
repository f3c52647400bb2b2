"""Triton implicit-GEMM 2-D convolution over NHWC (channels_last) input with fused epilogues
(groundwork of the fused-convolution issue: kernel and launcher; ops, autotuning and the
per-shape dispatcher come next).

    out[m, n] = epilogue( sum_k A[m, k] * B[k, n]  (+ sum_k' A2[m, k'] * B2[k', n]) )

m runs over output pixels (N*OH*OW), n over output channels, k over (kh, kw, c_in). A is read
straight from the NHWC input (implicit im2col, zero padding by masking), B is the weight packed
as [KH, KW, C_in, C_out]. The optional second pair is the projection shortcut of a bottleneck
(a strided 1x1 conv of another NHWC tensor) accumulated into the same tile: one GEMM over the
concatenated K, as relu(conv3(y)*s3 + conv_ds(x)*sd + b) with the BN scales folded into B, B2.

Epilogue options are constexprs (unused ones cost nothing): per-output-channel scale and bias,
residual add, ReLU, and per-tile mean / M2 of the raw conv output for training-mode BatchNorm
statistics (merged exactly afterwards: no E[x^2] - E[x]^2).

Prologue option ("ConvBNfprop"): A = relu(x * pscale[c] + pshift[c]) applied to each input
tile as it is loaded, with the previous layer's training BN as per-input-channel scale/shift:
the normalised activation is never written to memory. The zero padding stays zero (the
transform applies to in-bounds elements only), as padding the activation would.
"""

import torch
import triton
import triton.language as tl

from fused_resnet import tuning

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps). GPU: each compiles for sm_90 without spills
# (tests/test_triton_aot.py); the launcher measures them once per problem shape and keeps the
# fastest. Interpreter (CPU): one config with few, large programs.
GPU_CONFIGS = [(128, 128, 64, 8), (128, 64, 64, 4), (64, 128, 64, 4), (64, 64, 64, 4)]
INTERPRETER_CONFIG = (64, 32, 16, 4)


def gpu_configs(c_in: int, prologue: bool = False):
    """Configs for a C_in: when C_in is not a multiple of BLOCK_K (the C_in=3 stem) every k is
    decomposed into (tap, channel), which costs registers: 128x64 on 4 warps spills there.
    With the BN + ReLU prologue (and the statistics epilogue it comes with) the 128x128 and
    64x128 tiles spill on sm_90: only the tiles with 64 output channels per program."""
    configs = GPU_CONFIGS if all(c_in % cfg[2] == 0 for cfg in GPU_CONFIGS) else \
        [cfg for cfg in GPU_CONFIGS if cfg != (128, 64, 64, 4)]
    if prologue:
        configs = [cfg for cfg in configs if cfg[1] == 64]
    return configs


@triton.jit
def _conv_kernel(x_ptr, w_ptr, x2_ptr, w2_ptr, out_ptr, scale_ptr, bias_ptr, res_ptr,
                 tile_mean_ptr, tile_m2_ptr, pscale_ptr, pshift_ptr,
                 N, H, W, C_in, OH, OW, C_out, H2, W2, C2,
                 stride, pad, stride2,
                 KH: tl.constexpr, KW: tl.constexpr, HAS_SHORTCUT: tl.constexpr,
                 HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                 RELU: tl.constexpr, STATS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 TAP_PER_CHUNK: tl.constexpr, PROLOGUE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    M = N * OH * OW
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
    # KH*KW loops and spill). When C_in is a multiple of BLOCK_K every chunk lies in one tap
    # and the tap is a scalar; otherwise (the C_in=3 stem) each k is decomposed.
    K = KH * KW * C_in
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        if TAP_PER_CHUNK:
            tap = k0 // C_in
            kh = tap // KW
            kw = tap % KW
            ih = oh * stride - pad + kh
            iw = ow * stride - pad + kw
            row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_row = ((img * H + ih) * W + iw).to(tl.int64) * C_in
            c = (k0 % C_in) + tl.arange(0, BLOCK_K)
            a_ptrs = x_ptr + x_row[:, None] + c[None, :]
            a_ok = row_ok[:, None] & k_ok[None, :]
        else:
            c = offs_k % C_in
            tap = offs_k // C_in
            ih = oh[:, None] * stride - pad + (tap // KW)[None, :]
            iw = ow[:, None] * stride - pad + (tap % KW)[None, :]
            a_ok = (m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0)
                    & (iw < W))
            a_ptrs = x_ptr + ((img[:, None] * H + ih) * W + iw).to(tl.int64) * C_in + c[None, :]
        a = tl.load(a_ptrs, mask=a_ok, other=0.0)
        if PROLOGUE:  # the previous BN + ReLU, in fp32, on in-bounds elements only
            c_ok = c < C_in
            if TAP_PER_CHUNK:
                ps = tl.load(pscale_ptr + c, mask=c_ok, other=0.0)[None, :]
                pb = tl.load(pshift_ptr + c, mask=c_ok, other=0.0)[None, :]
            else:
                ps = tl.load(pscale_ptr + c, mask=c_ok, other=0.0)
                pb = tl.load(pshift_ptr + c, mask=c_ok, other=0.0)
            t = a.to(tl.float32) * ps + pb
            a = tl.where(a_ok & (t > 0.0), t, 0.0).to(x_ptr.dtype.element_ty)
        b = tl.load(w_ptr + offs_k[:, None] * C_out + offs_n[None, :],
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
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

    if STATS:  # this tile's exact mean and sum of squared deviations, per output channel
        rows = tl.sum(m_ok.to(tl.float32), axis=0)
        tile_mean = tl.sum(tl.where(m_ok[:, None], acc, 0.0), axis=0) / rows
        dev = tl.where(m_ok[:, None], acc - tile_mean[None, :], 0.0)
        tl.store(tile_mean_ptr + pid_m * C_out + offs_n, tile_mean, mask=n_ok)
        tl.store(tile_m2_ptr + pid_m * C_out + offs_n, tl.sum(dev * dev, axis=0), mask=n_ok)

    y = acc
    if HAS_SCALE:
        y = y * tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    out_offs = offs_m.to(tl.int64)[:, None] * C_out + offs_n[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if HAS_RESIDUAL:
        y = y + tl.load(res_ptr + out_offs, mask=ok, other=0.0).to(tl.float32)
    if RELU:
        y = tl.where(y > 0.0, y, 0.0)
    tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------
def pack_weight(weight: torch.Tensor, scale=None) -> torch.Tensor:
    """[C_out, C_in, KH, KW] -> [KH, KW, C_in, C_out] contiguous (the kernel's B), optionally
    with a per-output-channel scale folded in (computed in fp32, then cast)."""
    w = weight.float()
    if scale is not None:
        w = w * scale.float().view(-1, 1, 1, 1)
    return w.permute(2, 3, 1, 0).contiguous().to(weight.dtype)


def _dot_precision(dtype, allow_tf32: bool) -> str:
    """fp32 input: exact fp32 products unless TF32 is allowed (as torch's allow_tf32 flags
    decide for cuDNN); fp16/bf16: tensor cores ("tf32" is the default, ignored for them)."""
    return "ieee" if dtype == torch.float32 and not allow_tf32 else "tf32"


def conv2d_nhwc(x, w_packed, stride, padding, *, scale=None, bias=None, residual=None,
                relu=False, stats=False, shortcut=None, prologue=None, allow_tf32=False,
                config=None):
    """Fused conv over an NHWC (channels_last) input.

    prologue: optional fp32 (scale, shift) per input channel: the conv then reads
    relu(x * scale + shift) instead of x (not with a shortcut).

    x: [N, C_in, H, W] channels_last; w_packed: pack_weight(...) of a [C_out, C_in, KH, KW]
    weight; shortcut: optional (x2, w2_packed, stride2) with x2 channels_last [N, C2, H2, W2]
    and w2 packed from a [C_out, C2, 1, 1] weight. config: a (BLOCK_M, BLOCK_N, BLOCK_K,
    num_warps) tuple, else chosen (measured once per shape on a GPU). Returns out
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
    if n * oh * ow >= 2**31 - 256:
        raise ValueError(f"conv2d_nhwc: {n * oh * ow} output pixels exceed the int32 pixel index")
    x = x.contiguous(memory_format=torch.channels_last)
    out = torch.empty((n, c_out, oh, ow), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    if shortcut is not None:
        x2, w2, stride2 = shortcut
        x2 = x2.contiguous(memory_format=torch.channels_last)
        h2, w2_size, c2 = x2.shape[2], x2.shape[3], x2.shape[1]
    else:
        x2, w2, stride2, h2, w2_size, c2 = x, w_packed, 1, 1, 1, 1
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)

    def launch(cfg):
        block_m, block_n, block_k, num_warps = cfg
        grid = (triton.cdiv(n * oh * ow, block_m), triton.cdiv(c_out, block_n))
        tile_mean = tile_m2 = out  # placeholders when STATS is off
        if stats:
            tile_mean = torch.empty((grid[0], c_out), dtype=torch.float32, device=x.device)
            tile_m2 = torch.empty_like(tile_mean)
        _conv_kernel[grid](
            x, w_packed, x2, w2, out,
            scale if scale is not None else out, bias if bias is not None else out,
            residual if residual is not None else out, tile_mean, tile_m2,
            prologue[0] if prologue is not None else out,
            prologue[1] if prologue is not None else out,
            n, h, w, c_in, oh, ow, c_out, h2, w2_size, c2, stride, padding, stride2,
            KH=kh, KW=kw, HAS_SHORTCUT=shortcut is not None, HAS_SCALE=scale is not None,
            HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, RELU=relu,
            STATS=stats, DOT_PRECISION=_dot_precision(x.dtype, allow_tf32),
            TAP_PER_CHUNK=c_in % block_k == 0, PROLOGUE=prologue is not None,
            BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=block_k, num_warps=num_warps)
        return tile_mean, tile_m2, block_m

    if config is None:
        config = _choose_config(x, w_packed, stride, padding, shortcut is not None, stats,
                                prologue is not None, launch)
    tile_mean, tile_m2, block_m = launch(config)
    if not stats:
        return out, None
    return out, _merge_tile_stats(tile_mean, tile_m2, n * oh * ow, block_m)


def _choose_config(x, w_packed, stride, padding, has_shortcut, stats, has_prologue, launch):
    if x.device.type == "cpu":
        return INTERPRETER_CONFIG
    key = ("conv_tile", x.device.index, x.dtype, tuple(x.shape), tuple(w_packed.shape), stride,
           padding, has_shortcut, stats, has_prologue)
    if not tuning.can_measure():  # e.g. during CUDA-graph capture: the earlier choice if any
        return tuning.cached(key) or gpu_configs(x.shape[1], has_prologue)[0]
    return tuning.tuned_choice(key, {cfg: (lambda cfg=cfg: launch(cfg))
                                     for cfg in gpu_configs(x.shape[1], has_prologue)})


def _merge_tile_stats(tile_mean, tile_m2, rows, block_m):
    """Exact merge of per-tile (mean, M2): mean = sum(n_t*mean_t)/N,
    M2 = sum(M2_t) + sum(n_t*(mean_t - mean)^2). Returns (mean, biased var)."""
    tiles = tile_mean.shape[0]
    counts = torch.full((tiles, 1), float(block_m), device=tile_mean.device)
    counts[-1] = rows - block_m * (tiles - 1)
    mean = (counts * tile_mean).sum(dim=0) / rows
    m2 = tile_m2.sum(dim=0) + (counts * (tile_mean - mean).square()).sum(dim=0)
    return mean, m2 / rows
