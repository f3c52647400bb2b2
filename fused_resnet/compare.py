"""How close two computations of one tensor are: the measures the tests, `fused-resnet verify`
and the conv ops' tuning (ops.conv.agreeing) compare by. A floor module: it imports torch
only, so the ops use it without reaching up to the CLI's verify module.

    normwise_error, agreement_error   one relative figure for a whole tensor
    conv_agreement                    whether a candidate conv path's outputs agree with the
                                      library conv's, tile by tile (see its docstring)
"""

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F


def normwise_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64: the measure for whole gradients and conv outputs,
    where one element's ReLU decision or rounding must not dominate."""
    ref = ref.double()
    return ((got.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def special_values_agree(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether NaN and +-inf sit in the same places in both (same shapes assumed): two
    implementations of one op must carry the input's NaN and overflow alike."""
    finite = torch.isfinite(ref)
    if bool(finite.all()):  # the common case: one pass over each
        return bool(torch.isfinite(got).all())
    inf = torch.isinf(ref)
    return (torch.equal(torch.isnan(got), torch.isnan(ref))
            and torch.equal(got[inf].double(), ref[inf].double())
            and bool(torch.isfinite(got[finite]).all()))


def agreement_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """normwise_error over the finite elements, and inf unless NaN and +-inf sit in the same
    places: a NaN in the data is no reason to distrust a kernel; a NaN where the other has a
    number is."""
    if got.shape != ref.shape or not special_values_agree(got, ref):
        return float("inf")
    finite = torch.isfinite(ref)
    return normwise_error(got[finite], ref[finite])


# ---- a candidate conv path against the library conv ---------------------------------------------
# Normwise relative difference allowed over a whole output: bf16 rounding of a conv output is
# ~4e-3 per element, a wrong kernel (bad index, missing term, garbage) is off by O(1).
NORMWISE_BOUND = 3e-2
# The check's tile: output pixels (GEMM rows, in N, H, W order) x output channels. 64 x 64 is
# the smallest tile of both the Triton conv's GPU configs and the CUTLASS convs; their larger
# tiles start on multiples of 64, so each is a whole number of these.
TILE_ROWS, TILE_CHANNELS = 64, 64
# A tile's error (below) may reach this many rounding units of the output dtype, ...
TILE_ROUNDING_UNITS = 8
# ... or this many times the median tile's error: a tile no worse than the typical one is no
# tile-local fault (a library conv that loses accuracy everywhere, e.g. where it rounds the
# conv output before a bias cancels most of it, is the normwise bound's business).
TILE_OUTLIER_FACTOR = 4
# Below this fraction of its channels' RMS a tile's own norm no longer scales its error (a tile
# of ReLU zeros); nor does a channel's second moment below this fraction of the layer's RMS.
FLOOR = 1 / 4
# A channel's batch mean may differ by this many rounding units of its RMS, its variance by
# this many of its second moment.
STATS_ROUNDING_UNITS = 4
# Longest reduction a conv's output sums over, for the accumulation term of rounding_unit
# (ResNet-50's longest is 3 * 3 * 512 = 4608).
MAX_REDUCTION = 2 ** 16


def rounding_unit(dtype: torch.dtype) -> float:
    """The scale of the relative difference two correct convs producing `dtype` show per
    element: the unit roundoff of the output (fp32: of TF32, 2^-11, which cuDNN
    and the Triton conv may each use for fp32 products) plus the probabilistic accumulation
    term sqrt(K) * u_acc (Higham & Mary 2019) at K = MAX_REDUCTION, fp32 accumulators for the
    16/32-bit dtypes. Relative to the output, K enters no further: a sum of K products of
    random sign grows like sqrt(K), as its rounding error does. The accumulation term is
    2^8 * 2^-24 = 1.5e-5, 1/32 of the smallest output unit (2^-11): negligible except for
    float64."""
    if dtype == torch.float32:
        output = 2.0 ** -11
    else:
        output = torch.finfo(dtype).eps / 2
    accumulate = output if dtype == torch.float64 else 2.0 ** -24
    return output + math.sqrt(MAX_REDUCTION) * accumulate


class Verdict(NamedTuple):
    measure: str
    error: float
    bound: float
    where: str = ""

    @property
    def ratio(self) -> float:
        """error / bound: <= 1 agrees (a NaN error does not)."""
        if math.isnan(self.error):
            return float("inf")
        if self.error == 0:
            return 0.0
        return self.error / self.bound if self.bound > 0 else float("inf")

    @property
    def ok(self) -> bool:
        return self.ratio <= 1

    def __str__(self):
        at = f" at {self.where}" if self.where else ""
        return f"{self.measure} {self.error:.2e}{at}, bound {self.bound:.2e}"


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, with 0/0 = 0 and x/0 = inf (x > 0)."""
    inf = torch.full_like(num, float("inf"))
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.where(num > 0, inf, 0 * num))


def _pixel_square_sums(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [pixels, channel groups] in float64: each pixel's sum of squares over
    each group of TILE_CHANNELS channels (reduced along the contiguous channels of a
    channels_last tensor: NCHW is copied once). The norms come out in x's dtype (accumulated
    in fp32 or wider): relative error 2^-8 at worst, immaterial to a bound of several rounding
    units."""
    c = x.shape[1]
    pixels = x.permute(0, 2, 3, 1).reshape(-1, c)  # a view for channels_last
    whole = c // TILE_CHANNELS * TILE_CHANNELS
    norms = []
    if whole:
        groups = pixels[:, :whole].unflatten(1, (-1, TILE_CHANNELS))
        norms.append(torch.linalg.vector_norm(groups, dim=2))
    if whole < c:
        norms.append(torch.linalg.vector_norm(pixels[:, whole:], dim=1, keepdim=True))
    return torch.cat(norms, 1).double().square()


def _tile_sums(pixel_sums: torch.Tensor) -> torch.Tensor:
    """[pixels, channel groups] -> [row tiles, channel groups]: sums over each run of
    TILE_ROWS pixels (the last run may be shorter)."""
    short = -pixel_sums.shape[0] % TILE_ROWS
    padded = F.pad(pixel_sums, (0, 0, 0, short)) if short else pixel_sums
    return padded.view(-1, TILE_ROWS, padded.shape[1]).sum(1)


# Below this a ref tile's norm may have lost its small elements' squares to underflow.
_TINY = 2.0 ** -60


def _tile_square_sums(got: torch.Tensor, ref: torch.Tensor):
    """Per check tile: the sums of (got - ref)^2 and of ref^2 over the finite elements of ref;
    None if NaN/inf are not in the same places. In one pass over each of got, ref and their
    difference when all is finite (a non-finite element makes its tile's sum non-finite); else
    in fp32 (fp64 for fp64) with non-finite elements zeroed and everything scaled by one power
    of two (exact) that brings ref below 1, so no square overflows."""
    diff_sums = _tile_sums(_pixel_square_sums(got - ref))
    ref_sums = _tile_sums(_pixel_square_sums(ref))
    if bool(torch.isfinite(diff_sums).all() & torch.isfinite(ref_sums).all()) \
            and ref_sums.max().item() > _TINY:
        return diff_sums, ref_sums
    if not special_values_agree(got, ref):
        return None
    work = torch.float64 if ref.dtype == torch.float64 else torch.float32
    finite = torch.isfinite(ref)
    r, g = torch.where(finite, ref.to(work), 0), torch.where(finite, got.to(work), 0)
    largest = r.abs().amax().item()
    scale = 2.0 ** -math.frexp(largest)[1] if largest > 0 else 1.0
    diff_sums = _tile_sums(_pixel_square_sums(g.sub_(r).mul_(scale)))
    return diff_sums, _tile_sums(_pixel_square_sums(r.mul_(scale)))


def tile_errors(got: torch.Tensor, ref: torch.Tensor):
    """(each check tile's error [row tiles, channel groups], the normwise error over the finite
    elements), or None where NaN/inf are not in the same places, for conv outputs
    [N, C, H, W] of any memory format. A tile's error is ||got - ref|| / max(||ref||,
    FLOOR x ||its channels' RMS||) over its elements, the channels' RMS being that of ref's
    whole channels (floored at FLOOR x the layer's RMS per channel)."""
    n, c, h, w = ref.shape
    sums = _tile_square_sums(got, ref)
    if sums is None:
        return None
    diff_sums, ref_sums = sums
    pixels = n * h * w
    row_tiles, groups = diff_sums.shape
    rows = diff_sums.new_full((row_tiles, 1), TILE_ROWS)
    rows[-1] = pixels - (row_tiles - 1) * TILE_ROWS
    widths = diff_sums.new_full((groups,), TILE_CHANNELS)
    widths[-1] = c - (groups - 1) * TILE_CHANNELS
    # per channel group: the sum over its channels of each one's mean square
    group_mean_square = ref_sums.sum(0) / pixels
    layer_mean_square = group_mean_square.sum() / c
    group_mean_square = torch.maximum(group_mean_square, FLOOR ** 2 * widths * layer_mean_square)
    scale_sums = torch.maximum(ref_sums, FLOOR ** 2 * rows * group_mean_square)
    errors = _safe_ratio(diff_sums, scale_sums).sqrt()
    normwise = _safe_ratio(diff_sums.sum(), ref_sums.sum()).sqrt().item()
    return errors, normwise


def tile_agreement(got: torch.Tensor, ref: torch.Tensor) -> list[Verdict]:
    """The normwise and the worst-tile verdicts for one conv output [N, C, H, W]."""
    if got.shape != ref.shape:
        return [Verdict("shape", float("inf"), 0.0,
                        f"{tuple(got.shape)} for {tuple(ref.shape)}")]
    if ref.numel() == 0:
        return []
    measured = tile_errors(got, ref)
    if measured is None:
        return [Verdict("NaN/inf placement", float("inf"), 0.0)]
    errors, normwise = measured
    flat = errors.flatten()
    typical = flat.median().item()
    bound = max(TILE_ROUNDING_UNITS * rounding_unit(ref.dtype), TILE_OUTLIER_FACTOR * typical)
    worst = int(flat.argmax())
    row, group = divmod(worst, errors.shape[1])
    where = (f"pixels {row * TILE_ROWS}-{(row + 1) * TILE_ROWS - 1}, channels "
             f"{group * TILE_CHANNELS}-{(group + 1) * TILE_CHANNELS - 1}")
    return [Verdict("normwise error", normwise, NORMWISE_BOUND),
            Verdict(f"worst {TILE_ROWS}x{TILE_CHANNELS} tile's error", flat[worst].item(), bound,
                    where)]


def channel_stats_agreement(mean: torch.Tensor, var: torch.Tensor, ref_mean: torch.Tensor,
                            ref_var: torch.Tensor, dtype: torch.dtype) -> list[Verdict]:
    """Per-channel verdicts for the batch mean and biased variance of a conv output of `dtype`:
    each channel's difference against an absolute scale, its second moment E[z^2] = mean^2 +
    var (floored at FLOOR^2 of the layer's mean second moment), not against the norm of the
    whole vector, where one channel's error is diluted by all the others."""
    if not (special_values_agree(mean, ref_mean) and special_values_agree(var, ref_var)):
        return [Verdict("NaN/inf placement of the statistics", float("inf"), 0.0)]
    m, v, rm, rv = (t.double() for t in (mean, var, ref_mean, ref_var))
    finite = torch.isfinite(rm) & torch.isfinite(rv)
    if not bool(finite.any()):
        return []
    m, v, rm, rv = m[finite], v[finite], rm[finite], rv[finite]
    second = rm.square() + rv
    scale = torch.maximum(second, FLOOR ** 2 * second.mean())
    bound = STATS_ROUNDING_UNITS * rounding_unit(dtype)
    verdicts = []
    for name, err in (("mean", _safe_ratio((m - rm).abs(), scale.sqrt())),
                      ("variance", _safe_ratio((v - rv).abs(), scale))):
        worst = int(err.argmax())
        channel = int(finite.nonzero()[worst])
        verdicts.append(Verdict(f"worst channel {name}'s error", err[worst].item(), bound,
                                f"channel {channel}"))
    return verdicts


def _has_channel_stats(outputs: Sequence[torch.Tensor]) -> bool:
    """(z, mean, var): a conv output and its per-channel batch statistics."""
    if len(outputs) != 3 or outputs[0].dim() != 4:
        return False
    per_channel = (outputs[0].shape[1],)
    return tuple(outputs[1].shape) == per_channel and tuple(outputs[2].shape) == per_channel


def conv_agreement(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> Verdict:
    """The worst of conv_verdicts (largest error / bound): whether a candidate conv path's
    outputs `got` agree with the library conv's `ref` on the same input."""
    return max(conv_verdicts(got, ref), key=lambda v: v.ratio,
               default=Verdict("no outputs", 0.0, 0.0))


def conv_verdicts(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> list[Verdict]:
    """Every verdict on a candidate conv path's outputs `got` against the library conv's `ref`
    on the same input.

    One normwise error per output cannot see a tile-local fault at scale: ResNet-50's stem at
    batch 256 has 25,088 row tiles of 128 pixels, so ten 128 x 64 tiles of wrong values of the
    right size (a wrong address, say) leave the normwise error below its bound of 0.03, and
    one tile's share of a channel's batch mean is 1/25,088. So besides it (bound
    NORMWISE_BOUND, kept for outputs of any shape), with NaN/inf required in the same places:

    - every 64 x 64 tile of a conv output [N, C, H, W] (tile_errors): the normwise error of
      that tile alone, against the larger of its own norm and FLOOR x its channels' RMS,
      bounded by max(TILE_ROUNDING_UNITS x rounding_unit(dtype), TILE_OUTLIER_FACTOR x the
      median tile's error). Correct paths differ by the output's rounding (RMS <= u/sqrt(3)
      of the value, u = 2^-8 bf16, 2^-11 fp16 and TF32) taken once or twice (the library path
      rounds the conv output, then its epilogue's result), so a tile's error is below ~u; 8
      units leave room for the library's first rounding being scaled up where a bias cancels
      part of the conv output. Where that cancellation is strong (|mean|/std of 10-30 in real
      raw conv outputs), every tile's error grows alike, and the median term follows it: a
      tile no worse than 4x the typical one is no tile-local fault, and uniform disagreement
      is the normwise bound's business. A tile-local fault stands out: wrong values at
      ~sqrt(2), a zeroed tile at 1, a tile off by 5% at 0.05, against bounds of 0.031 (bf16)
      and 0.0040 (fp16, fp32).
    - for (z, mean, var), each channel's mean and variance (channel_stats_agreement): the
      difference against an absolute scale, the channel's second moment, bounded by
      STATS_ROUNDING_UNITS x rounding_unit(dtype). Rounding z to the dtype moves a channel's
      mean by at most u x its RMS and its variance by at most ~4u x its second moment (the
      library path takes the statistics of the rounded z, the Triton path of its fp32
      accumulator); the fp32 sums over up to 2^22 pixels add far less. So one channel's wrong
      statistics (a bad merge of partial sums) fail however many channels there are. A fault
      in one tile's partial statistics fails when it moves its channel's by more than that (a
      128-row partial of 10^3 x RMS moves a batch-256 stem channel's mean by 0.04 RMS, 2.6x
      the bf16 bound); a subtler one moves them by less than rounding z to the dtype does, and
      BN cannot tell the two apart. A tile-local fault in z itself is caught in z.

    Cost: three passes over the output (got - ref and two norms per 64-pixel run and
    channel), all vectorised, once per candidate and shape at tuning time; a second, fp32 pass
    only where a value is not finite. tests/test_agreement.py measures the headroom (correct
    candidates stay below 0.14 of each bound) and how far planted faults exceed it."""
    if len(got) != len(ref):
        return [Verdict("number of outputs", float("inf"), 0.0, f"{len(got)} for {len(ref)}")]
    mismatched = [index for index, (g, r) in enumerate(zip(got, ref)) if g.shape != r.shape]
    if mismatched:
        return [Verdict("shape", float("inf"), 0.0, f"output {mismatched[0]}")]
    verdicts = []
    for index, (g, r) in enumerate(zip(got, ref)):
        if r.dim() == 4:
            verdicts += tile_agreement(g, r)
        else:
            verdicts.append(Verdict("normwise error", agreement_error(g, r), NORMWISE_BOUND,
                                    f"output {index}"))
    if _has_channel_stats(ref):
        verdicts += channel_stats_agreement(got[1], got[2], ref[1], ref[2], ref[0].dtype)
    return verdicts
