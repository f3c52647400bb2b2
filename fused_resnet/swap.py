"""Model surgery: fuse_(model) swaps torchvision ResNet blocks for fused ones in place;
unfuse_(model) swaps them back. Parameters and buffers are shared, never copied, so
state_dict keys and values are unchanged either way."""

import logging
from typing import Callable, Optional

from torch import nn
from torchvision.models import resnet as tv

from fused_resnet.models import PlainBlock
from fused_resnet.modules import FusedBasicBlock, FusedBottleneck, FusedPlainBlock, FusedStem

log = logging.getLogger("fused_resnet")

_FUSED_FOR = {tv.BasicBlock: FusedBasicBlock, tv.Bottleneck: FusedBottleneck,
              PlainBlock: FusedPlainBlock}
_FUSED_TYPES = tuple(_FUSED_FOR.values())
REPORT_ATTRIBUTE = "fused_resnet_report"


def _why_not_fusable(block: nn.Module) -> Optional[str]:
    """None if the block is exactly what the fused block computes, else the reason."""
    names = FusedBottleneck.submodules if isinstance(block, tv.Bottleneck) \
        else FusedBasicBlock.submodules
    for name in names:
        module = getattr(block, name, None)
        if name.startswith("conv") and type(module) is not nn.Conv2d:
            return f"{name} is {type(module).__name__}, not nn.Conv2d"
        if name.startswith("bn") and type(module) is not nn.BatchNorm2d:
            return f"{name} is {type(module).__name__}, not nn.BatchNorm2d (SyncBatchNorm is " \
                   f"left unfused to keep its cross-process statistics)"
        if name == "relu" and not isinstance(module, nn.ReLU):
            return f"relu is {type(module).__name__}"
    if type(block).forward not in (tv.BasicBlock.forward, tv.Bottleneck.forward,
                                   PlainBlock.forward):
        return f"{type(block).__name__} overrides forward"
    return None


def fuse_(model: nn.Module, *, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None
          ) -> nn.Module:
    """Replace, in place, every torchvision BasicBlock / Bottleneck in `model` (for which
    filter_fn(module, fully_qualified_name) is true, if given) with its fused counterpart.
    Idempotent; keeps weights, buffers, train/eval mode, device and dtype. Returns `model`;
    what was swapped and what was left (with the reason) is in
    model.fused_resnet_report = {"fused": [names], "left": {name: reason}}."""
    report = {"fused": [], "left": {}}
    for fqn, module in model.named_modules():
        if isinstance(module, tv.ResNet):
            _fuse_stem(module, fqn, filter_fn, report)
    _fuse_children(model, "", filter_fn, report)
    setattr(model, REPORT_ATTRIBUTE, report)
    log.info("fused_resnet.fuse_: fused %d blocks, left %d", len(report["fused"]),
             len(report["left"]))
    return model


def _fuse_stem(resnet: tv.ResNet, prefix: str, filter_fn, report) -> None:
    """conv1 -> bn1 -> relu of a torchvision ResNet (reported under the name <prefix>conv1)."""
    fqn = f"{prefix}.conv1" if prefix else "conv1"
    if isinstance(resnet.conv1, FusedStem):
        report["fused"].append(fqn)
        return
    if filter_fn is not None and not filter_fn(resnet.conv1, fqn):
        report["left"][fqn] = "excluded by filter_fn"
        return
    if type(resnet.conv1) is not nn.Conv2d or type(resnet.bn1) is not nn.BatchNorm2d \
            or not isinstance(resnet.relu, nn.ReLU) or type(resnet).forward is not tv.ResNet.forward:
        report["left"][fqn] = "stem is not torchvision's conv1 -> BatchNorm2d -> ReLU"
        return
    resnet.conv1, resnet.bn1 = FusedStem.fuse(resnet.conv1, resnet.bn1)
    report["fused"].append(fqn)


def _fuse_children(module: nn.Module, prefix: str, filter_fn, report) -> None:
    for name, child in module.named_children():
        fqn = f"{prefix}.{name}" if prefix else name
        if isinstance(child, _FUSED_TYPES):
            report["fused"].append(fqn)  # already fused: idempotent
            continue
        fused_type = _FUSED_FOR.get(type(child))
        if fused_type is None:
            _fuse_children(child, fqn, filter_fn, report)
            continue
        if filter_fn is not None and not filter_fn(child, fqn):
            report["left"][fqn] = "excluded by filter_fn"
            continue
        reason = _why_not_fusable(child)
        if reason:
            report["left"][fqn] = reason
            continue
        setattr(module, name, fused_type.from_block(child))
        report["fused"].append(fqn)


def unfuse_(model: nn.Module) -> nn.Module:
    """Put the original torchvision blocks back (same parameters and buffers). In place."""
    for name, child in model.named_children():
        if isinstance(child, _FUSED_TYPES):
            setattr(model, name, child.to_block())
        elif isinstance(child, FusedStem):
            model.conv1, model.bn1 = child.originals()
        else:
            unfuse_(child)
    if hasattr(model, REPORT_ATTRIBUTE):
        delattr(model, REPORT_ATTRIBUTE)
    return model
