"""The normalisation layers a fused conv -> norm step accepts, and what each of them means for
the fused computation:

- nn.BatchNorm2d: batch statistics in training (or without running stats), folded into the conv
  in eval;
- torchvision.ops.misc.FrozenBatchNorm2d (every torchvision detection backbone): a fixed
  per-channel affine map from its buffers, folded into the conv in training and in eval alike
  (the conv's weight still learns: autograd sees the folding). It has no momentum and no
  num_batches_tracked, and nothing of it is ever updated.
- nn.SyncBatchNorm: a BatchNorm2d whose training statistics are those of every process in its
  group when torch.distributed is initialised with more than one process in it (sync_group);
  otherwise exactly a BatchNorm2d, as nn.SyncBatchNorm itself falls back.
"""

from typing import Optional

import torch.distributed as dist
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d


def is_frozen(norm: nn.Module) -> bool:
    return isinstance(norm, FrozenBatchNorm2d)


def why_not_fusable(norm: nn.Module) -> Optional[str]:
    """None if a fused step can take `norm` as its BatchNorm, else the reason."""
    if type(norm) in (nn.BatchNorm2d, FrozenBatchNorm2d, nn.SyncBatchNorm):
        return None
    return f"is {type(norm).__name__}, not nn.BatchNorm2d, nn.SyncBatchNorm or FrozenBatchNorm2d"


def uses_batch_statistics(norm: nn.Module) -> bool:
    """Whether `norm` normalises with the batch statistics (a BatchNorm in training, or one
    without running stats) rather than folding into the conv."""
    if is_frozen(norm):
        return False
    return norm.training or norm.running_mean is None


def momentum(norm: nn.Module) -> Optional[float]:
    return getattr(norm, "momentum", None)


def num_batches_tracked(norm: nn.Module):
    return getattr(norm, "num_batches_tracked", None)


def sync_group(norm: nn.Module):
    """The process group whose batches `norm` normalises over in this call, or None: an
    nn.SyncBatchNorm in training with torch.distributed initialised and more than one process
    in its group (nn.SyncBatchNorm.forward's own rule)."""
    if not isinstance(norm, nn.SyncBatchNorm) or not norm.training:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = norm.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None
