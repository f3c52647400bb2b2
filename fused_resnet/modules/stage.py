"""A ResNet stage (torchvision's layer1..layer4, timm's the same) whose fused blocks hand each
other their outputs.

Between two blocks of an nn.Sequential the tensor that flows is held by the Sequential's loop
alone: once block i returned it, only block i + 1 will ever read it. Its residual add may then
go into that tensor (oneDNN's in-place binary post-op on the CPU inference path) instead of
into a newly allocated output: one allocation and one output's worth of cold memory less per
block. FusedSequential is that nn.Sequential, saying so to the block it calls.

It says so only when it can prove it: the previous module is a fused block (whose output is a
tensor it created) without forward hooks on it or on its inner modules, the next one is a fused
block without forward pre-hooks, no global module hooks are registered (any of those could keep
the tensor), the tensor is a plain Tensor that autograd does not record (backward may need it),
and nothing is tracing or compiling (a graph decides its own buffers). The stage's own input is
never donated: the caller holds it. With a donated tensor goes the bound on its values that the
previous block computed for it (the NaN guard of the CPU inference path,
fused_resnet.modules.conv_bn_act.Bounds), which spares the next block a pass measuring it. Same children, state_dict keys and hooks as the
nn.Sequential it was; fuse_ changes the class of the Sequential in place and unfuse_ changes it
back.
"""

import torch
from torch import Tensor, nn

from fused_resnet.modules import unfused
from fused_resnet.modules.blocks import FusedBlock


def _gives_own_output(module: nn.Module) -> bool:
    """Whether `module`, about to be called, returns a tensor that nobody but the caller will
    hold: a fused block computing fused (no hooks on it or inside it, which could keep it)."""
    return isinstance(module, FusedBlock) and not module._forward_hooks \
        and not unfused.hooked_inner(module)


def _can_give(output) -> bool:
    return type(output) is Tensor and not output.requires_grad


def _can_take(module: nn.Module) -> bool:
    return isinstance(module, FusedBlock) and not module._forward_pre_hooks


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or \
        torch.jit.is_scripting()


class FusedSequential(nn.Sequential):
    """nn.Sequential that donates the tensors between its fused blocks (module docstring)."""

    def forward(self, input):
        if _tracing() or unfused.global_hooks():
            return super().forward(input)
        donatable, bound = False, None  # the stage's input belongs to the caller
        for module in self:
            # judged before the call: a hook that removes itself while running may keep the
            # output all the same
            gives = _gives_own_output(module)
            if donatable and _can_take(module):
                module.donate(input, bound)
                try:
                    input = module(input)
                finally:
                    module.withdraw()
            else:
                input = module(input)
            donatable = gives and _can_give(input)
            # what nobody else held, nobody else changed: its bound still holds
            bound = module.output_bound() if donatable else None
        return input

    def __prepare_scriptable__(self):
        raise unfused.scripting_error(self)


def stage_of(module: nn.Module) -> bool:
    """Whether `module` is a plain nn.Sequential with two fused blocks in a row (worth making a
    FusedSequential)."""
    if type(module) is not nn.Sequential:
        return False
    children = list(module)
    return any(isinstance(a, FusedBlock) and isinstance(b, FusedBlock)
               for a, b in zip(children, children[1:]))


def make_stage_(module: nn.Sequential) -> None:
    """Turn an nn.Sequential into a FusedSequential, in place (same object, children, hooks)."""
    module.__class__ = FusedSequential


def unmake_stage_(module: nn.Module) -> None:
    if type(module) is FusedSequential:
        module.__class__ = nn.Sequential
