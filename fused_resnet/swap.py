"""Model surgery: fuse_(model) swaps torchvision's (and timm's) ResNet blocks and stems for
fused ones in place; unfuse_(model) swaps them back. Parameters and buffers are shared, never
copied, so state_dict keys and values are unchanged either way."""

import logging
import sys
from typing import Callable, Optional

from torch import nn
from torchvision.models import resnet as tv
from torchvision.models._utils import IntermediateLayerGetter

from fused_resnet.models import PlainBlock
from fused_resnet.modules import FusedBasicBlock, FusedBottleneck, FusedPlainBlock, FusedStem
from fused_resnet.modules import norms, unfused
from fused_resnet.modules.blocks import FusedTimmBasicBlock, FusedTimmBottleneck, timm_resnet
from fused_resnet.modules.stage import make_stage_, stage_of, unmake_stage_
from fused_resnet.modules.stem import STEM_NORM_TYPES

log = logging.getLogger("fused_resnet")

_FUSED_TYPES = (FusedBasicBlock, FusedBottleneck, FusedPlainBlock)
REPORT_ATTRIBUTE = "fused_resnet_report"


def _fused_for() -> dict:
    """{original block type: fused type}. timm's blocks only when timm is already imported (a
    model built by timm has imported it; fuse_ never imports timm itself)."""
    table = {tv.BasicBlock: FusedBasicBlock, tv.Bottleneck: FusedBottleneck,
             PlainBlock: FusedPlainBlock}
    if "timm" in sys.modules and timm_resnet() is not None:
        table[FusedTimmBasicBlock.block_type()] = FusedTimmBasicBlock
        table[FusedTimmBottleneck.block_type()] = FusedTimmBottleneck
    return table


def fuse_(model: nn.Module, *, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
          cpu_channels_last: bool = True) -> nn.Module:
    """Replace, in place, every torchvision / timm BasicBlock and Bottleneck and every ResNet
    stem in `model` (for which filter_fn(module, fully_qualified_name) is true, if given) with
    its fused counterpart. Idempotent; keeps weights, buffers, train/eval mode, device and
    dtype. Returns `model`; what was swapped and what was left (with the reason) is in
    model.fused_resnet_report = {"fused": [names], "left": {name: reason}, "hooked": {name:
    reason}}, "hooked" naming the fused blocks that compute through their original modules
    while hooks on their inner modules are registered (fused_resnet.modules.unfused).

    cpu_channels_last: on the CPU, a fused stem given an NCHW input computes in channels_last,
    so everything after it does too (the same values; the tensors between the model's modules,
    what hooks and a backbone's features see, are channels_last then; parameters untouched).
    False keeps the input's layout throughout. Calling fuse_ again sets it anew."""
    report = {"fused": [], "left": {}, "hooked": {}}
    for fqn, module in list(model.named_modules()):
        _fuse_stem(module, fqn, filter_fn, report)
    for module in model.modules():  # new stems and those fused before alike
        if isinstance(module, FusedStem):
            module.set_cpu_channels_last(cpu_channels_last)
    _fuse_children(model, "", _fused_for(), filter_fn, report)
    for module in model.modules():
        if stage_of(module):  # its blocks may hand each other their outputs
            make_stage_(module)
    setattr(model, REPORT_ATTRIBUTE, report)
    log.info("fused_resnet.fuse_: fused %d blocks, left %d: %s", len(report["fused"]),
             len(report["left"]), report["left"])
    return model


def _stem_activation(resnet: nn.Module) -> Optional[str]:
    """The name of the stem's ReLU if `resnet` is a torchvision or timm ResNet whose forward
    runs conv1 -> bn1 -> that activation, else None."""
    if isinstance(resnet, tv.ResNet):
        return "relu" if type(resnet).forward is tv.ResNet.forward else ""
    if _is_layer_getter_stem(resnet):
        return "relu"
    timm = timm_resnet() if "timm" in sys.modules else None
    if timm is not None and isinstance(resnet, timm.ResNet):
        same = type(resnet).forward_features is timm.ResNet.forward_features
        return "act1" if same else ""
    return None


def _is_layer_getter_stem(module: nn.Module) -> bool:
    """Whether `module` is the body of a torchvision detection / segmentation backbone (an
    IntermediateLayerGetter over a ResNet) that runs conv1 -> bn1 -> relu first and returns
    none of them as a feature."""
    if type(module) is not IntermediateLayerGetter:
        return False
    names = list(module.keys())[:3]
    return names == ["conv1", "bn1", "relu"] and not set(names) & set(module.return_layers)


