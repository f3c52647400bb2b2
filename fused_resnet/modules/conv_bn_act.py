"""conv -> BatchNorm (-> + residual) (-> ReLU) with the modules' own parameters and buffers,
through the fused ops, one pair (conv_bn_act) or a chain of pairs joined by ReLUs
(conv_bn_relu_chain: a residual block's branch):

- training (or BN without running stats): conv2d_bn_stats (BN statistics in the conv
  epilogue; an nn.SyncBatchNorm in a process group then normalises with the group's, see
  fused_resnet.ops.sync_bn_add_relu, and hands on its activation rather than its
  statistics); inside a chain, each next conv takes the previous raw conv output and applies
  that BN + ReLU itself (bn_relu_conv2d_bn_stats, which keeps the conv output for backward but
  never the activation); the last BN runs batch_norm_add_relu with its statistics. Running
  stats and num_batches_tracked updated exactly as nn.BatchNorm2d, but only once the whole
  step or chain (or, given `updates`, the caller: a block) has run, so that an exception
  leaves every buffer as it was. An empty batch takes the unfused ops (see _conv_with_stats).
- eval (and FrozenBatchNorm2d always, see fused_resnet.modules.norms): BN folded into the
  conv weights (fp32 math; differentiable when the conv's weight is trained),
  conv2d_epilogue with the shift, the residual and the ReLU in the epilogue. Folded weights
  are cached and recomputed when any parameter or buffer they come from changes (optimizer
  step, load_state_dict, .to()).
  On CPU, in inference (nothing for autograd to record, not traced), where the ops would run
  oneDNN's fused conv anyway, the module calls it directly with the folded weight prepacked
  once into oneDNN's blocked format (cached and invalidated with the folded weights), and
  writes the residual add into the residual when the caller says nobody else holds it
  (`residual_writable`: a block's own shortcut output, or an input donated by
  fused_resnet.modules.stage). oneDNN's ReLU post-op loses NaN, so it runs only where the
  output is known to be finite (fused_resnet.ops.conv_mkldnn): a block measures its input once
  (`Bounds`) and each step's bound follows from its input's, its folded weight's gain and its
  residual's, so the check costs one read of the block input.
"""

import math

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from fused_resnet import fold, functional, layout
from fused_resnet.ops import conv as conv_ops
from fused_resnet.modules import norms
from fused_resnet.modules.norms import uses_batch_statistics
from fused_resnet.ops import bn_relu_conv, conv_mkldnn



def _conv_args(conv: nn.Conv2d):
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        return None
    return list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups


def _autocast(x: Tensor, weight: Tensor):
    """What autocast does to a conv's operands (a custom op is invisible to autocast)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return x.to(dtype), weight.to(dtype)
    return x, weight


def _fold_key(conv: nn.Conv2d, bn: nn.BatchNorm2d):
    tensors = [conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var]
    return tuple((t._version, t.data_ptr(), t.dtype, t.device) if t is not None else None
                 for t in tensors) + (bn.eps,)


def folded_weights(conv: nn.Conv2d, bn: nn.BatchNorm2d, cache: Optional[dict]):
    """(weight * scale, shift) of conv followed by eval-mode bn. Cached in `cache` (keyed by the
    versions of every tensor involved) unless autograd must see the folding (trainable
    parameters under grad mode) or torch.compile is tracing."""
    differentiable = torch.is_grad_enabled() and any(
        p is not None and p.requires_grad for p in (conv.weight, conv.bias, bn.weight, bn.bias))
    if differentiable or cache is None or torch.compiler.is_compiling():
        return fold.fold_conv_bn(conv.weight, conv.bias, *fold.bn_eval_scale_shift(bn))
    key = _fold_key(conv, bn)
    if cache.get("key") != key:
        with torch.no_grad():
            cache["value"] = fold.fold_conv_bn(conv.weight, conv.bias,
                                               *fold.bn_eval_scale_shift(bn))
        cache["key"] = key
    return cache["value"]


def prepacked_applies(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Tensor, residual,
                       cache: Optional[dict]) -> bool:
    """Whether this eval-mode step takes the CPU inference fast path (module docstring)."""
    if cache is None or type(x) is not Tensor or x.device.type != "cpu" \
            or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if functional.autograd_records(x, residual, conv.weight, conv.bias, bn.weight, bn.bias):
        return False
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    return conv_ops.mkldnn_chosen(x, conv.weight, dtype, residual is not None)


class Bounds:
    """Upper bounds on |t| for the tensors the CPU inference fast path passes between the
    steps of one block (or one standalone step): measured once for a tensor that comes from
    outside (conv_mkldnn.max_abs) unless the previous block of a stage handed its output's
    bound over with it, computed for each step's output (conv_mkldnn.output_bound; inf where
    the output may not be finite). Tensors are matched by identity."""

    def __init__(self):
        self._known: list = []  # [(tensor, bound)]

    def of(self, t: Optional[Tensor]) -> float:
        if t is None:
            return 0.0
        for known, bound in self._known:
            if known is t:
                return bound
        bound = conv_mkldnn.max_abs(t)
        self._known.append((t, bound))
        return bound

    def set(self, t: Tensor, bound: float) -> None:
        """t's bound (t may be a tensor written in place: its old bound is dropped)."""
        self._known = [(k, b) for k, b in self._known if k is not t] + [(t, bound)]

    def known(self, t: Tensor) -> Optional[float]:
        """t's bound if one was measured or set here, else None (nothing is measured)."""
        return next((b for k, b in self._known if k is t), None)

    # A bound handed over with a block's input (the previous block's output bound) is taken
    # only while it leaves 2^50 of room below SAFE_BOUND for the block's own growth (a
    # ResNet-50 block multiplies it by 2^10-2^17): past that, one pass measuring the input
    # costs less than a conv that loses its ReLU post-op to a loose bound.
    HANDOVER_LIMIT = conv_mkldnn.SAFE_BOUND * 2.0 ** -50

    def take_handed_over(self, t: Tensor, bound: Optional[float]) -> None:
        if bound is not None and bound <= self.HANDOVER_LIMIT:
            self.set(t, bound)


