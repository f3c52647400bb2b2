"""Fused residual blocks: torchvision's (and timm's) BasicBlock and Bottleneck with the same
submodules (shared, not copied: same parameters, buffers and state_dict keys), computed through
the fused ops. `from_block` builds one from the original block; `to_block` gives it back;
`why_not(block)` says why a block can't be expressed exactly (None if it can)."""

from typing import Optional

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv

from fused_resnet import functional
from fused_resnet.models import PlainBlock
from fused_resnet.modules import norms, unfused
from fused_resnet.ops import conv as conv_ops
from fused_resnet.modules.conv_bn_act import (Bounds, DropsDerivedCaches, conv_bn_act,
                                              conv_bn_relu_chain, folded_weights,
                                              prepacked_applies)



def timm_resnet():
    """timm.models.resnet, or None when timm is not installed (imported only when asked)."""
    try:
        from timm.models import resnet
    except ImportError:
        return None
    return resnet


def downsample_parts(downsample: Optional[nn.Module]):
    """(pool, conv, bn) when downsample is Sequential([pool,] conv, norm) with norm a BatchNorm2d
    or FrozenBatchNorm2d (fused_resnet.modules.norms) and pool an
    AvgPool2d (timm's avg_down, 'd' variants) or Identity (pool None then); else None."""
    if type(downsample) is not nn.Sequential or len(downsample) not in (2, 3):
        return None
    *pool, conv, bn = downsample
    pool = pool[0] if pool else None
    if type(pool) is nn.Identity:
        pool = None
    if type(conv) is not nn.Conv2d or norms.why_not_fusable(bn) is not None \
            or (pool is not None and type(pool) is not nn.AvgPool2d):
        return None
    return pool, conv, bn


