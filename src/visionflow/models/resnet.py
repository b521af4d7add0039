"""ResNet-18 (He et al. 2016) for small images: the CIFAR-style stem (3x3 conv, stride 1, no max-pool)
keeps 32x32 inputs at full resolution; above 64 pixels the ImageNet stem (7x7 stride 2 + max-pool) takes
over so larger images cost what they do in the original network."""

from __future__ import annotations

import torch
from torch import nn

from visionflow.models.layers import Classifier
from visionflow.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(Classifier):
    def __init__(self, blocks: list[int], num_classes: int, in_channels: int, image_size: int, width: int = 64):
        super().__init__()
        if image_size <= 64:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        layers, planes, in_planes = [], width, width
        for stage, count in enumerate(blocks):
            for i in range(count):
                layers.append(BasicBlock(in_planes, planes, 2 if (i == 0 and stage > 0) else 1))
                in_planes = planes
            planes *= 2
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_planes
        self.head = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last BN of each block so every residual branch starts as identity (Goyal et al. 2017).
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.layers(self.stem(x))), 1)



@register_model("resnet18")
def resnet18(num_classes: int, in_channels: int, image_size: int, width: int = 64) -> nn.Module:
    """ResNet-18 with a CIFAR-style stem for small images (ImageNet stem above 64 px)."""
    return ResNet([2, 2, 2, 2], num_classes, in_channels, image_size, width)