def _prepacked_weights(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Tensor, cache: dict):
    """(x, prepacked folded weight, shift, the folded weight's gain, max |shift|) for the oneDNN
    fast path: x in the autocast dtype, the weight folded, cast to x's dtype and reordered for
    x's shape and layout once; kept in `cache` until the folded weights change or the input's
    shape, dtype or layout does."""
    weight, shift = folded_weights(conv, bn, cache)
    x, weight = _autocast(x, weight)
    key = (cache["key"], x.dtype, tuple(x.shape), layout.kernel_format(x))
    entry = cache.get("packed")
    if entry is None or entry[0] != key:
        stride, padding, dilation, groups = _conv_args(conv)
        # one assignment of (key, weight, gain): a thread serving the same module never reads
        # a weight under another shape's key
        entry = (key, conv_mkldnn.prepack(weight.to(x.dtype), stride, padding, dilation, groups,
                                          x), conv_mkldnn.weight_gain(weight),
                 conv_mkldnn.max_abs(shift))
        cache["packed"] = entry
    return x, entry[1], shift, entry[2], entry[3]


def _conv_bn_act_prepacked(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Tensor,
                           residual: Optional[Tensor], relu: bool, cache: dict,
                           residual_writable: bool, bounds: Bounds) -> Tensor:
    bound = bounds.of(x)  # before the autocast cast, which makes a new tensor
    x, weight, shift, gain, shift_bound = _prepacked_weights(conv, bn, x, cache)
    bound = conv_mkldnn.output_bound(bound, gain, shift_bound, bounds.of(residual))
    stride, padding, dilation, groups = _conv_args(conv)
    out = conv_mkldnn.conv2d_act(x, weight, shift, stride, padding, dilation, groups,
                                 residual, relu, into_residual=residual_writable, bound=bound)
    bounds.set(out, bound if conv_mkldnn.keeps_finite(bound) else math.inf)
    return out


class _Pending(NamedTuple):
    """A training BN whose statistics are known but whose relu(bn(z)) is not materialised."""
    z: Tensor
    mean: Tensor  # this process's batch statistics
    var: Tensor
    bn: nn.BatchNorm2d
    group: object = None  # the process group of a synchronised BN (norms.sync_group)


def _with_conv_bias(conv: nn.Conv2d, z: Tensor, mean: Tensor):
    """A conv bias shifts the output and its batch mean, not the variance."""
    if conv.bias is None:
        return z, mean
    return z + conv.bias.to(z.dtype).view(1, -1, 1, 1), mean + conv.bias.to(mean.dtype)