class FusedBlock(DropsDerivedCaches, nn.Module):
    """Shared machinery: keeps the original block (unregistered, so the state_dict has no
    duplicate keys) and registers its submodules under their own names.

    Subclasses name what they reproduce: `convs_bns` (the conv and BN attributes),
    `activations` (ReLUs), `identities` (attributes that must be nn.Identity, e.g. timm's
    drop_block / aa) and `absent` (attributes that must be None, e.g. timm's se / drop_path),
    and compute the block in `_forward(x, donated, updates)`, which collects the
    running-statistics updates of its BNs in `updates`: forward applies them once the whole
    block has run, so an exception anywhere in it leaves every buffer as it was.

    Donated input: a FusedSequential (fused_resnet.modules.stage) that hands this block a
    tensor only it holds says so with `donate(x)` just before calling it; the block may then
    write its residual add into x (the CPU inference fast path). Anything else, including the
    same tensor reached another way, is never overwritten.

    Hooks: the block shares the original block's hook dictionaries, so hooks on it fire as
    before; while its inner modules have hooks (or under FX tracing) it runs the original
    block's forward on its (shared) submodules instead (fused_resnet.modules.unfused)."""

    _DERIVED_CACHES = ("_caches",)
    convs_bns: tuple = ()
    activations: tuple = ()
    identities: tuple = ()
    absent: tuple = ()

    @classmethod
    def block_type(cls) -> type:
        raise NotImplementedError

    @classmethod
    def _names(cls) -> tuple:
        return cls.convs_bns + cls.activations + cls.identities + cls.absent + ("downsample",)

    @classmethod
    def why_not(cls, block: nn.Module) -> Optional[str]:
        """None if the fused block computes exactly what `block` does, else the reason."""
        for name in cls.convs_bns:
            module = getattr(block, name, None)
            if name.startswith("conv") and type(module) is not nn.Conv2d:
                return f"{name} is {type(module).__name__}, not nn.Conv2d"
            if name.startswith("bn") and norms.why_not_fusable(module) is not None:
                return f"{name} {norms.why_not_fusable(module)}"
        for name in cls.activations:
            if type(getattr(block, name, None)) is not nn.ReLU:
                return f"{name} is {type(getattr(block, name, None)).__name__}, not nn.ReLU"
        for name in cls.identities:
            if type(getattr(block, name, None)) is not nn.Identity:
                return f"{name} is {type(getattr(block, name)).__name__} (not expressible)"
        for name in cls.absent:
            if getattr(block, name, None) is not None:
                return f"has {name} ({type(getattr(block, name)).__name__}), not expressible"
        if type(block).forward is not cls.block_type().forward:
            return f"{type(block).__name__} overrides forward"
        return None

    def __init__(self, block: nn.Module):
        super().__init__()
        if not isinstance(block, self.block_type()):
            raise TypeError(f"{type(self).__name__}.from_block expects a "
                            f"{self.block_type().__name__}, got {type(block).__name__}")
        self.__dict__["_original"] = block
        unfused.share_hooks(self, block)
        for name in self._names():
            setattr(self, name, getattr(block, name, None))
        self.stride = block.stride
        self.train(block.training)
        self._caches = {name: {} for name in ("1", "2", "3", "downsample")}

    @classmethod
    def from_block(cls, block: nn.Module) -> "FusedBlock":
        return cls(block)

    def to_block(self) -> nn.Module:
        """The original block, with this module's (shared) submodules and mode."""
        block = self._original
        for name in self._names():
            if hasattr(block, name):
                setattr(block, name, getattr(self, name))
        unfused.copy_backward_hook_kind(self, block)  # the hooks themselves are shared
        return block.train(self.training)

    # The tensor a FusedSequential donated for the next call and the bound on its values it
    # handed over with it (or None); the bound this block computed for its last output (None
    # when it knows none): plain attributes read and assigned (not __dict__.pop), which every
    # supported torch.compile traces
    _donated = None
    _donated_bound = None
    _output_bound = None

    def donate(self, x: Tensor, bound: Optional[float] = None) -> None:
        """Called by a FusedSequential just before it calls this block with x: nobody else
        holds x, so the block may overwrite it; `bound`: an upper bound on |x| if known (the
        previous block's output_bound), which spares the block measuring x (Bounds)."""
        self._donated, self._donated_bound = x, bound

    def withdraw(self) -> None:
        """Called by the FusedSequential once the call returned or raised."""
        self._donated = self._donated_bound = None

    def output_bound(self) -> Optional[float]:
        """An upper bound on |output| of this block's last call, where the CPU inference fast
        path computed one (else None). Valid only for that output, until anything changes it:
        a FusedSequential reads it right after the call, when it may donate the output."""
        return self._output_bound

    def forward(self, x: Tensor) -> Tensor:
        donated = self._donated is x
        bounds = Bounds()
        if donated:
            bounds.take_handed_over(x, self._donated_bound)
        self._donated = self._donated_bound = self._output_bound = None
        why = unfused.reason(self, x)
        if why is not None:  # hooks on inner modules, or FX tracing: fused_resnet.modules.unfused
            unfused.say_once(self, why)
            return self.block_type().forward(self, x)
        out = functional.with_running_stats_updates(self._forward, x, donated, bounds)
        self._output_bound = bounds.known(out)
        return out

    def __prepare_scriptable__(self):
        raise unfused.scripting_error(self)

    def _forward(self, x: Tensor, donated: bool, bounds: Bounds, updates: list) -> Tensor:
        raise NotImplementedError

    def _identity(self, x: Tensor, donated: bool, updates: list,
                  bounds: Bounds) -> tuple[Tensor, bool]:
        """(the shortcut, whether nobody else holds it): x itself (held by the caller unless
        donated), a projection computed here (ours), or what another shortcut module returns
        (not ours to overwrite: it may be x, or kept by a hook). bounds: the block's (see
        fused_resnet.modules.conv_bn_act), shared by all its steps."""
        if self.downsample is None:
            return x, donated
        parts = downsample_parts(self.downsample)
        if parts is None:  # e.g. the zero-padding shortcut: computed by its own module
            return self.downsample(x), False
        pool, conv, bn = parts
        if pool is not None:
            x = pool(x)
        return conv_bn_act(conv, bn, x, relu=False, cache=self._caches["downsample"],
                           updates=updates, bounds=bounds), True

    def _steps(self, count: int) -> list:
        """[(conv_i, bn_i, fold cache_i)] for i = 1..count, for conv_bn_relu_chain."""
        return [(getattr(self, f"conv{i}"), getattr(self, f"bn{i}"), self._caches[str(i)])
                for i in range(1, count + 1)]


class FusedBasicBlock(FusedBlock):
    """torchvision BasicBlock: relu(bn2(conv2(relu(bn1(conv1(x))))) + identity)."""

    convs_bns = ("conv1", "bn1", "conv2", "bn2")
    activations = ("relu",)

    @classmethod
    def block_type(cls):
        return tv.BasicBlock

    def _forward(self, x: Tensor, donated: bool, bounds: Bounds, updates: list) -> Tensor:
        identity, writable = self._identity(x, donated, updates, bounds)
        return conv_bn_relu_chain(self._steps(2), x, residual=identity, updates=updates,
                                  residual_writable=writable, bounds=bounds)


class FusedPlainBlock(FusedBlock):
    """fused_resnet.models.PlainBlock: the BasicBlock without its shortcut."""

    convs_bns = ("conv1", "bn1", "conv2", "bn2")
    activations = ("relu",)

    @classmethod
    def block_type(cls):
        return PlainBlock

    def _forward(self, x: Tensor, donated: bool, bounds: Bounds, updates: list) -> Tensor:
        return conv_bn_relu_chain(self._steps(2), x, updates=updates, bounds=bounds)


