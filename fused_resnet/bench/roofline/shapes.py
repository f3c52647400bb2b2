"""The layer-shape model of the roofline table: every nn.Conv2d of a torchvision ResNet with
its input and output shapes (traced on the meta device: shapes only, nothing computed), and
the residual blocks as the fused model runs them (which conv gets the residual, the projection
shortcut, whether inference fuses it with the last conv into one GEMM)."""

import dataclasses
from typing import NamedTuple, Optional

import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv

from fused_resnet.modules.blocks import downsample_parts


class Activation(NamedTuple):
    """An NCHW activation (or its gradient): what the elementwise ops stream through."""
    batch: int
    channels: int
    height: int
    width: int

    @property
    def numel(self) -> int:
        return self.batch * self.channels * self.height * self.width

    def __str__(self) -> str:
        return "x".join(map(str, self))


@dataclasses.dataclass(frozen=True)
class Conv:
    """One nn.Conv2d of the model with its input and output shapes (NCHW)."""
    name: str
    batch: int
    c_in: int
    height: int
    width: int
    c_out: int
    out_height: int
    out_width: int
    kernel: tuple
    stride: tuple
    padding: tuple
    groups: int

    @property
    def input(self) -> Activation:
        return Activation(self.batch, self.c_in, self.height, self.width)

    @property
    def output(self) -> Activation:
        return Activation(self.batch, self.c_out, self.out_height, self.out_width)

    @property
    def weight_numel(self) -> int:
        return self.c_out * (self.c_in // self.groups) * self.kernel[0] * self.kernel[1]

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.out_height * self.out_width * self.weight_numel

    @property
    def sampled_input_numel(self) -> int:
        """Input elements the conv reads: all of them, unless the kernel is smaller than the
        stride (a strided 1x1 conv skips rows and columns; in NHWC a pixel's channels are one
        contiguous run, so skipping pixels skips their bytes)."""
        return self.batch * self.c_in * _sampled(self.height, self.out_height, self.kernel[0],
                                                 self.stride[0]) \
            * _sampled(self.width, self.out_width, self.kernel[1], self.stride[1])

    @property
    def geometry(self) -> tuple:
        """What test_bench_conv.py names a layer by: (C_in, C_out, kernel, stride, padding,
        input H)."""
        return (self.c_in, self.c_out, self.kernel[0], self.stride[0], self.padding[0],
                self.height)

    def describe(self) -> str:
        return f"{self.input} -> {self.output}, " \
               f"{self.kernel[0]}x{self.kernel[1]}/{self.stride[0]}"


def _sampled(size: int, out: int, kernel: int, stride: int) -> int:
    return size if kernel >= stride else min(size, out * kernel)


def trace_convs(model: nn.Module, batch_size: int, image_size: int) -> dict:
    """{module name: Conv} for every nn.Conv2d, from one forward on the meta device (shapes
    only: nothing is computed or allocated)."""
    names = {module: name for name, module in model.named_modules()}
    convs = {}

    def record(module, inputs, output):
        n, c_in, h, w = inputs[0].shape
        _, c_out, oh, ow = output.shape
        convs[names[module]] = Conv(names[module], n, c_in, h, w, c_out, oh, ow,
                                    module.kernel_size, module.stride, module.padding,
                                    module.groups)

    hooks = [m.register_forward_hook(record) for m in model.modules() if type(m) is nn.Conv2d]
    try:
        with torch.no_grad():
            model.eval()(torch.empty(batch_size, 3, image_size, image_size, device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    return convs


def meta_model(name: str) -> nn.Module:
    with torch.device("meta"):
        return getattr(torchvision.models, name)()


class Block(NamedTuple):
    """A residual block as the fused model runs it: its convs in order (the last one gets the
    residual), the projection shortcut's conv (None for an identity shortcut) and whether
    inference fuses that projection with the last conv into one GEMM."""
    name: str
    convs: list
    shortcut: Optional[Conv]
    dual: bool


def residual_blocks(model: nn.Module, convs: dict) -> list:
    blocks = []
    for name, module in model.named_modules():
        if not isinstance(module, (tv.BasicBlock, tv.Bottleneck)):
            continue
        count = 3 if isinstance(module, tv.Bottleneck) else 2
        chain = [convs[f"{name}.conv{i}"] for i in range(1, count + 1)]
        parts = downsample_parts(module.downsample)
        shortcut = None
        if parts is not None:
            conv_name = next(n for n, m in module.downsample.named_children() if m is parts[1])
            shortcut = convs[f"{name}.downsample.{conv_name}"]
        # FusedBottleneck._can_fuse_projection's static conditions (its other ones are about
        # autocast and autograd, i.e. the inference run this mode models)
        dual = isinstance(module, tv.Bottleneck) and shortcut is not None \
            and chain[-1].kernel == (1, 1) and chain[-1].stride == (1, 1) \
            and shortcut.kernel == (1, 1) and shortcut.padding == (0, 0)
        blocks.append(Block(name, chain, shortcut, dual))
    return blocks
