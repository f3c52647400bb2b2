"""A small model zoo for the classic residual-vs-plain comparison (He et al., 2016, CIFAR-10):
cifar_resnet(depth) for depth = 6n+2 (20, 32, 44, 56, 110), three stages of n two-conv blocks
with 16, 32, 64 channels, and either shortcut

- "A": identity; where the shape changes, subsample by the stride and pad the extra channels
  with zeros (no parameters);
- "B": identity; where the shape changes, a 1x1 conv + BatchNorm projection;

or, with plain=True, the same network without any shortcut. Blocks are torchvision's
BasicBlock (and PlainBlock for plain nets), so fused_resnet.fuse_ fuses them.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

STAGE_WIDTHS = (16, 32, 64)


class ZeroPadShortcut(nn.Module):
    """Option A shortcut: x[:, :, ::stride, ::stride] with the extra output channels zero."""

    def __init__(self, stride: int, in_channels: int, out_channels: int):
        super().__init__()
        self.stride, self.extra = stride, out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


class PlainBlock(nn.Module):
    """BasicBlock without the shortcut: relu(bn2(conv2(relu(bn1(conv1(x))))))."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, shortcut: str = "A", plain: bool = False,
                 num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"cifar_resnet: depth must be 6n+2 (20, 32, 44, 56, 110), got "
                             f"{depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"cifar_resnet: shortcut must be 'A' or 'B', got {shortcut!r}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        in_channels = 16
        for index, width in enumerate(STAGE_WIDTHS):
            layers = []
            for b in range(blocks):
                stride = 2 if index > 0 and b == 0 else 1
                layers.append(_block(in_channels, width, stride, shortcut, plain))
                in_channels = width
            setattr(self, f"layer{index + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _block(in_channels, out_channels, stride, shortcut, plain) -> nn.Module:
    if plain:
        return PlainBlock(in_channels, out_channels, stride)
    downsample = None
    if stride != 1 or in_channels != out_channels:
        if shortcut == "A":
            downsample = ZeroPadShortcut(stride, in_channels, out_channels)
        else:
            downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels))
    return BasicBlock(in_channels, out_channels, stride, downsample)


def cifar_resnet(depth: int = 20, shortcut: str = "A", plain: bool = False,
                 num_classes: int = 10) -> CifarResNet:
    """ResNet-`depth` for 32x32 inputs (or its plain counterpart with plain=True)."""
    return CifarResNet(depth, shortcut, plain, num_classes)
