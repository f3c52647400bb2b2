"""Lower bounds on the time of a forward (inference) or a training step, from the work that
cannot be avoided:

- compute floor: the convolutions' and the classifier's FLOPs (torch's FlopCounterMode on one
  image, times the batch) / the measured matmul rate;
- memory-traffic floor: bytes a fully fused network must move: every conv and linear layer
  reads its input and weights and writes its output once (BN, ReLU and the residual add live
  in its epilogue, and each block's residual is read once more), in the benchmark's dtype,
  divided by the measured copy bandwidth.

A training step counts 3x the forward FLOPs (forward, input gradient, weight gradient) and
3x the forward bytes (the backward reads the saved input, the weights and the incoming
gradient and writes the two gradients): approximations, stated as such in the report.
"""

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

TRAINING_FACTOR = 3


def forward_flops_per_image(model: nn.Module, image_size: int) -> int:
    x = torch.randn(1, 3, image_size, image_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    return counter.get_total_flops()


def forward_bytes_per_image(model: nn.Module, image_size: int, element_size: int) -> int:
    """Activation and weight bytes a fully fused forward moves for one image (weights are read
    once per batch: counted per image here as their share of a batch of one, so the caller
    adds them once per batch, see floor_seconds)."""
    moved = []

    def hook(module, inputs, output):
        moved.append(inputs[0].numel() + output.numel())

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    residuals = [m.register_forward_hook(lambda m, i, o: moved.append(o.numel()))
                 for m in model.modules() if _is_residual_block(m)]
    try:
        with torch.no_grad():
            model.eval()(torch.randn(1, 3, image_size, image_size))
    finally:
        for h in handles + residuals:
            h.remove()
    return sum(moved) * element_size


def weight_bytes(model: nn.Module, element_size: int) -> int:
    return sum(m.weight.numel() for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))) * element_size


def _is_residual_block(module: nn.Module) -> bool:
    return type(module).__name__ in ("BasicBlock", "Bottleneck") or \
        type(module).__name__.startswith("Fused") and hasattr(module, "downsample")


def floors(model: nn.Module, image_size: int, batch_size: int, element_size: int) -> dict:
    """{"inference"|"training": {"flops": ..., "bytes": ...}} for one batch."""
    flops = forward_flops_per_image(model, image_size) * batch_size
    moved = forward_bytes_per_image(model, image_size, element_size) * batch_size \
        + weight_bytes(model, element_size)
    return {"inference": {"flops": flops, "bytes": moved},
            "training": {"flops": TRAINING_FACTOR * flops, "bytes": TRAINING_FACTOR * moved}}
