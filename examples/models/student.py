"""A tiny MobileNet-style student for coevo (issue #16): depthwise-separable convolutions with
BatchNorm, global average pooling and one linear layer. About 7k parameters at width 16 for
28x28 grey images and 10 classes.

Export (the committed fixture examples/models/student.pt):

    .venv-export/bin/python scripts/export-model.py examples/models/student.py:TinyMobileNet \
        --kwargs '{"in_channels": 1, "num_classes": 10}' --input-shape 1,28,28 --classes 10 \
        --out examples/models/student.pt
"""

import torch
from torch import nn


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    """MobileNet v1's block: a depthwise 3x3 (one filter per channel), then a pointwise 1x1."""
    return nn.Sequential(conv_bn(cin, cin, 3, stride, groups=cin), conv_bn(cin, cout, 1))


class TinyMobileNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(in_channels, width, 3),
            separable(width, 2 * width, stride=2),
            separable(2 * width, 4 * width, stride=2),
            separable(4 * width, 4 * width, stride=1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))
