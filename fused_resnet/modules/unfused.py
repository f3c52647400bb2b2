"""When a fused module computes through its original modules instead of the fused ops.

A fused block (or stem) replaces several modules' forward calls with one fused computation:
nothing calls its conv, BN or ReLU modules. That is invisible except to two kinds of callers,
for whom the fused module runs the original modules' code on the same (shared) modules:

- hooks on those inner modules (forward, forward-pre, backward; registered before or after
  fuse_), or global module hooks (which see every module's call): Grad-CAM, feature taps,
  pruning masks, quantization observers, profilers. The hooks then fire with the same modules,
  arguments, outputs and order as in the unfused model; the fused module says so once.
- FX symbolic tracing (torch.fx, torchvision's create_feature_extractor and
  get_graph_node_names): the traced graph is the unfused model's, node for node and name for
  name, so the same return_nodes give the same features. (A tracer told to keep the fused
  modules as leaves, `leaf_modules=[...]`, never calls their forward and keeps them fused.)

Hooks on the fused module itself need nothing from here: a fused block shares its original
block's hook dictionaries (see share_hooks), so they fire as before, around the whole block.
"""

import warnings
from typing import Optional

import torch
from torch import nn
from torch.nn.modules import module as torch_module

# The per-module hook dictionaries of nn.Module (torch 2.x), call and state_dict hooks
HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
              "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
              "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
              "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
_CALL_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_CALL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks",
                      "_global_backward_hooks", "_global_backward_pre_hooks")


def share_hooks(fused: nn.Module, original: nn.Module) -> None:
    """Make `fused` use `original`'s hook dictionaries (the same objects): hooks registered on
    either, before or after fusing, fire on whichever of the two runs, and their handles
    remove them from both."""
    for name in HOOK_DICTS:
        if name in original.__dict__:
            fused.__dict__[name] = original.__dict__[name]
    copy_backward_hook_kind(original, fused)


def copy_backward_hook_kind(source: nn.Module, target: nn.Module) -> None:
    """nn.Module records whether its backward hooks are full ones in a flag, not in the shared
    dictionary: carry it over (fusing, and unfusing)."""
    if "_is_full_backward_hook" in source.__dict__:
        target.__dict__["_is_full_backward_hook"] = source.__dict__["_is_full_backward_hook"]


def has_call_hooks(module: nn.Module) -> bool:
    """Whether hooks run when `module` is called (its own forward / backward hooks)."""
    return any(getattr(module, name, None) for name in _CALL_HOOKS)


def global_hooks(*names: str) -> bool:
    """Whether any global module hook of these kinds (all call hooks if none named) is
    registered: torch.nn.modules.module.register_module_forward_hook and friends. A torch
    without these registries counts as hooked."""
    return any(getattr(torch_module, name, True) for name in names or _GLOBAL_CALL_HOOKS)


def hooked_inner(module: nn.Module) -> bool:
    """Whether any of module's submodules (not module itself) has call hooks. (A plain walk
    over _modules: named_modules' prefixes and memo set cost more than the check, which runs
    on every call of every fused block.)"""
    for sub in module._modules.values():
        if sub is not None and (has_call_hooks(sub) or hooked_inner(sub)):
            return True
    return False


def _hooked_names(module: nn.Module) -> list:
    return [name for name, sub in module.named_modules() if name and has_call_hooks(sub)]


def fx_tracing(*args) -> bool:
    """Whether torch.fx is symbolically tracing this call (an argument is an FX Proxy)."""
    return any(isinstance(a, torch.fx.Proxy) for a in args)


def reason(module: nn.Module, *args) -> Optional[str]:
    """Why `module` must compute through its original modules for this call (module
    docstring), or None when it can run fused."""
    if fx_tracing(*args):
        return "FX tracing"
    if global_hooks():
        return "global module hooks are registered"
    if hooked_inner(module):
        return f"hooks on {', '.join(_hooked_names(module))}"
    return None


def say_once(module: nn.Module, why: str) -> None:
    """Warn, once per module instance, that it computes through its original modules because of
    hooks (tracing is not worth a warning: the traced graph is the unfused one by design)."""
    if why == "FX tracing" or module.__dict__.get("_said_unfused"):
        return
    module.__dict__["_said_unfused"] = True
    warnings.warn(f"fused_resnet: {type(module).__name__} computes through its original modules "
                  f"so that their hooks fire ({why}); it runs at unfused speed while they are "
                  f"registered", UserWarning, stacklevel=3)


def scripting_error(module: nn.Module):
    """The error torch.jit.script gets for a fused module (raised from __prepare_scriptable__,
    which torch.jit.script calls on every submodule before compiling anything)."""
    return RuntimeError(
        f"fused_resnet: {type(module).__name__} cannot be compiled by torch.jit.script (its "
        f"forward calls Python-registered custom ops and chooses kernels in Python). Use "
        f"torch.compile or torch.export on the fused model, or fused_resnet.unfuse_(model) "
        f"before torch.jit.script.")
