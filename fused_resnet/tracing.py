"""Whether a tensor is a plain one, with storage that kernels can read, or one that something
traces with (a fake, functional or other subclass tensor: torch.compile, torch.export, make_fx).
The one test the launchers, the backend routing and the eager fast path share."""

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def is_plain(t: torch.Tensor) -> bool:
    """Whether `t` is a plain torch.Tensor or nn.Parameter (not a subclass tensor)."""
    return type(t) in _PLAIN
