"""The demo's model and data: a small CNN with BatchNorm on scikit-learn's handwritten digits.

The digits (1,797 8x8 images) ship inside scikit-learn, so nothing is downloaded.
`SmallCNN` is importable as `digits:SmallCNN` for `ckptavg bn-update --model`.
"""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two conv + BatchNorm blocks and a linear head, for 1x8x8 inputs."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(2 * width * 4 * 4, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def load_digits_split(seed: int, test_fraction: float = 0.5):
    """(train inputs, train labels, test inputs, test labels), normalized, split with `seed`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    inputs = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(len(labels) * (1 - test_fraction))
    train, test = order[:cut], order[cut:]
    mean, std = inputs[train].mean(), inputs[train].std()
    inputs = (inputs - mean) / std
    return inputs[train], labels[train], inputs[test], labels[test]


@torch.no_grad()
def evaluate(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Test accuracy and cross-entropy loss, in eval mode (running BatchNorm statistics)."""
    model.eval()
    logits = model(inputs)
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    return accuracy, nn.functional.cross_entropy(logits, labels).item()
