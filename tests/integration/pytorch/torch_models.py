"""Small real models for the PyTorch adaptor tests, built and trained in code (seconds, offline).

Importable as `torch_models:<function>` entrypoints: the tests pass this folder as the job folder.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class DigitsCNN(nn.Module):
    """conv-bn-relu, conv-relu, pooling, linear-relu, linear: every fusion the x86 backend does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(128, 64)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(64, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(image)))
        x = self.relu2(self.conv2(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc2(self.relu3(self.fc1(x)))


class MaskedMLP(nn.Module):
    """An MLP whose second Linear reads a tensor holding the float32 minimum (an attention-mask
    style constant): min-max calibration of that input gives an absurd range. fc2's weights on the
    masked features are zero, so the fp32 output stays finite."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)
        mask = torch.zeros(32)
        mask[-4:] = torch.finfo(torch.float32).min
        self.register_buffer("mask", mask)
        with torch.no_grad():
            self.fc2.weight[:, -4:] = 0.0

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.fc1(image.flatten(1)))
        return self.fc2(hidden + self.mask)


def build_cnn() -> DigitsCNN:
    return DigitsCNN().eval()


def build_masked_mlp() -> MaskedMLP:
    return MaskedMLP().eval()


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[:, None]
    return images, data.target.astype(np.int64)


def train(model: nn.Module, images: np.ndarray, labels: np.ndarray, epochs: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            index = order[start:start + 64]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            loss.backward()
            optimizer.step()
    return model.eval()
