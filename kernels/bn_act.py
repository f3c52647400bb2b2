"""Triton kernels of the fused BatchNorm + add + ReLU op (see fused_resnet/ops/bn_add_relu.py
for the op structure and fused_resnet/reference.py for the math they must match).

Tensors are dense and seen in memory order as [outer, C, inner] (fused_resnet.layout): the
channel of memory offset i is (i // inner) % C, so one kernel serves NCHW (inner = H*W) and
NHWC (inner = 1). Arithmetic in fp32; indices in int64. Reductions are two-level: fp32 partial
results per (split, channel), then merged in a fixed order (deterministic, no atomics).

The launchers are the bodies of the torch.library.triton_op pieces
(fused_resnet/ops/bn_add_relu.py), which torch.compile and torch.export trace into: while they
trace, each launch goes through torch.library.wrap_triton and becomes a graph node Inductor
compiles and AOTInductor packages (_launch); run eagerly, the kernel is launched as it is.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fused_resnet import devices, layout, reference, tracing

# ---------------------------------------------------------------------------------------------
# Launch parameters. The interpreter runs each program instance in Python, so there a few big
# programs are much faster than many small ones; on the GPU, sizes that fill an H100.


def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def _elementwise_block(t: torch.Tensor) -> int:
    return 8192 if _interpreted(t) else 1024


def _reduce_tiles(x: torch.Tensor):
    """(BLOCK_M, BLOCK_C, BLOCK_HW) of the reductions' tiles. NHWC (channels contiguous): BLOCK_M
    pixels x BLOCK_C channels. NCHW (one channel's plane contiguous): BLOCK_M images x BLOCK_HW
    positions of one channel, so each image's run loads as whole vectors."""
    if layout.is_channels_last(x):
        block_c = min(64, triton.next_power_of_2(x.shape[1]))
        return (4096 // block_c if _interpreted(x) else 16), block_c, 1
    inner = x.shape[2] * x.shape[3]
    block_hw = min(triton.next_power_of_2(max(inner, 1)), 4096 if _interpreted(x) else 256)
    return max(1, (4096 if _interpreted(x) else 1024) // block_hw), 1, block_hw


def _reduce_splits(units: int, channel_tiles: int, interpreted: bool) -> int:
    """Splits of each channel's `units` (NHWC: row tiles; NCHW: images) over programs."""
    target_programs = 4 if interpreted else 1024
    return max(1, min(units, max(1, target_programs // channel_tiles)))


# ---------------------------------------------------------------------------------------------
@triton.jit
def _column_moments(x, valid):
    """Per-column (count, exact mean, sum of squared deviations) of a [rows, channels] tile."""
    count = tl.sum(valid.to(tl.float32), axis=0)
    mean = tl.sum(x, axis=0) / tl.maximum(count, 1.0)
    dev = tl.where(valid, x - mean[None, :], 0.0)
    return count, mean, tl.sum(dev * dev, axis=0)


@triton.jit
def _tile_moments(x, valid):
    """(count, exact mean, sum of squared deviations) of a whole tile."""
    count = tl.sum(tl.sum(valid.to(tl.float32), axis=1), axis=0)
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / tl.maximum(count, 1.0)
    dev = tl.where(valid, x - mean, 0.0)
    return count, mean, tl.sum(tl.sum(dev * dev, axis=1), axis=0)


@triton.jit
def _chan_merge(count, mean, m2, tile_count, tile_mean, tile_m2):
    """Chan et al.: the moments of two disjoint sets from each set's."""
    total = count + tile_count
    share = tile_count / tl.maximum(total, 1.0)
    delta = tile_mean - mean
    return total, mean + delta * share, m2 + tile_m2 + delta * delta * count * share


@triton.jit
def _nhwc_tile(m0, end, c, c_ok, C, BLOCK_M: tl.constexpr):
    """Offsets and validity of pixels m0.. (up to end) x channels c: rows of contiguous
    channels."""
    m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
    return m[:, None] * C + c[None, :], (m < end)[:, None] & c_ok[None, :]


@triton.jit
def _nchw_tile(n0, n_end, hw0, c, C, inner, BLOCK_M: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Offsets and validity of images n0.. (up to n_end) x positions hw0.. of channel c's
    planes: each image's run is contiguous, so it loads as vectors."""
    n = n0 + tl.arange(0, BLOCK_M).to(tl.int64)
    hw = hw0 + tl.arange(0, BLOCK_HW)
    return (n[:, None] * C + c) * inner + hw[None, :], (n < n_end)[:, None] & (hw < inner)[None, :]


@triton.jit
def _split_images(split, rows_per_split, per_channel, inner):
    """First and end image of an NCHW split (its rows are whole planes)."""
    plane = tl.maximum(inner, 1)
    start = split * rows_per_split
    return start // plane, tl.minimum(start + rows_per_split, per_channel) // plane


@triton.jit
def _relu_bits(mask_ptr, offs, valid):
    byte = tl.load(mask_ptr + offs // 8, mask=valid, other=0)
    return ((byte >> (offs % 8).to(tl.uint8)) & 1) != 0


@triton.jit
def _stats_partial_kernel(x_ptr, mean_ptr, m2_ptr, C, inner, per_channel, rows_per_split,
                          BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
                          CHANNELS_LAST: tl.constexpr):
    """Mean and M2 of each channel over one split of its elements; tiles merged with Chan's
    formula (each tile: exact mean, then sum of squared deviations). NCHW: one channel per
    program (BLOCK_C == 1), splits of whole images."""
    pid_c = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    if CHANNELS_LAST:
        start = split * rows_per_split
        end = tl.minimum(start + rows_per_split, per_channel)
        for m0 in range(start, end, BLOCK_M):
            offs, valid = _nhwc_tile(m0, end, c, c_ok, C, BLOCK_M)
            x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            tile_count, tile_mean, tile_m2 = _column_moments(x, valid)
            count, mean, m2 = _chan_merge(count, mean, m2, tile_count, tile_mean, tile_m2)
    else:
        n_start, n_end = _split_images(split, rows_per_split, per_channel, inner)
        for n0 in range(n_start, n_end, BLOCK_M):
            for hw0 in range(0, inner, BLOCK_HW):
                offs, valid = _nchw_tile(n0, n_end, hw0, pid_c, C, inner, BLOCK_M, BLOCK_HW)
                x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
                tile_count, tile_mean, tile_m2 = _tile_moments(x, valid)
                count, mean, m2 = _chan_merge(count, mean, m2, tile_count, tile_mean, tile_m2)
    tl.store(mean_ptr + split * C + c, mean, mask=c_ok)
    tl.store(m2_ptr + split * C + c, m2, mask=c_ok)


# The counts are run-time values whatever they are: an argument equal to 1 would otherwise be
# compiled in as a constant, and `per_channel.to(...)` on a constant does not compile. The
# strides are specialised (a stride of 1 tells Triton which way the partials are contiguous).
@triton.jit(do_not_specialize=["per_channel", "rows_per_split", "splits"])
def _stats_final_kernel(mean_part_ptr, m2_part_ptr, mean_ptr, var_ptr, C, per_channel,
                        rows_per_split, splits, stride_p, stride_c, BLOCK_P: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """Merges the partial (mean, M2) of every split exactly: mean = sum(n_p*mean_p)/N,
    M2 = sum(M2_p) + sum(n_p*(mean_p - mean)^2). Biased variance = M2/N. Partial p of
    channel c is at p*stride_p + c*stride_c."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    c_offs = c.to(tl.int64)[None, :] * stride_c
    total = per_channel.to(tl.float32)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, splits, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        ok = (p < splits)[:, None] & c_ok[None, :]
        n_p = tl.minimum(rows_per_split, per_channel - p * rows_per_split).to(tl.float32)
        mean_p = tl.load(mean_part_ptr + p[:, None] * stride_p + c_offs, mask=ok, other=0.0)
        acc += tl.sum(tl.where(ok, n_p[:, None] * mean_p, 0.0), axis=0)
    mean = acc / total
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, splits, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        ok = (p < splits)[:, None] & c_ok[None, :]
        n_p = tl.minimum(rows_per_split, per_channel - p * rows_per_split).to(tl.float32)
        offs = p[:, None] * stride_p + c_offs
        mean_p = tl.load(mean_part_ptr + offs, mask=ok, other=0.0)
        m2_p = tl.load(m2_part_ptr + offs, mask=ok, other=0.0)
        dev = mean_p - mean[None, :]
        m2 += tl.sum(tl.where(ok, m2_p + n_p[:, None] * dev * dev, 0.0), axis=0)
    tl.store(mean_ptr + c, mean, mask=c_ok)
    tl.store(var_ptr + c, m2 / total, mask=c_ok)


@triton.jit
def _apply_kernel(x_ptr, res_ptr, mean_ptr, scale_ptr, shift_ptr, out_ptr, mask_ptr, numel, C,
                  inner, HAS_RESIDUAL: tl.constexpr, HAS_MEAN: tl.constexpr, RELU: tl.constexpr,
                  SAVE_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """out = relu((x - mean)*scale + shift + residual) (without HAS_MEAN: x*scale + shift); if
    SAVE_MASK, one mask bit per element, 8 per byte."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < numel
    ch = (offs // inner) % C
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + ch, mask=valid, other=0.0)
    shift = tl.load(shift_ptr + ch, mask=valid, other=0.0)
    if HAS_MEAN:
        x -= tl.load(mean_ptr + ch, mask=valid, other=0.0)
    y = x * scale + shift
    if HAS_RESIDUAL:
        y += tl.load(res_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if RELU:
        # the mask bit is torch.relu's backward decision, on the stored output: a tiny y > 0
        # that rounds to 0 in a 16-bit dtype lets no gradient through
        positive = (y.to(out_ptr.dtype.element_ty) > 0.0) & valid
        y = tl.where((y > 0.0) | (y != y), y, 0.0)  # NaN stays NaN, as torch.relu
    if RELU and SAVE_MASK:
        bits = tl.reshape(positive.to(tl.int32), (BLOCK // 8, 8))
        weights = (1 << tl.arange(0, 8))[None, :]
        packed = tl.sum(bits * weights, axis=1).to(tl.uint8)
        byte_offs = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
        tl.store(mask_ptr + byte_offs, packed, mask=byte_offs < (numel + 7) // 8)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _dz_tile(grad_ptr, mask_ptr, offs, valid, RELU: tl.constexpr):
    """The gradient reaching BN's output on a tile: grad through the saved ReLU mask."""
    dz = tl.load(grad_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if RELU:
        dz = tl.where(_relu_bits(mask_ptr, offs, valid), dz, 0.0)
    return dz


@triton.jit
def _grad_reduce_partial_kernel(grad_ptr, mask_ptr, x_ptr, mean_ptr, sum_dz_ptr, sum_dzxmu_ptr,
                                sum_xmu_ptr, C, inner, per_channel, rows_per_split,
                                RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                                BLOCK_HW: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """Partial sum(dz), sum(dz*(x - mean)) and sum(x - mean) of each channel over one split of
    its elements (tiles as in _stats_partial_kernel)."""
    pid_c = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0)
    sum_dz = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_dzxmu = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_xmu = tl.zeros([BLOCK_C], dtype=tl.float32)
    if CHANNELS_LAST:
        start = split * rows_per_split
        end = tl.minimum(start + rows_per_split, per_channel)
        for m0 in range(start, end, BLOCK_M):
            offs, valid = _nhwc_tile(m0, end, c, c_ok, C, BLOCK_M)
            dz = _dz_tile(grad_ptr, mask_ptr, offs, valid, RELU)
            x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            xmu = tl.where(valid, x - mean[None, :], 0.0)
            sum_dz += tl.sum(dz, axis=0)
            sum_dzxmu += tl.sum(dz * xmu, axis=0)
            sum_xmu += tl.sum(xmu, axis=0)
    else:
        n_start, n_end = _split_images(split, rows_per_split, per_channel, inner)
        for n0 in range(n_start, n_end, BLOCK_M):
            for hw0 in range(0, inner, BLOCK_HW):
                offs, valid = _nchw_tile(n0, n_end, hw0, pid_c, C, inner, BLOCK_M, BLOCK_HW)
                dz = _dz_tile(grad_ptr, mask_ptr, offs, valid, RELU)
                x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
                xmu = tl.where(valid, x - mean, 0.0)
                sum_dz += tl.sum(tl.sum(dz, axis=1), axis=0)
                sum_dzxmu += tl.sum(tl.sum(dz * xmu, axis=1), axis=0)
                sum_xmu += tl.sum(tl.sum(xmu, axis=1), axis=0)
    tl.store(sum_dz_ptr + split * C + c, sum_dz, mask=c_ok)
    tl.store(sum_dzxmu_ptr + split * C + c, sum_dzxmu, mask=c_ok)
    tl.store(sum_xmu_ptr + split * C + c, sum_xmu, mask=c_ok)


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


def _launch(kernel, like: torch.Tensor):
    """The kernel to index with a grid and call: itself, or while a trace runs the launcher (its
    tensors fake or functional: torch.compile / torch.export tracing into the triton_ops) its
    wrap_triton, which records the launch as a graph node. (wrap_triton outside a trace would
    go through a dispatcher op, which launches nothing on meta tensors, where fused_resnet.aot
    records launches.)"""
    return kernel if tracing.is_plain(like) else wrap_triton(kernel)


def _reduction_plan(x: torch.Tensor):
    """Geometry, tiles and splits of a reduction. NHWC splits cover whole row tiles; NCHW
    splits whole images (so a tile never straddles two planes)."""
    g = layout.geometry(x)
    block_m, block_c, block_hw = _reduce_tiles(x)
    channel_tiles = triton.cdiv(g.channels, block_c)
    if layout.is_channels_last(x):
        splits = _reduce_splits(triton.cdiv(g.per_channel, block_m), channel_tiles,
                                _interpreted(x))
        rows_per_split = max(block_m, triton.cdiv(triton.cdiv(g.per_channel, splits), block_m)
                             * block_m)
    else:
        splits = _reduce_splits(g.outer, channel_tiles, _interpreted(x))
        rows_per_split = max(1, triton.cdiv(g.outer, splits)) * g.inner
    splits = max(1, triton.cdiv(g.per_channel, rows_per_split)) if rows_per_split else 1
    return g, (block_m, block_c, block_hw), channel_tiles, splits, rows_per_split


@devices.launches_on_input_device
def merge_partial_stats(mean_part: torch.Tensor, m2_part: torch.Tensor, per_channel: int,
                        rows_per_split: int, channel_major: bool = False):
    """Per-channel (mean, biased var) in fp32 from partial means and M2s ([splits, C], or
    [C, splits] if channel_major), split p covering rows_per_split elements of each channel
    (the last one what is left of per_channel): one exact merge, in one small kernel.

    Split-major partials (few splits, from the statistics kernel) are read along channels;
    channel-major ones (one per conv output tile: thousands) along splits, one program per
    few channels, so the merge spreads over the GPU instead of looping on a few programs."""
    if channel_major:
        channels, splits = mean_part.shape
        block_c = 1 if not _interpreted(mean_part) else min(64, triton.next_power_of_2(channels))
        block_p = 1024
    else:
        splits, channels = mean_part.shape
        block_c, block_p = min(64, triton.next_power_of_2(channels)), 32
    split_dim = 1 if channel_major else 0
    mean = torch.empty(channels, dtype=torch.float32, device=mean_part.device)
    var = torch.empty_like(mean)
    _launch(_stats_final_kernel, mean_part)[(triton.cdiv(channels, block_c),)](
        mean_part, m2_part, mean, var, channels, per_channel, rows_per_split, splits,
        mean_part.stride(split_dim), mean_part.stride(1 - split_dim),
        BLOCK_P=block_p, BLOCK_C=block_c)
    return mean, var


@devices.launches_on_input_device
def bn_stats(input: torch.Tensor, weight, bias, eps):
    x = layout.dense_like(input, input)
    g, (block_m, block_c, block_hw), tiles, splits, rows = _reduction_plan(x)
    mean_part = torch.empty((splits, g.channels), dtype=torch.float32, device=x.device)
    m2_part = torch.empty_like(mean_part)
    _launch(_stats_partial_kernel, x)[(tiles, splits)](
        x, mean_part, m2_part, g.channels, g.inner, g.per_channel, rows,
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_HW=block_hw,
        CHANNELS_LAST=layout.is_channels_last(x))
    mean, var = merge_partial_stats(mean_part, m2_part, g.per_channel, rows)
    return (mean, var) + reference.bn_centred_scale_shift(var, weight, bias, eps)


@devices.launches_on_input_device
def bn_add_relu_apply(input, residual, scale, shift, relu, save_mask, mean=None):
    x = layout.dense_like(input, input)
    res = layout.dense_like(residual, x) if residual is not None else x
    g = layout.geometry(x)
    out = layout.empty_like_kernel(x)
    save_mask = relu and save_mask
    mask = layout.empty_mask(x, save_mask)
    block = _elementwise_block(x)
    numel = x.numel()
    if numel:
        _launch(_apply_kernel, x)[(triton.cdiv(numel, block),)](
            x, res, mean.contiguous() if mean is not None else scale, scale.contiguous(),
            shift.contiguous(), out, mask if save_mask else out, numel, g.channels, g.inner,
            HAS_RESIDUAL=residual is not None, HAS_MEAN=mean is not None, RELU=relu,
            SAVE_MASK=save_mask, BLOCK=block)
    return out, mask


@devices.launches_on_input_device
def bn_add_relu_grad_reduce(grad, mask, input, mean, var, weight, eps, relu, training):
    x = layout.dense_like(input, input)
    grad = layout.dense_like(grad, x)
    g, (block_m, block_c, block_hw), tiles, splits, rows = _reduction_plan(x)
    parts = torch.empty((3, splits, g.channels), dtype=torch.float32, device=x.device)
    _launch(_grad_reduce_partial_kernel, x)[(tiles, splits)](
        grad, mask if relu else grad, x, mean.contiguous(), parts[0], parts[1], parts[2],
        g.channels, g.inner, g.per_channel, rows, RELU=relu, BLOCK_M=block_m, BLOCK_C=block_c,
        BLOCK_HW=block_hw, CHANNELS_LAST=layout.is_channels_last(x))
    sum_dz, sum_dz_xmu, sum_xmu = parts.sum(dim=1)
    return reference.bn_backward_coefficients(sum_dz, sum_dz_xmu, var, weight, eps,
                                              g.per_channel, training, sum_xmu=sum_xmu)


@devices.launches_on_input_device
def bn_add_relu_grad_apply(grad, mask, input, mean, k, b, c, relu, residual_grad):
    x = layout.dense_like(input, input)
    grad = layout.dense_like(grad, x)
    g = layout.geometry(x)
    dx = layout.empty_like_kernel(x)
    dres = layout.empty_like_kernel(x) if residual_grad else x.new_empty(0)
    block = _elementwise_block(x)
    numel = x.numel()
    if numel:
        _launch(_grad_apply_kernel, x)[(triton.cdiv(numel, block),)](
            grad, mask if relu else grad, x, mean.contiguous(), k.contiguous(), b.contiguous(),
            c.contiguous(), dx, dres if residual_grad else dx, numel, g.channels, g.inner,
            RELU=relu, RESIDUAL_GRAD=residual_grad, BLOCK=block)
    return dx, dres
