"""A user's own model factory and data loader, as `exactlr lr` imports them.

`factory()` returns a freshly initialised network (PyTorch's default init, drawn from the
global RNG, which the CLI seeds); `loader()` returns one epoch of `(inputs, targets)`
batches of a fixed 3-class problem with 8 features.
"""

from __future__ import annotations

import torch
from torch import nn

NUM_FEATURES, NUM_CLASSES = 8, 3


def factory() -> nn.Module:
    """A 8-16-3 tanh network."""
    return nn.Sequential(nn.Linear(NUM_FEATURES, 16), nn.Tanh(), nn.Linear(16, NUM_CLASSES))


def loader() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two batches of 32 samples; the same data at every call."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, NUM_FEATURES, generator=generator)
    targets = (inputs[:, 0] > 0).long() + (inputs[:, 1] > 0.5).long()
    return [(inputs[:32], targets[:32]), (inputs[32:], targets[32:])]


def not_a_model() -> list[int]:
    """A factory that returns the wrong thing."""
    return [1, 2, 3]


NOT_CALLABLE = 3


def mnist_shaped() -> nn.Module:
    """A network for 1x28x28 images (the built-in datasets), 10 classes."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
