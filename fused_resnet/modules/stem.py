"""The ResNet stem conv1 -> bn1 -> relu as one fused step, keeping torchvision's module names
and state_dict keys: `conv1` becomes a FusedStem (a Conv2d sharing the original's weight) that
computes relu(bn1(conv1(x))); `bn1` becomes a StemBatchNorm (a BatchNorm2d sharing the
original's parameters and buffers) that passes its input through. ResNet's own relu is left in
place (relu of a ReLU output is the same tensor values and the same gradient)."""

from torch import Tensor, nn

from fused_resnet.modules.conv_bn_act import conv_bn_act


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


class FusedStem(nn.Conv2d):
    """conv1 of a fused stem: relu(bn1(conv1(x))) through the fused conv ops."""

    @classmethod
    def fuse(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        """(FusedStem, StemBatchNorm) to put in place of (conv, bn)."""
        stem, stem_bn = _share(cls, conv), _share(StemBatchNorm, bn)
        stem.__dict__["_stem_bn"] = stem_bn  # not registered: it lives at model.bn1
        stem.__dict__["_originals"] = (conv, bn)
        stem.__dict__["_fold_cache"] = {}
        return stem, stem_bn

    def forward(self, x: Tensor) -> Tensor:
        return conv_bn_act(self, self._stem_bn, x, relu=True, cache=self._fold_cache)

    def originals(self):
        """The original (conv, bn) modules, with the current train/eval mode."""
        conv, bn = self._originals
        return conv.train(self.training), bn.train(self._stem_bn.training)