class FusedBottleneck(FusedBlock):
    """torchvision Bottleneck (ResNet-50/101/152, wide, ResNeXt): 1x1 -> 3x3 -> 1x1 + identity.
    In eval mode a projection shortcut (1x1 conv + BN) is fused with conv3 into one GEMM."""

    convs_bns = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
    activations = ("relu",)

    @classmethod
    def block_type(cls):
        return tv.Bottleneck

    def _forward(self, x: Tensor, donated: bool, bounds: Bounds, updates: list) -> Tensor:
        if norms.uses_batch_statistics(self.bn3):
            identity, writable = self._identity(x, donated, updates, bounds)
            return conv_bn_relu_chain(self._steps(3), x, residual=identity, updates=updates,
                                      residual_writable=writable, bounds=bounds)
        out = conv_bn_relu_chain(self._steps(2), x, updates=updates, bounds=bounds)
        if self._can_fuse_projection(out, x):
            return self._conv3_with_projection(out, x)
        identity, writable = self._identity(x, donated, updates, bounds)
        return conv_bn_act(self.conv3, self.bn3, out, residual=identity, cache=self._caches["3"],
                           updates=updates, residual_writable=writable, bounds=bounds)

    def _can_fuse_projection(self, out: Tensor, x: Tensor) -> bool:
        """Whether conv3 and the projection shortcut run as one GEMM op. Not on the CPU
        inference fast path: there the projection (prepacked) runs first and conv3 (prepacked)
        adds itself into its output, which beats the one op with unpacked weights."""
        parts = downsample_parts(self.downsample)
        if parts is None or norms.uses_batch_statistics(self.bn3) \
                or norms.uses_batch_statistics(parts[2]):
            return False
        if prepacked_applies(self.conv3, self.bn3, out, x, self._caches["3"]):
            return False
        _, conv_d, bn_d = parts
        conv3 = self.conv3
        return (conv3.kernel_size == (1, 1) and conv3.stride == (1, 1) and conv3.groups == 1
                and conv3.bias is None and conv_d.kernel_size == (1, 1) and conv_d.groups == 1
                and conv_d.bias is None and conv_d.stride[0] == conv_d.stride[1]
                and conv_d.padding == (0, 0)
                and not torch.is_autocast_enabled(out.device.type)
                and not self._needs_grad(out, x, conv_d, bn_d))

    def _needs_grad(self, out, x, conv_d, bn_d) -> bool:
        """The one-GEMM projection op is inference-only (no autograd formula)."""
        if not torch.is_grad_enabled():
            return False
        tensors = [out, x, self.conv3.weight, self.bn3.weight, self.bn3.bias, conv_d.weight,
                   bn_d.weight, bn_d.bias]
        return any(t is not None and t.requires_grad for t in tensors)

    def _conv3_with_projection(self, out: Tensor, x: Tensor) -> Tensor:
        pool, conv_d, bn_d = downsample_parts(self.downsample)
        if pool is not None:  # timm's avg_down: pool, then the 1x1 projection
            x = pool(x)
        w3, b3 = folded_weights(self.conv3, self.bn3, self._caches["3"])
        wd, bd = folded_weights(conv_d, bn_d, self._caches["downsample"])
        return conv_ops.run_conv2d_dual_epilogue(out, w3.to(out.dtype), [1, 1], [0, 0],
                                                 x.to(out.dtype), wd.to(out.dtype),
                                                 conv_d.stride[0], b3 + bd, True)


def _timm_block(name: str) -> type:
    resnet = timm_resnet()
    if resnet is None:
        raise ImportError(f"fused_resnet: timm is not installed, so there is no timm {name}")
    return getattr(resnet, name)


class FusedTimmBasicBlock(FusedBasicBlock):
    """timm's BasicBlock (resnet18/34 and their d/t variants) without attention, drop-block,
    drop-path or anti-aliasing: the same computation as torchvision's, other names."""

    activations = ("act1", "act2")
    identities = ("drop_block", "aa")
    absent = ("se", "drop_path")

    @classmethod
    def block_type(cls):
        return _timm_block("BasicBlock")


class FusedTimmBottleneck(FusedBottleneck):
    """timm's Bottleneck (resnet26/50/101/152 and d/t variants, avg-pool downsample included)
    without attention, drop-block, drop-path or anti-aliasing."""

    activations = ("act1", "act2", "act3")
    identities = ("drop_block", "aa")
    absent = ("se", "drop_path")

    @classmethod
    def block_type(cls):
        return _timm_block("Bottleneck")
