"""A stem conv -> bn -> relu (torchvision's conv1/bn1/relu, timm's conv1/bn1/act1 and the
conv/BN/ReLU triples of timm's deep stems) as one fused step, keeping the module names and
state_dict keys: the conv becomes a FusedStem (a Conv2d sharing the original's weight) that
computes relu(bn(conv(x))); the bn becomes a StemBatchNorm (a BatchNorm2d sharing the
original's parameters and buffers; StemFrozenBatchNorm for a FrozenBatchNorm2d) that passes its
input through. The ReLU module is left in place (relu of a ReLU output is the same tensor
values and the same gradient).

On the CPU a fused stem given an NCHW input computes in channels_last and returns channels_last
(the same values): what follows it (max pool, the fused blocks, the head) then runs in the
layout oneDNN and the fused CPU kernels are fastest in, as after model.to(channels_last),
without touching the model's parameters. fuse_(model, cpu_channels_last=False) keeps NCHW.

While the conv or the BN has hooks (or under FX tracing; see fused_resnet.modules.unfused), the
FusedStem returns the plain conv output and tells its BN, which then normalises as the original
does: the hooks see what they saw before fusing."""

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from fused_resnet import functional, layout
from fused_resnet.modules import unfused
from fused_resnet.modules.conv_bn_act import DropsDerivedCaches, conv_bn_act
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

    # Set by FusedStem before each call: a plain attribute read and assigned (not
    # __dict__.pop), which every supported torch.compile traces
    _normalise_next = False

    def forward(self, x: Tensor) -> Tensor:
        if self._normalise_next:
            self._normalise_next = False
            return super().forward(x)  # the original class's forward
        return x

    def _check_input_dim(self, input):
        # nn.BatchNorm2d.forward's rank check branches on input.dim(), which FX cannot trace
        # (nn.BatchNorm2d itself is an FX leaf and never traced into); FrozenBatchNorm2d has no
        # such check
        if not unfused.fx_tracing(input):
            super()._check_input_dim(input)

    def original(self) -> nn.Module:
        """The original BatchNorm2d / FrozenBatchNorm2d, with the current train/eval mode."""
        return self._original.train(self.training)

    def __prepare_scriptable__(self):
        raise unfused.scripting_error(self)


class StemBatchNorm(_StemNorm, nn.BatchNorm2d):
    """bn1 of a fused stem over an nn.BatchNorm2d."""


class StemFrozenBatchNorm(_StemNorm, FrozenBatchNorm2d):
    """bn1 of a fused stem over a torchvision FrozenBatchNorm2d."""


class StemSyncBatchNorm(_StemNorm, nn.SyncBatchNorm):
    """bn1 of a fused stem over an nn.SyncBatchNorm."""


_STEM_NORMS = {nn.BatchNorm2d: StemBatchNorm, FrozenBatchNorm2d: StemFrozenBatchNorm,
               nn.SyncBatchNorm: StemSyncBatchNorm}
STEM_NORM_TYPES = tuple(_STEM_NORMS.values())


class FusedStem(DropsDerivedCaches, nn.Conv2d):
    """conv1 of a fused stem: relu(bn1(conv1(x))) through the fused conv ops."""

    _cpu_channels_last = True  # set per stem by fuse_ (a stem pickled before it existed: True)

    @classmethod
    def fuse(cls, conv: nn.Conv2d, bn_owner: nn.Module, bn_name: str):
        """(FusedStem, its BN) to put in place of (conv, bn = bn_owner.<bn_name>); bn is an
        nn.BatchNorm2d, nn.SyncBatchNorm or FrozenBatchNorm2d. The stem remembers where its BN
        lives: a module put there later (convert_sync_batchnorm after fuse_) is not bypassed."""
        bn = getattr(bn_owner, bn_name)
        stem, stem_bn = _share(cls, conv), _share(_STEM_NORMS[type(bn)], bn)
        stem.__dict__["_stem_bn"] = stem_bn  # not registered: it lives where bn was
        stem.__dict__["_bn_place"] = (bn_owner, bn_name)
        stem.__dict__["_original"] = conv
        stem_bn.__dict__["_original"] = bn
        stem.__dict__["_fold_cache"] = {}
        return stem, stem_bn

    def set_cpu_channels_last(self, enabled: bool) -> None:
        """Set whether an NCHW input on the CPU is computed on in channels_last (module
        docstring)."""
        self.__dict__["_cpu_channels_last"] = enabled

    def bn_in_place(self) -> bool:
        """Whether the module where the stem's BN was is still that BN (not replaced since)."""
        owner, name = self._bn_place
        return getattr(owner, name, None) is self._stem_bn

    def _adopt_new_bn(self) -> bool:
        """The BN was replaced after fuse_ (convert_sync_batchnorm does that): take the new one
        as the stem's BN, in its place, as fuse_ would. False when it cannot (not a BN this
        fuses, or while compiling or tracing, which must not change the model): the module now
        there then normalises by itself, after the plain conv."""
        owner, name = self._bn_place
        bn = getattr(owner, name, None)
        if type(bn) not in _STEM_NORMS or torch.compiler.is_compiling() or \
                torch.jit.is_tracing():
            return False
        stem_bn = _share(_STEM_NORMS[type(bn)], bn)
        stem_bn.__dict__["_original"] = bn
        setattr(owner, name, stem_bn)
        self.__dict__["_stem_bn"] = stem_bn
        self._fold_cache.clear()
        return True

    def forward(self, x: Tensor) -> Tensor:
        if not self.bn_in_place() and not self._adopt_new_bn():
            return super().forward(x)
        why = self._why_unfused(x)
        self._stem_bn._normalise_next = why is not None
        if why is not None:
            unfused.say_once(self, why)
            return super().forward(x)
        # the input converted (cheap: 3 channels); where that says nothing (one channel: the
        # strides of both layouts agree, and the kernels read it as NCHW), the output
        x = self._in_computing_layout(x)
        out = conv_bn_act(self, self._stem_bn, x, relu=self._applies_relu(x),
                          cache=self._fold_cache)
        return self._in_computing_layout(out)

    def _in_computing_layout(self, x: Tensor) -> Tensor:
        """x in channels_last where the model computes faster so (module docstring): a 4-D
        tensor on the CPU not already in it. Measured on ResNet-50 (docs/cpu.md): an NCHW
        model's fused training step and inference ran 0.94x / 1.14x of eager NCHW in NCHW and
        1.12x / 1.53x this way (fp32, 112 / 224px)."""
        if self._cpu_channels_last and x.device.type == "cpu" and x.dim() == 4 \
                and not layout.is_channels_last(x):
            return x.contiguous(memory_format=torch.channels_last)
        return x

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