def _conv_with_stats(conv: nn.Conv2d, x, bn: nn.BatchNorm2d, updates: list) -> _Pending:
    """conv(x) and its batch statistics; x is a Tensor or a _Pending (the previous BN + ReLU
    applied on the way in). Puts bn's running-statistics update in `updates`."""
    stride, padding, dilation, groups = _conv_args(conv)
    if isinstance(x, _Pending) and (x.z.numel() == 0 or x.group is not None):
        # The fused prologue's backward would give the previous BN's weight a NaN gradient on
        # an empty batch (0 * rsqrt of the NaN variance of nothing); PyTorch's is zero. A
        # synchronised BN normalises with the group's statistics, which the prologue's backward
        # (local sums) does not know.
        x = _finish(x, None, True, updates)
    if isinstance(x, _Pending):
        z_in, weight = _autocast(x.z, conv.weight)
        p = x.bn
        z, mean, var = bn_relu_conv.run(z_in, p.weight, p.bias, x.mean, x.var, p.eps, weight,
                                        stride, padding, dilation, groups)
    else:
        x, weight = _autocast(x, conv.weight)
        z, mean, var = conv_ops.run_conv2d_bn_stats(x, weight, stride, padding, dilation,
                                                    groups)
    z, mean = _with_conv_bias(conv, z, mean)
    group = norms.sync_group(bn)
    if group is None:  # a synchronised BN's update needs the group's statistics: _finish
        functional.verify_batch_size(z)
        if bn.running_mean is not None:
            updates.append(functional.running_stats_update(bn.running_mean, bn.running_var,
                                                           mean, var, z, bn.momentum,
                                                           bn.num_batches_tracked))
    return _Pending(z, mean, var, bn, group)


def _finish(pending: _Pending, residual: Optional[Tensor], relu: bool,
            updates: list) -> Tensor:
    """relu(bn(z) + residual) with the batch statistics (running-stats update already
    collected, or for a synchronised BN, collected here)."""
    z, bn = pending.z, pending.bn
    if residual is not None and residual.dtype != z.dtype:
        residual = residual.to(z.dtype)
    if pending.group is not None:
        return functional.sync_batch_norm_add_relu(
            z, residual, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.momentum,
            bn.eps, relu, bn.num_batches_tracked, pending.group, batch_mean=pending.mean,
            batch_var=pending.var, running_stats_updates=updates)
    return functional.batch_norm_add_relu(
        z, residual, None, None, bn.weight, bn.bias, training=True, eps=bn.eps, relu=relu,
        batch_mean=pending.mean, batch_var=pending.var)


def conv_bn_relu_chain(steps: Sequence, x: Tensor, residual: Optional[Tensor] = None,
                       relu: bool = True, updates: Optional[list] = None,
                       residual_writable: bool = False,
                       bounds: Optional[Bounds] = None) -> Tensor:
    """relu(bn_n(conv_n(... relu(bn_1(conv_1(x))) ...)) + residual) for steps =
    [(conv_i, bn_i, fold cache_i)], ReLU between the steps always, at the end if `relu`.
    Training BNs pass their statistics along instead of their activation (see the module
    docstring); eval BNs and unsupported convs go one pair at a time.
    updates: a list collecting the BNs' running-statistics updates, for the caller to apply
    once nothing else can raise; None applies them once the whole chain has run.
    residual_writable, bounds: as conv_bn_act's."""
    if updates is None:
        return functional.with_running_stats_updates(conv_bn_relu_chain, steps, x, residual,
                                                     relu, residual_writable=residual_writable,
                                                     bounds=bounds)
    bounds = Bounds() if bounds is None else bounds
    pending = None
    for i, (conv, bn, cache) in enumerate(steps):
        last = i == len(steps) - 1
        if uses_batch_statistics(bn) and _conv_args(conv) is not None:
            pending = _conv_with_stats(conv, pending if pending is not None else x, bn,
                                       updates)
            continue
        if pending is not None:
            x, pending = _finish(pending, None, True, updates), None
        x = conv_bn_act(conv, bn, x, residual if last else None, relu or not last, cache,
                        updates, residual_writable=last and residual_writable, bounds=bounds)
    return x if pending is None else _finish(pending, residual, relu, updates)


