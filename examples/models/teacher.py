"""A small teacher for coevo (issue #16): three conv-BatchNorm-ReLU stages, dropout and a
linear head. About 25x the parameters of examples/models/student.py's TinyMobileNet.

Export (the committed fixture examples/models/teacher.pt):

    .venv-export/bin/python scripts/export-model.py examples/models/teacher.py:SmallTeacher \
        --kwargs '{"in_channels": 1, "num_classes": 10}' --input-shape 1,28,28 --classes 10 \
        --out examples/models/teacher.pt
"""

import torch
from torch import nn


class SmallTeacher(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(
            stage(in_channels, width), stage(width, 2 * width), stage(2 * width, 4 * width)
        )
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(4 * width * 4, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.3),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))
