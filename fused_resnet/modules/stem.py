"""A stem conv -> bn -> relu (torchvision's conv1/bn1/relu, timm's conv1/bn1/act1 and the
conv/BN/ReLU triples of timm's deep stems) as one fused step, keeping the module names and
state_dict keys: the conv becomes a FusedStem (a Conv2d sharing the original's weight) that
computes relu(bn(conv(x))); the bn becomes a StemBatchNorm (a BatchNorm2d sharing the
original's parameters and buffers) that passes its input through. The ReLU module is left in
place (relu of a ReLU output is the same tensor values and the same gradient)."""

from torch import Tensor, nn

from fused_resnet import functional
from fused_resnet.modules.conv_bn_act import conv_bn_act, uses_batch_statistics


def _share(cls, module: nn.Module) -> nn.Module:
    """An instance of `cls` (a subclass of module's class) with module's state: the same
    parameter, buffer and submodule dicts, so both see every update."""
    twin = cls.__new__(cls)
    twin.__dict__.update(module.__dict__)
    return twin


class StemBatchNorm(nn.BatchNorm2d):
    """bn1 of a fused stem: BatchNorm2d's parameters, buffers and train/eval flag, used by
    FusedStem; its own forward passes x through (the normalisation already happened)."""

    def forward(self, x: Tensor) -> Tensor:
        return x

    def original(self) -> nn.BatchNorm2d:
        """The original BatchNorm2d, with the current train/eval mode."""
        return self._original.train(self.training)


class FusedStem(nn.Conv2d):
    """conv1 of a fused stem: relu(bn1(conv1(x))) through the fused conv ops."""

    @classmethod
    def fuse(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        """(FusedStem, StemBatchNorm) to put in place of (conv, bn)."""
        stem, stem_bn = _share(cls, conv), _share(StemBatchNorm, bn)
        stem.__dict__["_stem_bn"] = stem_bn  # not registered: it lives where bn was
        stem.__dict__["_original"] = conv
        stem_bn.__dict__["_original"] = bn
        stem.__dict__["_fold_cache"] = {}
        return stem, stem_bn

    def forward(self, x: Tensor) -> Tensor:
        return conv_bn_act(self, self._stem_bn, x, relu=self._applies_relu(x),
                           cache=self._fold_cache)

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
