"""Correctness before timing: a provider's logits (and in training, its parameter gradients)
on a check batch vs eager PyTorch in float64 from the same weights, allowed MARGIN times the
error eager PyTorch itself makes in the benchmark's dtype (logits: max-abs error, plus 4
rounding units at the logits' scale; gradients: normwise over all parameters, or at least
GRADIENT_FLOOR, because a ReLU input within rounding of zero may decide either way, which
moves gradients by far more than rounding).

Why MARGIN = 4 rather than op-level 2: after 50 layers, equally valid fp32 implementations
(other conv algorithms, other summation orders) differ from float64 by amounts whose max over
a few thousand logits varies from run to run: on one CPU check batch eager NCHW was 5.6e-5
off, eager channels_last 7.4e-5 and torch.compile 1.3e-4, all correct. A wrong term (one BN
scale 20% off, a missing residual) is off by O(0.1-1): orders of magnitude above the margin.

Why GRADIENT_FLOOR = 5e-2 even in fp32: with a small check batch the last stage's BNs see a
few dozen values per channel, and a ReLU decision flipped by rounding there moves every
upstream gradient; correct fp32 implementations were seen 8.4e-3 normwise off (torch.compile
on resnet18, eager 1.6e-3) and 2e-2 in the fused tests. The injected 20% BN error is 1.4.

Inference is checked on the timing batch itself (so a compiled provider's check runs the very
graph that is timed), against a float64 reference on its first `compared` images: eval-mode
BN treats each image alone, so those logits do not depend on the rest of the batch, and the
float64 model need not run the whole timing batch (which on a GPU at batch 256 would not fit).
Training can't be sliced that way (batch statistics couple the images): it is checked on
whatever batch the suite gives it."""

import copy
from typing import NamedTuple

import torch

from fused_resnet.compare import normwise_error


MARGIN = 4
GRADIENT_FLOOR = 5e-2
ROUNDING_UNITS = 4


class Reference(NamedTuple):
    """float64 eager and eager-in-the-benchmark-dtype results on one check batch."""
    logits64: torch.Tensor
    grads64: torch.Tensor  # all parameter gradients, flattened (training) or empty
    logits_eager: torch.Tensor
    grads_eager: torch.Tensor


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.double().flatten() for g in grads if g is not None])


def reference(model, eager_runner, x, target, mode: str, compared: int = None) -> Reference:
    """model: the fp32 weights (left untouched); eager_runner: a fresh eager provider.
    Inference: float64 logits of the first `compared` images of x (default: all)."""
    model64 = copy.deepcopy(model).double().to(x.device)
    if mode == "inference":
        compared = compared or len(x)
        with torch.no_grad():
            logits64 = model64.eval()(x[:compared].double())
        logits = eager_runner.inference(eager_runner.prepare_input(x))[:compared]
        return Reference(logits64, torch.empty(0), logits, torch.empty(0))
    model64.train()
    model64.zero_grad()
    logits64 = model64(x.double())
    torch.nn.functional.cross_entropy(logits64, target).backward()
    grads64 = _flat(p.grad for p in model64.parameters())
    logits, grads = eager_runner.forward_backward(eager_runner.prepare_input(x), target)
    return Reference(logits64.detach(), grads64, logits.detach(), _flat(grads))


def _logits_error(logits: torch.Tensor, ref: Reference):
    """(max-abs error vs float64, allowed: MARGIN x eager's + rounding at the logits' scale)."""
    error = (logits.double() - ref.logits64).abs().max().item()
    eager = (ref.logits_eager.double() - ref.logits64).abs().max().item()
    scale = ref.logits64.abs().max().item() + 1.0
    return error, MARGIN * eager + ROUNDING_UNITS * torch.finfo(logits.dtype).eps * scale


def check(runner, ref: Reference, x, target, mode: str) -> dict:
    """{"ok": bool, "logits_error", "logits_allowed", ["grad_error", "grad_allowed"]}."""
    x = runner.prepare_input(x)
    if mode == "inference":
        logits = runner.inference(x)[:len(ref.logits64)]
    else:
        logits, grads = runner.forward_backward(x, target)
    error, allowed = _logits_error(logits.detach(), ref)
    result = {"ok": error <= allowed and bool(torch.isfinite(logits).all()),
              "logits_error": error, "logits_allowed": allowed}
    if mode == "training":
        err = normwise_error(_flat(grads), ref.grads64)
        allowed = max(MARGIN * normwise_error(ref.grads_eager, ref.grads64),
                      GRADIENT_FLOOR)
        result.update(grad_error=err, grad_allowed=allowed, ok=result["ok"] and err <= allowed)
    return result
