"""The data side of a training loss: batches, the model's training-loss mode, label checks.

A loss over batches is the size-weighted mean of the per-batch mean losses,

    L(w) = sum_b (n_b / N) * loss_fn(model(x_b; w), y_b),    N = sum_b n_b,

so batches are materialised once (a list on the model's device, validated) and reused
by every product. :func:`training_loss_mode` fixes the model's randomness and state so
that ``L`` is a function of the weights alone.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


def _batchnorm_modules(model: nn.Module) -> Iterator[nn.modules.batchnorm._BatchNorm]:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            yield module


@contextlib.contextmanager
def training_loss_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in the state in which its training loss is a fixed function of w.

    Train mode (BatchNorm normalises with batch statistics) without updating BatchNorm's
    running statistics, and Dropout off. Everything is restored on exit, including on error.
    """
    modes = [(m, m.training) for m in model.modules()]
    tracking = [(m, m.track_running_stats) for m in _batchnorm_modules(model)]
    try:
        model.train()
        for module in model.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                module.eval()
        for module, _ in tracking:
            # In train mode with track_running_stats False, BatchNorm passes no running
            # buffers to F.batch_norm: batch statistics, and no in-place buffer update.
            module.track_running_stats = False
        yield model
    finally:
        for module, flag in tracking:
            module.track_running_stats = flag
        for module, flag in modes:
            module.training = flag


def materialize_batches(
    batches: Iterable[Batch], device: torch.device | None = None
) -> list[Batch]:
    """Turn an iterable of ``(inputs, targets)`` into a list on ``device``.

    Raises:
        ValueError: If there are no batches, a batch is empty or not a pair, or the
            inputs are not finite.
    """
    out: list[Batch] = []
    for i, batch in enumerate(batches):
        if not isinstance(batch, Sequence) or len(batch) != 2:
            raise ValueError(f"batch {i} must be an (inputs, targets) pair, got {type(batch)}")
        x, y = batch
        if len(x) == 0 or len(x) != len(y):
            raise ValueError(
                f"batch {i} has {len(x)} inputs and {len(y)} targets; batches must be "
                "non-empty with one target per input"
            )
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise ValueError(f"batch {i} has non-finite (NaN or inf) inputs; clean the data")
        if device is not None:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out.append((x, y))
    if not out:
        raise ValueError("batches is empty; pass at least one (inputs, targets) batch")
    return out


def check_targets(outputs: Tensor, targets: Tensor, batch_index: int) -> None:
    """Class-index targets must lie in ``[0, num_classes)`` (cross-entropy style)."""
    integer = targets.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
    if integer and outputs.ndim >= 2 and targets.ndim == outputs.ndim - 1 and targets.numel():
        num_classes = outputs.shape[1]
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise ValueError(
                f"label {bad} in batch {batch_index} is outside the class range "
                f"[0, {num_classes - 1}] of the model's {num_classes} outputs; "
                "fix the labels or the model's number of outputs"
            )


def module_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the model's first parameter; ValueError if it has none."""
    for p in model.parameters():
        return p.device, p.dtype
    raise ValueError("the model has no parameters")


def subsample_batches(
    batches: Sequence[Batch], fraction: float, *, generator: torch.Generator | None = None
) -> list[Batch]:
    """A random ``fraction`` of every batch (at least two samples of each).

    Taking the same share of each batch keeps the size weights of the loss, so the
    subsample loss estimates the full one. Indices are drawn on the CPU from ``generator``.
    """
    out: list[Batch] = []
    for x, y in batches:
        n = len(x)
        keep = min(n, max(2, math.ceil(fraction * n)))
        index = torch.randperm(n, generator=generator)[:keep].sort().values.to(x.device)
        out.append((x[index], y[index]))
    return out
