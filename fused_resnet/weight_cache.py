"""Forms of a weight that a kernel reads (the Triton conv's packed [KH, KW, C_in, C_out] weight,
the CUTLASS conv's channels_last weight) and constant per-channel vectors, computed once and
reused, rather than rebuilt by a few kernels on every call.

A derived weight is kept per weight tensor, keyed weakly by the tensor's identity (the entry
goes when the weight does: no growth beyond the live weights) and checked against everything
that can change the tensor's values or meaning: its version counter (bumped by every in-place
update: an optimizer step, load_state_dict's copy_, `with torch.no_grad(): w.mul_(...)`), data
pointer, dtype, device, shape and strides (`w.data = other` swaps them), and the same of an
extra tensor folded in (a scale). Nothing is stored on the module or the tensor, so pickling
and deepcopy see nothing of it.

Not cached, computed afresh each call: tensors that are not plain (fake, functional and other
subclass tensors of torch.compile, torch.export, make_fx; see fused_resnet.tracing), inference
tensors (they have no version counter), and anything during CUDA-graph capture (a capture
records kernels without running them: a value made then holds nothing until a replay).
Like the folded-weight cache of the fused modules, it cannot see writes through `w.data`, a
tensor with a version counter of its own.
"""

import weakref
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from fused_resnet import tracing

# weight -> {kind: (key, weakref to the extra tensor or None, value)}
_derived = WeakIdKeyDictionary()
# (value, size, dtype, device) -> constant vector
_constants: dict = {}


def _state(t: Tensor) -> tuple:
    return (t._version, t.data_ptr(), t.dtype, t.device, tuple(t.shape), t.stride())


def _capturing(t: Tensor) -> bool:
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def cacheable(*tensors: Optional[Tensor]) -> bool:
    """Whether values derived from these tensors may be kept (see the module docstring)."""
    present = [t for t in tensors if t is not None]
    return all(tracing.is_plain(t) and not t.is_inference() for t in present) and \
        not any(_capturing(t) for t in present)


def derived(weight: Tensor, kind: str, make: Callable[[], Tensor],
            extra: Optional[Tensor] = None) -> Tensor:
    """make() (run without autograd: a kernel operand, not a differentiable value), computed
    once per state of `weight` (and of `extra`, a tensor make() also reads) and kind."""
    if not cacheable(weight, extra):
        with torch.no_grad():
            return make()
    key = (_state(weight), _state(extra) if extra is not None else None)
    per_kind = _derived.get(weight)
    entry = per_kind.get(kind) if per_kind is not None else None
    if entry is not None and entry[0] == key and \
            (entry[1] is None if extra is None else entry[1] is not None and entry[1]() is extra):
        return entry[2]
    with torch.no_grad():
        value = make()
    # A value that shares the weight's storage (make() returned the weight or a view of it)
    # would keep the weight alive through the cache: return it without keeping it.
    if value.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr():
        return value
    if per_kind is None:
        per_kind = _derived.setdefault(weight, {})
    # one assignment of the whole entry: a concurrent reader sees an old or a new one, whole
    per_kind[kind] = (key, weakref.ref(extra) if extra is not None else None, value)
    return value


def constant(value: float, size: int, dtype: torch.dtype, like: Tensor) -> Tensor:
    """A vector of `size` elements all `value`, on like's device: one kept per (value, size,
    dtype, device) and shared by every caller, which must only read it."""
    if not cacheable(like):
        return torch.full((size,), value, dtype=dtype, device=like.device)
    key = (value, size, dtype, like.device)
    vector = _constants.get(key)
    if vector is None:
        vector = _constants.setdefault(
            key, torch.full((size,), value, dtype=dtype, device=like.device))
    return vector
