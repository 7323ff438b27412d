"""Face-recognition backbones: IResNet (insightface arcface_torch layout) and a small CPU net.

IResNet follows the published arcface_torch architecture (3x3 stem without pooling,
pre-activation "improved" residual blocks with BN-conv-BN-PReLU-conv-BN, a BN -> flatten
-> FC -> BN1d embedding head whose BN scale is frozen at 1), so that 112x112 inputs give a
7x7 final map. Parameter names match arcface_torch's, so its ``backbone.pth`` files load
into these modules with ``load_state_dict``.
"""

from __future__ import annotations

import torch
from torch import nn

from digi2real.evaluate.choices import BACKBONES

INPUT_SIZE = 112


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Improved residual block; the stride sits on the second conv as in arcface_torch."""

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """IResNet for 112x112 faces: four stages of stride 2 end on a 7x7 map."""

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        embedding_size: int = 512,
        dropout: float = 0.0,
        widths: tuple[int, int, int, int] = (64, 128, 256, 512),
    ) -> None:
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes, eps=1e-05)
        self.prelu = nn.PReLU(self.inplanes)
        self.layer1 = self._make_layer(widths[0], layers[0])
        self.layer2 = self._make_layer(widths[1], layers[1])
        self.layer3 = self._make_layer(widths[2], layers[2])
        self.layer4 = self._make_layer(widths[3], layers[3])
        self.bn2 = nn.BatchNorm2d(widths[3], eps=1e-05)
        self.dropout = nn.Dropout(p=dropout)
        final_map = INPUT_SIZE // 16
        self.fc = nn.Linear(widths[3] * final_map * final_map, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-05)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)
        # arcface_torch freezes the embedding BN's scale: the margin loss normalises the
        # embedding anyway, and a learnable scale only drifts.
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=2, bias=False),
            nn.BatchNorm2d(planes, eps=1e-05),
        )
        layers: list[nn.Module] = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        self.inplanes = planes
        layers.extend(IBasicBlock(planes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)
        return self.features(self.fc(self.dropout(x)))


def iresnet18(embedding_size: int = 512, dropout: float = 0.0) -> IResNet:
    return IResNet((2, 2, 2, 2), embedding_size, dropout)


def iresnet50(embedding_size: int = 512, dropout: float = 0.0) -> IResNet:
    return IResNet((3, 4, 14, 3), embedding_size, dropout)


def small(embedding_size: int = 512, dropout: float = 0.0) -> IResNet:
    """One thin block per stage: the IResNet code path at CPU smoke-test cost."""
    return IResNet((1, 1, 1, 1), embedding_size, dropout, widths=(8, 16, 16, 32))


def get_backbone(name: str, embedding_size: int = 512, dropout: float = 0.0) -> IResNet:
    """Build backbone ``name`` (one of :data:`BACKBONES`) with random weights."""
    builders = {"iresnet18": iresnet18, "iresnet50": iresnet50, "small": small}
    if name not in builders:
        raise ValueError(f"unknown backbone {name!r}; valid choices: {list(BACKBONES)}")
    if embedding_size < 1:
        raise ValueError(f"embedding_size must be >= 1, got {embedding_size}")
    return builders[name](embedding_size=embedding_size, dropout=dropout)
