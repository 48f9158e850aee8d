"""ResNet-18/34/50/101 as torchvision builds them, without importing torchvision.

``import torchvision`` imports every model, ``torchvision.ops`` and through it ``torch._dynamo``:
about 1.5-2 s of a 2-core machine's start-up, more than the extraction of a small slide. This
module builds the same networks: the same modules in the same order (so the same state_dict keys,
and under the same seed the same random weights, drawn in the same order), the same forward ops.
``tests/engine/test_models.py`` checks keys, weights and features against torchvision's builders.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ARCH_LAYOUTS", "BasicBlock", "Bottleneck", "ResNet", "resnet"]


def _conv3x3(inp: int, out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inp, out, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(inp: int, out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inp, out, kernel_size=1, stride=stride, bias=False)


class _Block(nn.Module):
    """A residual block: convolution + batch norm pairs ``conv1, bn1, ...`` with ReLUs between
    them, the shortcut (``downsample``, or the input itself) added, then a ReLU.

    ``relu_after``: the pair after which torchvision registers its ``relu`` (so the modules, and
    the state_dict keys, come in torchvision's order).
    """

    expansion = 1

    def __init__(
        self, convs: list[nn.Conv2d], relu_after: int, downsample: nn.Module | None, stride: int
    ) -> None:
        super().__init__()
        self.n = len(convs)
        for i, conv in enumerate(convs, start=1):
            setattr(self, f"conv{i}", conv)
            setattr(self, f"bn{i}", nn.BatchNorm2d(conv.out_channels))
            if i == relu_after:
                self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for i in range(1, self.n + 1):
            out = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(out))
            if i < self.n:
                out = self.relu(out)
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class BasicBlock(_Block):
    """Two 3x3 convolutions: (B, inplanes, H, W) -> (B, planes, H/stride, W/stride)."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        convs = [_conv3x3(inplanes, planes, stride), _conv3x3(planes, planes)]
        super().__init__(convs, 1, downsample, stride)


class Bottleneck(_Block):
    """1x1, 3x3 (stride), 1x1 convolutions: (B, inplanes, H, W) -> (B, 4 planes, H/stride, W/stride)."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        convs = [
            _conv1x1(inplanes, planes),
            _conv3x3(planes, planes, stride),
            _conv1x1(planes, planes * self.expansion),
        ]
        super().__init__(convs, 3, downsample, stride)


class ResNet(nn.Module):
    """torchvision's ``ResNet`` (groups 1, width 64, no dilation): (B,3,H,W) -> (B, num_classes)."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        *,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc: nn.Module = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules() if init_weights else ():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


ARCH_LAYOUTS: dict[str, tuple[type[BasicBlock | Bottleneck], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
}


def resnet(arch: str, *, init_weights: bool = True) -> ResNet:
    """torchvision's ``resnet18/34/50/101(weights=None)`` (randomly initialised, 1000-class fc).

    ``init_weights=False`` skips torchvision's re-initialisation of the convolutions and batch
    norms, for a network built on the meta device whose weights are all loaded next (on meta,
    ``normal_`` goes through a decomposition that imports ``torch._dynamo``: ~1.5 s).
    """
    block, layers = ARCH_LAYOUTS[arch]
    return ResNet(block, layers, init_weights=init_weights)
