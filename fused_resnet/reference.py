"""Pure-PyTorch math of every fused_resnet op: the specification, the test oracle and the
last-resort backend ("torch"). Each function has the signature of the custom op of the same
name in fused_resnet.ops and returns what every other backend must return (up to rounding).
Arithmetic in fp32, as the kernels do.
"""

from typing import Optional

import torch

from fused_resnet import layout

_BIT_WEIGHTS = [1 << k for k in range(8)]


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.to(layout.accumulate_dtype(t))


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Bool tensor (1-D) -> uint8 tensor, bit k of byte j = bits[8*j + k]."""
    pad = (-bits.numel()) % 8
    b = torch.nn.functional.pad(bits.to(torch.uint8), (0, pad)).view(-1, 8)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=bits.device)
    return (b * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(mask: torch.Tensor, numel: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return ((mask.view(-1, 1) >> shifts) & 1).view(-1)[:numel].bool()


def relu_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The packed mask as a bool tensor shaped like `like`."""
    return layout.from_memory_order(unpack_bits(mask, like.numel()), like)


def bn_scale_shift(mean: torch.Tensor, var: torch.Tensor, weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm folded into a per-channel affine map y = x*scale + shift, in the statistics'
    dtype (weight/bias None: affine=False): what eval-mode folding into a conv's weights and
    bias uses. Its two terms cancel where |mean| >> std; the BN ops apply the centred form
    (bn_centred_scale_shift)."""
    scale, bias_term = bn_centred_scale_shift(var, weight, bias, eps)
    return scale, bias_term - mean * scale


def bn_centred_scale_shift(var: torch.Tensor, weight: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], eps: float, copy_bias: bool = True
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm as y = (x - mean)*scale + shift per channel: scale = weight/sqrt(var + eps),
    shift = bias (zeros for affine=False), in the statistics' dtype. x - mean is exact where x
    is close to the mean, so nothing cancels when |mean| >> std. common/bn_add_relu_math.h has
    the kernels' twin (the same roundings: a square root, then 1/that, then times weight).
    copy_bias=False: shift may be `bias` itself (a caller that only reads it); True where the
    caller hands it on as a result of its own."""
    invstd = torch.add(var, eps)
    if var.requires_grad or torch.is_grad_enabled() and weight is not None \
            and weight.requires_grad:
        invstd = 1.0 / torch.sqrt(invstd)  # autograd: no in-place steps on saved results
    else:  # a tensor of our own: in place, two tensor ops fewer (this runs for every BN)
        invstd = invstd.sqrt_().reciprocal_()
    scale = invstd * weight.to(var.dtype) if weight is not None else invstd
    if bias is None:
        shift = torch.zeros_like(var)
    else:
        shift = bias.to(var.dtype, copy=copy_bias)
    return scale, shift


def bn_backward_coefficients(sum_dz, sum_dz_xmu, var, weight, eps, count, training,
                             sum_xmu=None):
    """(k, b, c, grad_weight, grad_bias) per channel from sum(dz) and sum(dz*(x - mean)) over
    `count` elements: grad_input = k*dz + b*(x - mean) + c. Training differentiates through the
    batch statistics (b, c); eval does not (b = c = 0).
    sum_xmu: sum(x - mean), where `mean` is the fp32 batch mean (training): its offset from the
    exact mean, d = sum_xmu / count, is taken out of the sums (sum(dz*(x - exact mean)) =
    sum_dz_xmu - d*sum_dz, and c absorbs -b*d), as common/bn_add_relu_math.h explains."""
    invstd = 1.0 / torch.sqrt(var + eps)
    k = invstd * weight.to(var.dtype) if weight is not None else invstd
    batch = training and count > 0
    if batch and sum_xmu is not None:
        offset = sum_xmu / count
        sum_dz_xmu = sum_dz_xmu - offset * sum_dz
    else:
        offset = torch.zeros_like(sum_dz)
    if batch:
        b = -k * invstd * invstd * sum_dz_xmu / count
        c = -k * sum_dz / count - b * offset
    else:
        b, c = torch.zeros_like(k), torch.zeros_like(k)
    # An empty batch (count 0) has NaN statistics; PyTorch's weight gradient is 0, not 0*NaN.
    grad_weight = sum_dz_xmu * invstd if count > 0 else torch.zeros_like(sum_dz_xmu)
    return k, b, c, grad_weight, sum_dz.clone()


def conv_epilogue(z: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                  residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    """What the fused conv ops apply to a conv output z, in z's dtype: z*scale + bias per
    output channel, + residual, then ReLU (relu(conv(x)*scale + bias + residual))."""
    y = z * _per_channel(scale.to(z.dtype)) + _per_channel(bias.to(z.dtype))
    if residual is not None:
        y = y + residual.to(z.dtype)
    return torch.relu(y) if relu else y


def bn_stats(input: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
             eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance (fp32), and the scale/shift of the centred
    form y = (x - mean)*scale + shift they give (bn_centred_scale_shift)."""
    var, mean = torch.var_mean(_acc(input), dim=(0, 2, 3), correction=0)
    return (mean, var) + bn_centred_scale_shift(var, weight, bias, eps)


def bn_add_relu_apply(input: torch.Tensor, residual: Optional[torch.Tensor], scale: torch.Tensor,
                      shift: torch.Tensor, relu: bool, save_mask: bool,
                      mean: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """out = relu((input - mean)*scale + shift + residual) (mean None: input*scale + shift),
    and its packed ReLU mask if relu and save_mask (backward needs it; inference does not),
    else an empty mask."""
    centred = _acc(input) - _per_channel(mean) if mean is not None else _acc(input)
    y = centred * _per_channel(scale) + _per_channel(shift)
    if residual is not None:
        y = y + _acc(residual)
    x = layout.dense_like(input, input)
    out = layout.empty_like_kernel(x)
    if relu and save_mask:  # torch.relu's backward decision: the stored output > 0
        mask = pack_bits(layout.memory_order(y.to(input.dtype) > 0, x))
    else:
        mask = layout.empty_mask(x, False)
    if relu:
        y = torch.relu(y)
    out.copy_(y)
    return out, mask


def _masked_grad(grad: torch.Tensor, mask: torch.Tensor, input: torch.Tensor,
                 relu: bool) -> torch.Tensor:
    dz = _acc(grad)
    if relu:
        dz = dz * relu_mask(mask, layout.dense_like(input, input))
    return dz


def bn_add_relu_grad_sums(grad, mask, input, mean, relu):
    """sum(dz), sum(dz * (input - mean)) and sum(input - mean) per channel, dz = grad through
    the ReLU."""
    dz = _masked_grad(grad, mask, input, relu)
    xmu = _acc(input) - _per_channel(mean)
    return dz.sum(dim=(0, 2, 3)), (dz * xmu).sum(dim=(0, 2, 3)), xmu.sum(dim=(0, 2, 3))


def bn_add_relu_grad_reduce(grad: torch.Tensor, mask: torch.Tensor, input: torch.Tensor,
                            mean: torch.Tensor, var: torch.Tensor, weight: Optional[torch.Tensor],
                            eps: float, relu: bool, training: bool):
    """The per-channel coefficients of backward (bn_backward_coefficients) from the sums."""
    sum_dz, sum_dz_xmu, sum_xmu = bn_add_relu_grad_sums(grad, mask, input, mean, relu)
    count = input.numel() // input.shape[1]
    return bn_backward_coefficients(sum_dz, sum_dz_xmu, var, weight, eps, count, training,
                                    sum_xmu=sum_xmu)


def bn_add_relu_grad_apply(grad: torch.Tensor, mask: torch.Tensor, input: torch.Tensor,
                           mean: torch.Tensor, k: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                           relu: bool, residual_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_input = k*dz + b*(input - mean) + c per channel; grad_residual = dz (if wanted)."""
    x = layout.dense_like(input, input)
    dz = _masked_grad(grad, mask, input, relu)
    dx = _per_channel(k) * dz + _per_channel(b) * (_acc(input) - _per_channel(mean)) \
        + _per_channel(c)
    grad_input = layout.empty_like_kernel(x)
    grad_input.copy_(dx)
    if residual_grad:
        grad_residual = layout.empty_like_kernel(x)
        grad_residual.copy_(dz)
    else:
        grad_residual = input.new_empty(0)
    return grad_input, grad_residual
