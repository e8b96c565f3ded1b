"""The data side of a training loss: batches on a device, their sizes, the model's mode.

A loss over batches is the size-weighted mean of the per-batch mean losses,

    L(w) = sum_b (n_b / N) * loss_b(w),    N = sum_b n_b,

so batches are materialised once (a list on the model's device, validated) and reused
by every product. A batch is an ``(inputs, targets)`` pair or, with a ``loss(model,
batch)`` (:mod:`exactlr.curvature.objective`), anything: tensors inside dicts,
``UserDict``s such as Hugging Face's ``BatchEncoding``, lists and tuples are moved to
the device recursively. :func:`training_loss_mode` makes ``L`` a deterministic function
of the weights alone.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections import UserDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


@contextlib.contextmanager
def training_loss_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in the state in which its training loss is a fixed function of w.

    The model is put in eval mode, which switches off everything random that PyTorch and
    libraries built on it gate on ``module.training``: ``nn.Dropout`` modules, functional
    dropout such as the ``dropout_p`` a Hugging Face attention passes to
    ``scaled_dot_product_attention``, RNN dropout, stochastic depth. Only normalisation
    layers with batch statistics (BatchNorm, InstanceNorm) compute a different
    deterministic function in training, so they alone go back to train mode, with
    ``track_running_stats`` off: batch statistics as in training, and no running-stat
    update. Everything is restored on exit, including on error.
    """
    modes = [(m, m.training) for m in model.modules()]
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    tracking = [(m, m.track_running_stats) for m in norms]
    try:
        model.eval()
        for module in norms:
            # In train mode with track_running_stats False, BatchNorm passes no running
            # buffers to F.batch_norm: batch statistics, and no in-place buffer update.
            module.train()
            module.track_running_stats = False
        yield model
    finally:
        for module, flag in tracking:
            module.track_running_stats = flag
        for module, flag in modes:
            module.training = flag


def tensors_of(batch: Any) -> Iterator[Tensor]:
    """The tensors inside ``batch``, depth-first (mapping values in their order)."""
    if isinstance(batch, Tensor):
        yield batch
    elif isinstance(batch, Mapping | UserDict):
        for value in batch.values():
            yield from tensors_of(value)
    elif isinstance(batch, list | tuple):
        for value in batch:
            yield from tensors_of(value)


def default_batch_size(batch: Any) -> int:
    """The first dimension of the first tensor in ``batch``.

    Raises:
        ValueError: No tensor, or a 0-d one, to take the size from.
    """
    first = next(tensors_of(batch), None)
    if first is None or first.ndim == 0:
        raise ValueError(
            f"cannot tell the size of a batch of type {type(batch).__name__}: it has no "
            "tensor with a batch dimension; pass batch_size=(batch) -> int"
        )
    return int(first.shape[0])


def map_tensors(batch: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``batch`` with every tensor replaced by ``fn(tensor)``; the containers are copies
    of the same types (a ``UserDict`` such as ``BatchEncoding`` keeps its class)."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, UserDict):
        out = copy.copy(batch)
        out.data = {k: map_tensors(v, fn) for k, v in batch.data.items()}
        return out
    if isinstance(batch, Mapping):
        items = {k: map_tensors(v, fn) for k, v in batch.items()}
        return items if type(batch) is dict else _rebuild(batch, items)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(map_tensors(v, fn) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def _rebuild(mapping: Mapping, items: dict) -> Mapping:
    try:
        return type(mapping)(items)
    except TypeError:  # a mapping type without a dict constructor
        return items


def to_device(batch: Any, device: torch.device | None) -> Any:
    """``batch`` with every tensor moved to ``device`` (None: unchanged)."""
    if device is None:
        return batch
    return map_tensors(batch, lambda t: t.to(device, non_blocking=True))


def _check_pair(batch: Any, i: int) -> Batch:
    if not isinstance(batch, Sequence) or len(batch) != 2:
        raise ValueError(
            f"batch {i} must be an (inputs, targets) pair for loss_fn, got "
            f"{type(batch).__name__}; for batches of other structure pass "
            "loss=(model, batch) -> mean loss"
        )
    x, y = batch
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ValueError(
            f"batch {i} must hold an inputs tensor and a targets tensor for loss_fn, got "
            f"({type(x).__name__}, {type(y).__name__}); for several input tensors or other "
            "structures pass loss=(model, batch) -> mean loss"
        )
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(
            f"batch {i} has {len(x)} inputs and {len(y)} targets; batches must be "
            "non-empty with one target per input"
        )
    return x, y


def materialize_batches(
    batches: Iterable[Any], device: torch.device | None = None, *, pairs: bool = True
) -> list[Any]:
    """Turn an iterable of batches into a list on ``device``, validated.

    Args:
        batches: ``(inputs, targets)`` pairs (``pairs=True``) or batches of any structure.
        device: Where every tensor goes (None: where it is).
        pairs: Require ``(inputs, targets)`` tensor pairs of equal length.

    Raises:
        ValueError: If there are no batches, a pair is malformed or empty, or a floating
            tensor of a batch is not finite.
    """
    if batches is None:
        raise ValueError("batches is missing; pass an iterable of batches")
    out: list[Any] = []
    for i, batch in enumerate(batches):
        if pairs:
            batch = _check_pair(batch, i)
        for t in tensors_of(batch[0] if pairs else batch):
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"batch {i} has non-finite (NaN or inf) inputs; clean the data")
        out.append(to_device(batch, device))
    if not out:
        raise ValueError("batches is empty; pass at least one batch")
    return out


def module_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the model's first parameter; ValueError if it has none."""
    for p in model.parameters():
        return p.device, p.dtype
    raise ValueError("the model has no parameters")


def subsample_batches(
    batches: Sequence[Any],
    fraction: float,
    *,
    generator: torch.Generator | None = None,
    sizes: Sequence[int] | None = None,
) -> list[Any]:
    """A random ``fraction`` of every batch (at least two samples of each).

    Taking the same share of each batch keeps the size weights of the loss, so the
    subsample loss estimates the full one. Indices are drawn on the CPU from ``generator``.
    Every tensor of a batch whose first dimension is the batch's size (``sizes[b]``,
    default: :func:`default_batch_size`) is indexed; other tensors are kept whole.
    """
    out: list[Any] = []
    for b, batch in enumerate(batches):
        n = sizes[b] if sizes is not None else default_batch_size(batch)
        keep = min(n, max(2, math.ceil(fraction * n)))
        index = torch.randperm(n, generator=generator)[:keep].sort().values

        def take(t: Tensor, n: int = n, index: Tensor = index) -> Tensor:
            return t[index.to(t.device)] if t.ndim >= 1 and t.shape[0] == n else t

        out.append(map_tensors(batch, take))
    return out


def head_of(batch: Any, count: int, size: int) -> Any:
    """The first ``count`` samples of ``batch`` (tensors whose first dimension is ``size``)."""
    return map_tensors(batch, lambda t: t[:count] if t.ndim >= 1 and t.shape[0] == size else t)
