"""coevo's built-in student (models/src/net.rs, `Student`) written in PyTorch: the reference
for issue #16's parity measurement (a TorchScript export of the built-in student must train
like the built-in one). Same layers, same PyTorch-default initialisation U(+-1/sqrt(fan_in)).

    .venv-export/bin/python scripts/export-model.py examples/models/builtin_student.py:BuiltinStudent \
        --kwargs '{"in_channels": 1, "height": 28, "width": 28, "num_classes": 62}' \
        --input-shape 1,28,28 --classes 62 --out examples/models/builtin_student_femnist.pt
"""

import torch
from torch import nn
from torch.nn import functional as F


class BuiltinStudent(nn.Module):
    def __init__(self, in_channels: int = 1, height: int = 28, width: int = 28, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 5, padding=2)
        self.conv2 = nn.Conv2d(16, 32, 5, padding=2)
        flat = 32 * max(height // 4, 1) * max(width // 4, 1)
        self.fc1 = nn.Linear(flat, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)
