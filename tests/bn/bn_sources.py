"""Batch sources and a model for the `package.module:callable` specs in test_bn.py."""

import torch
from torch import nn


def batches():
    """Six batches of four 3x32x32 inputs, with labels (update_bn uses the first element)."""
    generator = torch.Generator().manual_seed(5)
    return [(torch.randn(4, 3, 32, 32, generator=generator), torch.zeros(4)) for _ in range(6)]


def dict_batches():
    generator = torch.Generator().manual_seed(6)
    return [{"pixels": torch.randn(4, 3, 8, 8, generator=generator)} for _ in range(3)]


class KeywordNet(nn.Module):
    """Called as model(pixels=...), as Hugging Face models are."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, pixels):
        return self.bn(self.conv(pixels))


def broken():
    raise RuntimeError("no data today")
