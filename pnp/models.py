"""Small classification networks used in pruning papers, sized for 28x28 and 32x32 inputs.

Each is registered as a builder (``build_model("pnp:resnet56", num_classes=10)``)
and takes ``in_channels``, ``num_classes`` and ``input_size``, so one config can
switch between them. All are plain Conv/BN/Linear stacks (MobileNetV2 with
depthwise convs) that pnp can prune.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pnp.core.builders import register_builder


def _check_positive(**fields: int) -> None:
    for name, value in fields.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")


class LeNet5(nn.Module):
    """Caffe's "20-50-500" LeNet: conv 20 5x5, pool, conv 50 5x5, pool, fc 500, fc classes.

    ReLUs follow both convolutions as well as fc 500, as in most PyTorch
    reimplementations of the pruning benchmarks that use this network.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28):
        super().__init__()
        _check_positive(in_channels=in_channels, num_classes=num_classes, input_size=input_size)
        side = ((input_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"input_size={input_size} is too small for LeNet-5; use at least 16")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(50 * side * side, 500),
            nn.ReLU(inplace=True),
            nn.Linear(500, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """CIFAR-style VGG with BatchNorm: 3x3 conv-BN-ReLU stages, global pooling, small classifier.

    A max-pool is skipped when the feature map is already smaller than 2x2, so
    28x28 inputs (which reach 1x1 after four pools) work as well as 32x32.
    """

    def __init__(self, layout=VGG16_LAYOUT, in_channels: int = 1, num_classes: int = 10, input_size: int = 28):
        super().__init__()
        _check_positive(in_channels=in_channels, num_classes=num_classes, input_size=input_size)
        layers: list[nn.Module] = []
        channels, side = in_channels, input_size
        for item in layout:
            if item == "M":
                if side >= 2:
                    layers.append(nn.MaxPool2d(2))
                    side //= 2
                continue
            layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
            channels = item
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a residual add; a 1x1 conv-BN shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            # option B: a projection, so both sides of the add are layers surgery can cut
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (6n+2 layers): stem 16, stages of 16/32/64 channels, global pool, fc."""

    def __init__(self, depth: int, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        _check_positive(in_channels=in_channels, num_classes=num_classes, width=width)
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth={depth} is not 6n+2 (e.g. 20, 32, 44, 56, 110)")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        in_planes = width
        for i, planes in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


# (expansion, output channels, blocks, stride of the first block) per stage: Sandler et al.'s
# Table 2 with its first two stride-2 layers (the stem and this stage) at stride 1: the usual
# CIFAR form, which halves 32x32 inputs three times (down to 4x4)
MOBILENETV2_LAYOUT = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 2 in the paper
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _round_channels(channels: float, divisor: int = 8) -> int:
    """``channels`` to the nearest multiple of ``divisor``, at least ``divisor`` and never 10% below ``channels``."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


class InvertedResidual(nn.Module):
    """1x1 expansion conv-BN-ReLU6, 3x3 depthwise conv-BN-ReLU6, 1x1 linear projection conv-BN.

    The input is added to the output when both have the same shape; without expansion
    (``expansion == 1``) the 1x1 expansion is left out.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_planes * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(in_planes, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, planes, 1, bias=False),
            nn.BatchNorm2d(planes),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and in_planes == planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 for 28x28 and 32x32 inputs: a stride-1 stem, stages of inverted residual blocks, 1x1 conv, pool, fc.

    Three stages halve the feature map (``MOBILENETV2_LAYOUT``): 32x32 inputs end at 4x4. Channels
    are scaled by ``width`` and rounded to multiples of 8; the last conv keeps 1280
    channels unless ``width`` is above 1, as in the paper.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0, layout=MOBILENETV2_LAYOUT):
        super().__init__()
        _check_positive(in_channels=in_channels, num_classes=num_classes)
        if not width > 0:
            raise ValueError(f"width={width!r} must be a positive number (1.0 is the paper's network)")
        stem = _round_channels(32 * width)
        last = _round_channels(1280 * max(1.0, width))
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem), nn.ReLU6(inplace=True)
        )
        blocks: list[nn.Module] = []
        in_planes = stem
        for expansion, channels, count, stride in layout:
            planes = _round_channels(channels * width)
            for i in range(count):
                blocks.append(InvertedResidual(in_planes, planes, stride if i == 0 else 1, expansion))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(in_planes, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@register_builder("lenet5")
def lenet5(in_channels: int = 1, num_classes: int = 10, input_size: int = 28) -> LeNet5:
    return LeNet5(in_channels, num_classes, input_size)


@register_builder("vgg16_bn")
def vgg16_bn(in_channels: int = 1, num_classes: int = 10, input_size: int = 28) -> VGG:
    return VGG(VGG16_LAYOUT, in_channels, num_classes, input_size)


@register_builder("resnet20")
def resnet20(in_channels: int = 1, num_classes: int = 10, input_size: int = 28) -> CifarResNet:
    """``input_size`` is accepted so all pnp builders share one signature; global pooling adapts to it."""
    _check_positive(input_size=input_size)
    return CifarResNet(20, in_channels, num_classes)


@register_builder("resnet56")
def resnet56(in_channels: int = 1, num_classes: int = 10, input_size: int = 28) -> CifarResNet:
    """``input_size`` is accepted so all pnp builders share one signature; global pooling adapts to it."""
    _check_positive(input_size=input_size)
    return CifarResNet(56, in_channels, num_classes)


@register_builder("mobilenetv2")
def mobilenetv2(in_channels: int = 1, num_classes: int = 10, input_size: int = 28, width: float = 1.0) -> CifarMobileNetV2:
    """``input_size`` is accepted so all pnp builders share one signature; global pooling adapts to it."""
    _check_positive(input_size=input_size)
    return CifarMobileNetV2(in_channels, num_classes, width)
