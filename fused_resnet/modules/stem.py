"""A stem conv -> bn -> relu (torchvision's conv1/bn1/relu, timm's conv1/bn1/act1 and the
conv/BN/ReLU triples of timm's deep stems) as one fused step, keeping the module names and
state_dict keys: the conv becomes a FusedStem (a Conv2d sharing the original's weight) that
computes relu(bn(conv(x))); the bn becomes a StemBatchNorm (a BatchNorm2d sharing the
original's parameters and buffers; StemFrozenBatchNorm for a FrozenBatchNorm2d) that passes its
input through. The ReLU module is left in place (relu of a ReLU output is the same tensor
values and the same gradient).

While the conv or the BN has hooks (or under FX tracing; see fused_resnet.modules.unfused), the
FusedStem returns the plain conv output and tells its BN, which then normalises as the original
does: the hooks see what they saw before fusing."""

from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from fused_resnet import functional
from fused_resnet.modules import unfused
from fused_resnet.modules.conv_bn_act import conv_bn_act
from fused_resnet.modules.norms import uses_batch_statistics


def _share(cls, module: nn.Module) -> nn.Module:
    """An instance of `cls` (a subclass of module's class) with module's state: the same
    parameter, buffer, submodule and hook dicts, so both see every update."""
    twin = cls.__new__(cls)
    twin.__dict__.update(module.__dict__)
    return twin


class _StemNorm:
    """The BN of a fused stem: its own forward passes x through (FusedStem already normalised),
    unless FusedStem said it returned the raw conv output this time."""

    def forward(self, x: Tensor) -> Tensor:
        if self.__dict__.pop("_normalise_next", False):
            return super().forward(x)  # the original class's forward
        return x

    def original(self) -> nn.Module:
        """The original BatchNorm2d / FrozenBatchNorm2d, with the current train/eval mode."""
        return self._original.train(self.training)

    def __prepare_scriptable__(self):
        raise unfused.scripting_error(self)


class StemBatchNorm(_StemNorm, nn.BatchNorm2d):
    """bn1 of a fused stem over an nn.BatchNorm2d."""

    def _check_input_dim(self, input):
        # nn.BatchNorm2d.forward's rank check branches on input.dim(), which FX cannot trace
        # (nn.BatchNorm2d itself is an FX leaf and never traced into)
        if not unfused.fx_tracing(input):
            super()._check_input_dim(input)


class StemFrozenBatchNorm(_StemNorm, FrozenBatchNorm2d):
    """bn1 of a fused stem over a torchvision FrozenBatchNorm2d."""


_STEM_NORMS = {nn.BatchNorm2d: StemBatchNorm, FrozenBatchNorm2d: StemFrozenBatchNorm}
STEM_NORM_TYPES = tuple(_STEM_NORMS.values())


class FusedStem(nn.Conv2d):
    """conv1 of a fused stem: relu(bn1(conv1(x))) through the fused conv ops."""

    @classmethod
    def fuse(cls, conv: nn.Conv2d, bn: nn.Module):
        """(FusedStem, its BN) to put in place of (conv, bn); bn is an nn.BatchNorm2d or a
        FrozenBatchNorm2d."""
        stem, stem_bn = _share(cls, conv), _share(_STEM_NORMS[type(bn)], bn)
        stem.__dict__["_stem_bn"] = stem_bn  # not registered: it lives where bn was
        stem.__dict__["_original"] = conv
        stem_bn.__dict__["_original"] = bn
        stem.__dict__["_fold_cache"] = {}
        return stem, stem_bn

    def forward(self, x: Tensor) -> Tensor:
        why = self._why_unfused(x)
        self._stem_bn.__dict__["_normalise_next"] = why is not None
        if why is not None:
            unfused.say_once(self, why)
            return super().forward(x)
        return conv_bn_act(self, self._stem_bn, x, relu=self._applies_relu(x),
                           cache=self._fold_cache)

    def _why_unfused(self, x: Tensor):
        why = unfused.reason(self, x)  # FX tracing, global hooks
        if why is None and (unfused.has_call_hooks(self) or
                            unfused.has_call_hooks(self._stem_bn)):
            why = "hooks on the stem's conv or BN"
        return why

    def _applies_relu(self, x: Tensor) -> bool:
        """Whether the ReLU is fused here or left to the ReLU module that follows. Folded (eval),
        the fused conv keeps its output for the ReLU's backward, and that module (inplace=True
        in torchvision and timm) overwrites it: when autograd records the folded conv (e.g.
        fine-tuning with frozen BN statistics), the ReLU is left to the module, which gives the
        same values and the same gradient."""
        bn = self._stem_bn
        if uses_batch_statistics(bn):  # the fused BN keeps a ReLU mask, not its output
            return True
        return not functional.autograd_records(x, self.weight, self.bias, bn.weight, bn.bias)

    def original(self) -> nn.Conv2d:
        """The original Conv2d, with the current train/eval mode."""
        return self._original.train(self.training)

    def __prepare_scriptable__(self):
        raise unfused.scripting_error(self)
