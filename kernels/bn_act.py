"""Triton kernels of the fused BatchNorm + add + ReLU op (see fused_resnet/ops/bn_add_relu.py
for the op structure and fused_resnet/reference.py for the math they must match).

Tensors are dense and seen in memory order as [outer, C, inner] (fused_resnet.layout): the
channel of memory offset i is (i // inner) % C, so one kernel serves NCHW (inner = H*W) and
NHWC (inner = 1). Arithmetic in fp32; indices in int64. Reductions are two-level: fp32 partial
results per (split, channel), then merged in a fixed order (deterministic, no atomics).
"""

import torch
import triton
import triton.language as tl

from fused_resnet import layout, reference

# ---------------------------------------------------------------------------------------------
# Launch parameters. The interpreter runs each program instance in Python, so there a few big
# programs are much faster than many small ones; on the GPU, sizes that fill an H100.


def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def _elementwise_block(t: torch.Tensor) -> int:
    return 8192 if _interpreted(t) else 1024


def _reduce_tiles(x: torch.Tensor):
    """(BLOCK_M, BLOCK_C): rows of the per-channel index space x channels per tile. Channels
    are contiguous in NHWC, one channel's plane is in NCHW."""
    if layout.is_channels_last(x):
        block_c = min(64, triton.next_power_of_2(x.shape[1]))
        return (4096 // block_c if _interpreted(x) else 16), block_c
    return (4096 if _interpreted(x) else 512), 1


def _reduce_splits(per_channel: int, channel_tiles: int, block_m: int, interpreted: bool) -> int:
    target_programs = 4 if interpreted else 1024
    by_work = triton.cdiv(per_channel, block_m)
    return max(1, min(by_work, max(1, target_programs // channel_tiles)))


# ---------------------------------------------------------------------------------------------
@triton.jit
def _memory_offsets(m, c, C, inner, CHANNELS_LAST: tl.constexpr):
    """Memory offset of the m-th element of channel c (m indexes the outer*inner elements)."""
    if CHANNELS_LAST:
        return m * C + c
    n = m // inner
    return (n * C + c) * inner + (m - n * inner)


@triton.jit
def _channel_tile(m0, end, c, c_ok, C, inner, BLOCK_M: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """Memory offsets and validity of a [BLOCK_M, BLOCK_C] tile: elements m0.. of channels c."""
    m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
    valid = (m < end)[:, None] & c_ok[None, :]
    return _memory_offsets(m[:, None], c[None, :], C, inner, CHANNELS_LAST), valid


@triton.jit
def _relu_bits(mask_ptr, offs, valid):
    byte = tl.load(mask_ptr + offs // 8, mask=valid, other=0)
    return ((byte >> (offs % 8).to(tl.uint8)) & 1) != 0


@triton.jit
def _stats_partial_kernel(x_ptr, mean_ptr, m2_ptr, C, inner, per_channel, rows_per_split,
                          BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                          CHANNELS_LAST: tl.constexpr):
    """Mean and M2 of each channel over one split of its elements; tiles merged with Chan's
    formula (each tile: exact mean, then sum of squared deviations)."""
    pid_c = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, per_channel)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs, valid = _channel_tile(m0, end, c, c_ok, C, inner, BLOCK_M, CHANNELS_LAST)
        x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        n_tile = tl.sum(valid.to(tl.float32), axis=0)
        mean_tile = tl.sum(x, axis=0) / tl.maximum(n_tile, 1.0)
        dev = tl.where(valid, x - mean_tile[None, :], 0.0)
        m2_tile = tl.sum(dev * dev, axis=0)
        n_new = count + n_tile
        share = n_tile / tl.maximum(n_new, 1.0)
        delta = mean_tile - mean
        mean = mean + delta * share
        m2 = m2 + m2_tile + delta * delta * count * share
        count = n_new
    tl.store(mean_ptr + split * C + c, mean, mask=c_ok)
    tl.store(m2_ptr + split * C + c, m2, mask=c_ok)


@triton.jit
def _stats_final_kernel(mean_part_ptr, m2_part_ptr, mean_ptr, var_ptr, C, per_channel,
                        rows_per_split, splits, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merges the partial (mean, M2) of every split exactly: mean = sum(n_p*mean_p)/N,
    M2 = sum(M2_p) + sum(n_p*(mean_p - mean)^2). Biased variance = M2/N."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    total = per_channel.to(tl.float32)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, splits, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        ok = (p < splits)[:, None] & c_ok[None, :]
        n_p = tl.minimum(rows_per_split, per_channel - p * rows_per_split).to(tl.float32)
        mean_p = tl.load(mean_part_ptr + p[:, None] * C + c[None, :], mask=ok, other=0.0)
        acc += tl.sum(tl.where(ok, n_p[:, None] * mean_p, 0.0), axis=0)
    mean = acc / total
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, splits, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        ok = (p < splits)[:, None] & c_ok[None, :]
        n_p = tl.minimum(rows_per_split, per_channel - p * rows_per_split).to(tl.float32)
        mean_p = tl.load(mean_part_ptr + p[:, None] * C + c[None, :], mask=ok, other=0.0)
        m2_p = tl.load(m2_part_ptr + p[:, None] * C + c[None, :], mask=ok, other=0.0)
        dev = mean_p - mean[None, :]
        m2 += tl.sum(tl.where(ok, m2_p + n_p[:, None] * dev * dev, 0.0), axis=0)
    tl.store(mean_ptr + c, mean, mask=c_ok)
    tl.store(var_ptr + c, m2 / total, mask=c_ok)


@triton.jit
def _apply_kernel(x_ptr, res_ptr, scale_ptr, shift_ptr, out_ptr, mask_ptr, numel, C, inner,
                  HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, SAVE_MASK: tl.constexpr,
                  BLOCK: tl.constexpr):
    """out = relu(x*scale + shift + residual); if SAVE_MASK, one mask bit per element, 8 per
    byte."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < numel
    ch = (offs // inner) % C
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + ch, mask=valid, other=0.0)
    shift = tl.load(shift_ptr + ch, mask=valid, other=0.0)
    y = x * scale + shift
    if HAS_RESIDUAL:
        y += tl.load(res_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if RELU:
        positive = (y > 0.0) & valid
        y = tl.where(positive | (y != y), y, 0.0)  # NaN stays NaN, as torch.relu
    if RELU and SAVE_MASK:
        bits = tl.reshape(positive.to(tl.int32), (BLOCK // 8, 8))
        weights = (1 << tl.arange(0, 8))[None, :]
        packed = tl.sum(bits * weights, axis=1).to(tl.uint8)
        byte_offs = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
        tl.store(mask_ptr + byte_offs, packed, mask=byte_offs < (numel + 7) // 8)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _grad_reduce_partial_kernel(grad_ptr, mask_ptr, x_ptr, mean_ptr, sum_dz_ptr, sum_dzxmu_ptr,
                                C, inner, per_channel, rows_per_split, RELU: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                                CHANNELS_LAST: tl.constexpr):
    """Partial sum(dz) and sum(dz*(x - mean)) of each channel over one split of its elements."""
    pid_c = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0)
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, per_channel)
    sum_dz = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_dzxmu = tl.zeros([BLOCK_C], dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs, valid = _channel_tile(m0, end, c, c_ok, C, inner, BLOCK_M, CHANNELS_LAST)
        dz = tl.load(grad_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        if RELU:
            dz = tl.where(_relu_bits(mask_ptr, offs, valid), dz, 0.0)
        x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        sum_dz += tl.sum(dz, axis=0)
        sum_dzxmu += tl.sum(tl.where(valid, dz * (x - mean[None, :]), 0.0), axis=0)
    tl.store(sum_dz_ptr + split * C + c, sum_dz, mask=c_ok)
    tl.store(sum_dzxmu_ptr + split * C + c, sum_dzxmu, mask=c_ok)


@triton.jit
def _grad_apply_kernel(grad_ptr, mask_ptr, x_ptr, mean_ptr, k_ptr, b_ptr, c_ptr, dx_ptr,
                       dres_ptr, numel, C, inner, RELU: tl.constexpr,
                       RESIDUAL_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """dz = grad through the ReLU; dx = k*dz + b*(x - mean) + c; dres = dz."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < numel
    ch = (offs // inner) % C
    dz = tl.load(grad_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if RELU:
        dz = tl.where(_relu_bits(mask_ptr, offs, valid), dz, 0.0)
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + ch, mask=valid, other=0.0)
    k = tl.load(k_ptr + ch, mask=valid, other=0.0)
    b = tl.load(b_ptr + ch, mask=valid, other=0.0)
    c = tl.load(c_ptr + ch, mask=valid, other=0.0)
    dx = k * dz + b * (x - mean) + c
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=valid)
    if RESIDUAL_GRAD:
        tl.store(dres_ptr + offs, dz.to(dres_ptr.dtype.element_ty), mask=valid)


# ---------------------------------------------------------------------------------------------
# Launchers: same signatures and results as fused_resnet.reference.


def _reduction_plan(x: torch.Tensor):
    g = layout.geometry(x)
    block_m, block_c = _reduce_tiles(x)
    channel_tiles = triton.cdiv(g.channels, block_c)
    splits = _reduce_splits(g.per_channel, channel_tiles, block_m, _interpreted(x))
    rows_per_split = max(block_m, triton.cdiv(triton.cdiv(g.per_channel, splits), block_m) * block_m)
    splits = max(1, triton.cdiv(g.per_channel, rows_per_split))
    return g, block_m, block_c, channel_tiles, splits, rows_per_split


def bn_stats(input: torch.Tensor, weight, bias, eps):
    x = layout.dense_like(input, input)
    g, block_m, block_c, tiles, splits, rows = _reduction_plan(x)
    mean_part = torch.empty((splits, g.channels), dtype=torch.float32, device=x.device)
    m2_part = torch.empty_like(mean_part)
    _stats_partial_kernel[(tiles, splits)](
        x, mean_part, m2_part, g.channels, g.inner, g.per_channel, rows,
        BLOCK_M=block_m, BLOCK_C=block_c, CHANNELS_LAST=layout.is_channels_last(x))
    mean, var = layout.empty_per_channel(x), layout.empty_per_channel(x)
    final_c = min(64, triton.next_power_of_2(g.channels))
    _stats_final_kernel[(triton.cdiv(g.channels, final_c),)](
        mean_part, m2_part, mean, var, g.channels, g.per_channel, rows, splits,
        BLOCK_P=32, BLOCK_C=final_c)
    return (mean, var) + reference.bn_scale_shift(mean, var, weight, bias, eps)


def bn_add_relu_apply(input, residual, scale, shift, relu, save_mask):
    x = layout.dense_like(input, input)
    res = layout.dense_like(residual, x) if residual is not None else x
    g = layout.geometry(x)
    out = layout.empty_like_kernel(x)
    save_mask = relu and save_mask
    mask = layout.empty_mask(x, save_mask)
    block = _elementwise_block(x)
    numel = x.numel()
    if numel:
        _apply_kernel[(triton.cdiv(numel, block),)](
            x, res, scale.contiguous(), shift.contiguous(), out, mask if save_mask else out,
            numel, g.channels, g.inner, HAS_RESIDUAL=residual is not None, RELU=relu,
            SAVE_MASK=save_mask, BLOCK=block)
    return out, mask


def bn_add_relu_grad_reduce(grad, mask, input, mean, var, weight, eps, relu, training):
    x = layout.dense_like(input, input)
    grad = layout.dense_like(grad, x)
    g, block_m, block_c, tiles, splits, rows = _reduction_plan(x)
    sum_dz_part = torch.empty((splits, g.channels), dtype=torch.float32, device=x.device)
    sum_dzxmu_part = torch.empty_like(sum_dz_part)
    _grad_reduce_partial_kernel[(tiles, splits)](
        grad, mask if relu else grad, x, mean.contiguous(), sum_dz_part, sum_dzxmu_part,
        g.channels, g.inner, g.per_channel, rows, RELU=relu, BLOCK_M=block_m, BLOCK_C=block_c,
        CHANNELS_LAST=layout.is_channels_last(x))
    return reference.bn_backward_coefficients(sum_dz_part.sum(dim=0), sum_dzxmu_part.sum(dim=0),
                                              var, weight, eps, g.per_channel, training)


def bn_add_relu_grad_apply(grad, mask, input, mean, k, b, c, relu, residual_grad):
    x = layout.dense_like(input, input)
    grad = layout.dense_like(grad, x)
    g = layout.geometry(x)
    dx = layout.empty_like_kernel(x)
    dres = layout.empty_like_kernel(x) if residual_grad else x.new_empty(0)
    block = _elementwise_block(x)
    numel = x.numel()
    if numel:
        _grad_apply_kernel[(triton.cdiv(numel, block),)](
            grad, mask if relu else grad, x, mean.contiguous(), k.contiguous(), b.contiguous(),
            c.contiguous(), dx, dres if residual_grad else dx, numel, g.channels, g.inner,
            RELU=relu, RESIDUAL_GRAD=residual_grad, BLOCK=block)
    return dx, dres