def conv_bn_act(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Tensor, residual: Optional[Tensor] = None,
                relu: bool = True, cache: Optional[dict] = None,
                updates: Optional[list] = None, residual_writable: bool = False,
                bounds: Optional[Bounds] = None) -> Tensor:
    """relu(bn(conv(x)) + residual) (ReLU and residual optional) with conv's and bn's own
    parameters and buffers, nn.BatchNorm2d semantics in train and eval.
    updates: as conv_bn_relu_chain's.
    residual_writable: nobody but the caller holds `residual` (nor a view of it) and the
    caller does not use it afterwards, so the CPU fast path may write the result into it.
    bounds: the Bounds of the caller's block (the CPU fast path's NaN guard; a new one if
    None)."""
    if updates is None:
        return functional.with_running_stats_updates(conv_bn_act, conv, bn, x, residual, relu,
                                                     cache, residual_writable=residual_writable,
                                                     bounds=bounds)
    args = _conv_args(conv)
    group = norms.sync_group(bn) if args is None else None
    if group is not None:  # plain conv, synchronised BN
        z = conv(x)
        var, mean = torch.var_mean(z.float(), dim=(0, 2, 3), correction=0)
        return _finish(_Pending(z, mean, var, bn, group), residual, relu, updates)
    if args is None:  # string or non-zero padding modes: plain conv, fused BN epilogue
        return functional.batch_norm_add_relu(
            conv(x), residual, bn.running_mean, bn.running_var, bn.weight, bn.bias,
            training=uses_batch_statistics(bn), momentum=norms.momentum(bn), eps=bn.eps,
            relu=relu, num_batches_tracked=norms.num_batches_tracked(bn),
            running_stats_updates=updates)
    if uses_batch_statistics(bn):
        return _finish(_conv_with_stats(conv, x, bn, updates), residual, relu, updates)
    if prepacked_applies(conv, bn, x, residual, cache):
        return _conv_bn_act_prepacked(conv, bn, x, residual, relu, cache, residual_writable,
                                      Bounds() if bounds is None else bounds)
    stride, padding, dilation, groups = args
    weight, shift = folded_weights(conv, bn, cache)
    x, weight = _autocast(x, weight)
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    if residual is not None and residual.dtype != x.dtype:
        residual = residual.to(x.dtype)
    return conv_ops.run_conv2d_epilogue(x, weight, stride, padding, dilation, groups, None,
                                        shift, residual, relu)


class DropsDerivedCaches:
    """Folded and prepacked weights are derived from the parameters and buffers, and a
    prepacked weight is an opaque oneDNN tensor that cannot be pickled: pickling, deep copies
    and torch.save of the module leave these caches out (empty), and the copy rebuilds them on
    first use."""

    _DERIVED_CACHES = ("_fold_cache",)

    def __getstate__(self):
        state = dict(super().__getstate__())
        for name in self._DERIVED_CACHES:
            if name in state:
                state[name] = _emptied(state[name])
        return state


def _emptied(cache: dict) -> dict:
    """An empty cache of the same shape: a dict of per-conv caches keeps its keys."""
    if cache and all(isinstance(value, dict) for value in cache.values()):
        return {key: {} for key in cache}
    return {}


class FusedConvBNAct(DropsDerivedCaches, nn.Module):
    """conv -> bn (-> + residual) (-> ReLU) as one fused step; holds the given modules under the
    names conv and bn (their parameters are shared, not copied)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool = True):
        super().__init__()
        if type(conv) is not nn.Conv2d or norms.why_not_fusable(bn) is not None:
            raise TypeError(f"FusedConvBNAct: expected nn.Conv2d and nn.BatchNorm2d (or "
                            f"FrozenBatchNorm2d), got "
                            f"{type(conv).__name__} and {type(bn).__name__}")
        self.conv, self.bn, self.relu = conv, bn, relu
        self._fold_cache: dict = {}
        self.__dict__["_original"] = None

    @classmethod
    def from_block(cls, block: nn.Sequential) -> "FusedConvBNAct":
        """From Sequential(Conv2d, BatchNorm2d[, ReLU]) (e.g. torchvision's
        Conv2dNormActivation). Its state_dict keys are conv.* / bn.*; to_block() gives the
        original Sequential back (sharing the parameters)."""
        parts = list(block) if isinstance(block, nn.Sequential) else []
        relu = len(parts) == 3 and type(parts[2]) is nn.ReLU
        if len(parts) not in (2, 3) or (len(parts) == 3 and not relu):
            raise TypeError(f"FusedConvBNAct.from_block expects Sequential(Conv2d, BatchNorm2d"
                            f"[, ReLU]), got {block}")
        fused = cls(parts[0], parts[1], relu).train(block.training)
        fused.__dict__["_original"] = block
        return fused

    def to_block(self) -> nn.Sequential:
        """The Sequential this was built from (or a new Sequential(conv, bn[, ReLU]))."""
        if self._original is not None:
            return self._original.train(self.training)
        parts = [self.conv, self.bn] + ([nn.ReLU(inplace=True)] if self.relu else [])
        return nn.Sequential(*parts).train(self.training)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return conv_bn_act(self.conv, self.bn, x, residual, self.relu, self._fold_cache)