def _fuse_stem(resnet: nn.Module, prefix: str, filter_fn, report) -> None:
    """conv1 -> bn1 -> relu/act1 of a ResNet, reported under the conv's name. timm's deep stems
    (conv1 = Sequential(conv, bn, relu, conv, bn, relu, conv)) fuse each triple inside and
    their last conv with bn1."""
    act = _stem_activation(resnet)
    if act is None:
        return
    fqn = f"{prefix}.conv1" if prefix else "conv1"
    if not act:
        report["left"][fqn] = f"{type(resnet).__name__} overrides forward"
        return
    if type(resnet.conv1) is nn.Sequential:
        _fuse_sequential_stem(resnet.conv1, fqn, filter_fn, report)
        owner, name = resnet.conv1, str(len(resnet.conv1) - 1)
        fqn = f"{fqn}.{name}"
    else:
        owner, name = resnet, "conv1"
    _fuse_triple(owner, name, resnet, "bn1", getattr(resnet, act), fqn, filter_fn, report)


def _fuse_sequential_stem(stem: nn.Sequential, prefix: str, filter_fn, report) -> None:
    for i in range(len(stem) - 2):
        _fuse_triple(stem, str(i), stem, str(i + 1), stem[i + 2], f"{prefix}.{i}", filter_fn,
                     report, quiet=True)


def _fuse_triple(conv_owner, conv_name, bn_owner, bn_name, act, fqn, filter_fn, report,
                 quiet=False) -> None:
    """Fuse conv_owner.<conv_name> -> bn_owner.<bn_name> -> act if they are exactly
    Conv2d -> BatchNorm2d -> ReLU (quiet: say nothing when they are not a triple at all)."""
    conv, bn = getattr(conv_owner, conv_name), getattr(bn_owner, bn_name)
    if isinstance(conv, FusedStem):
        if conv.bn_in_place():
            report["fused"].append(fqn)
            return
        conv = conv.original()  # its BN was replaced since (convert_sync_batchnorm): fuse anew
    exact = type(conv) is nn.Conv2d and norms.why_not_fusable(bn) is None \
        and type(act) is nn.ReLU
    if not exact:
        if not quiet:
            report["left"][fqn] = "stem is not conv -> BatchNorm2d (or FrozenBatchNorm2d) -> ReLU"
        return
    if filter_fn is not None and not filter_fn(conv, fqn):
        report["left"][fqn] = "excluded by filter_fn"
        return
    stem, stem_bn = FusedStem.fuse(conv, bn_owner, bn_name)
    setattr(conv_owner, conv_name, stem)
    setattr(bn_owner, bn_name, stem_bn)
    report["fused"].append(fqn)


def _fuse_children(module: nn.Module, prefix: str, table: dict, filter_fn, report) -> None:
    for name, child in module.named_children():
        fqn = f"{prefix}.{name}" if prefix else name
        if isinstance(child, _FUSED_TYPES):
            report["fused"].append(fqn)  # already fused: idempotent
            continue
        fused_type = table.get(type(child))
        if fused_type is None:
            _fuse_children(child, fqn, table, filter_fn, report)
            continue
        if filter_fn is not None and not filter_fn(child, fqn):
            report["left"][fqn] = "excluded by filter_fn"
            continue
        reason = fused_type.why_not(child)
        if reason:
            report["left"][fqn] = reason
            continue
        setattr(module, name, fused_type.from_block(child))
        report["fused"].append(fqn)
        if unfused.hooked_inner(child):
            report["hooked"][fqn] = unfused.reason(child)


def unfuse_(model: nn.Module) -> nn.Module:
    """Put the original blocks and stem modules back (same parameters and buffers). In place."""
    unmake_stage_(model)
    for name, child in model.named_children():
        if isinstance(child, _FUSED_TYPES):
            setattr(model, name, child.to_block())
        elif isinstance(child, (FusedStem,) + STEM_NORM_TYPES):
            setattr(model, name, child.original())
        else:
            unfuse_(child)
    if hasattr(model, REPORT_ATTRIBUTE):
        delattr(model, REPORT_ATTRIBUTE)
    return model
