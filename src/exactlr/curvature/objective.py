"""The loss contract: what one batch's loss is, how much a batch weighs, label checks.

Two ways to say what the loss of a batch is:

* ``loss_fn(outputs, targets)`` on ``(inputs, targets)`` pairs: the batch loss is
  ``loss_fn(model(inputs), targets)`` (e.g. ``F.cross_entropy``);
* ``loss(model, batch)`` on batches of any structure (a dict, a ``BatchEncoding``, a
  tuple of several tensors): the batch loss is whatever it returns, e.g.
  ``lambda m, b: m(**b).loss`` for a Hugging Face model.

Either must return the *mean* loss of the batch (a 0-d tensor). The loss over several
batches is ``sum_b (n_b / N) loss_b`` with ``n_b = batch_size(batch)`` (default: the
first dimension of the first tensor in the batch, searched depth-first).

:class:`Objective` holds that choice and evaluates a batch through :class:`LossModule`,
an ``nn.Module`` around the model, so that :func:`torch.func.functional_call` on it
evaluates the user's ``loss`` with any weights.

Label checks: with ``loss_fn`` a cross-entropy (``F.cross_entropy``, ``F.nll_loss``,
``nn.CrossEntropyLoss``, ``nn.NLLLoss`` or a ``functools.partial`` of the functions) on
tensor outputs with integer class targets, every target must be a class of the outputs
(``[0, C)``, ``C`` the size of dim 1 of ``(N, C, d1, ...)`` outputs) or the loss's
``ignore_index`` (-100 by default). Other losses are not checked (their targets need not
be classes); ``check_labels=False`` turns the check off.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exactlr.curvature.batches import LossFn, default_batch_size

#: ``loss(model, batch) -> mean loss``.
ModelLoss = Callable[[nn.Module, Any], Tensor]
#: ``batch_size(batch) -> int``.
BatchSize = Callable[[Any], int]

_CLASS_LOSSES = (F.cross_entropy, F.nll_loss)
_INTEGER = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def cross_entropy_ignore_index(loss_fn: object) -> int | None:
    """``ignore_index`` of ``loss_fn`` if it is a cross-entropy-style loss, else None."""
    if isinstance(loss_fn, nn.CrossEntropyLoss | nn.NLLLoss):
        return int(loss_fn.ignore_index)
    if isinstance(loss_fn, functools.partial) and loss_fn.func in _CLASS_LOSSES:
        return int(loss_fn.keywords.get("ignore_index", -100))
    if loss_fn in _CLASS_LOSSES:
        return -100
    return None


def check_class_targets(
    outputs: object, targets: object, ignore_index: int, batch_index: int
) -> None:
    """Class targets must be classes of the outputs or ``ignore_index``.

    Only tensor outputs with integer targets of the outputs' shape without the class
    dimension (dim 1, or dim 0 of an unbatched ``(C,)``) are checked; anything else
    (probability targets, other structures) is left to the loss.

    Raises:
        ValueError: A target outside ``[0, C)`` that is not ``ignore_index``.
    """
    if not (isinstance(outputs, Tensor) and isinstance(targets, Tensor)):
        return
    if targets.dtype not in _INTEGER or outputs.ndim < 1 or targets.numel() == 0:
        return
    class_dim = 1 if outputs.ndim >= 2 else 0
    if targets.shape != outputs.shape[:class_dim] + outputs.shape[class_dim + 1 :]:
        return
    num_classes = outputs.shape[class_dim]
    counted = targets[targets != ignore_index]
    if counted.numel() == 0:
        return
    low, high = int(counted.min()), int(counted.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(
            f"label {bad} in batch {batch_index} is outside the class range "
            f"[0, {num_classes - 1}] of the model's {num_classes} outputs (and is not "
            f"ignore_index={ignore_index}); fix the labels or the model's number of outputs, "
            "or pass check_labels=False"
        )


@dataclass(frozen=True)
class Objective:
    """One batch's mean loss and weight, from ``loss_fn`` or ``loss`` (see module doc).

    Attributes:
        loss_fn: ``loss_fn(outputs, targets)`` for ``(inputs, targets)`` pairs, or None.
        loss: ``loss(model, batch)`` for batches of any structure, or None.
        batch_size: ``batch_size(batch) -> int``; None: the first dimension of the first
            tensor (of the inputs, for pairs).
        check_labels: Check class targets of a cross-entropy ``loss_fn``.
    """

    loss_fn: LossFn | None = None
    loss: ModelLoss | None = None
    batch_size: BatchSize | None = None
    check_labels: bool = True

    def __post_init__(self) -> None:
        if (self.loss_fn is None) == (self.loss is None):
            raise ValueError(
                "pass exactly one of loss_fn(outputs, targets) for (inputs, targets) batches "
                "and loss=(model, batch) -> mean loss for batches of any structure; got "
                f"{'both' if self.loss is not None else 'neither'}"
            )
        for name in ("loss_fn", "loss", "batch_size"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise ValueError(f"{name} must be callable, got {type(value).__name__}")

    @property
    def pairs(self) -> bool:
        """Whether batches are ``(inputs, targets)`` pairs (the ``loss_fn`` form)."""
        return self.loss is None

    def size(self, batch: Any) -> int:
        """The weight ``n_b`` of ``batch`` in the full-data loss."""
        if self.batch_size is not None:
            return self.batch_size(batch)
        return default_batch_size(batch[0] if self.pairs else batch)

    def evaluate(self, model: nn.Module, batch: Any, check_index: int | None = None) -> Tensor:
        """The batch's mean loss; with ``check_index``, labels are checked first."""
        if self.loss is not None:
            return self.loss(model, batch)
        assert self.loss_fn is not None
        x, y = batch
        outputs = model(x)
        if check_index is not None and self.check_labels:
            ignore_index = cross_entropy_ignore_index(self.loss_fn)
            if ignore_index is not None:
                check_class_targets(outputs, y, ignore_index, check_index)
        return self.loss_fn(outputs, y)


class LossModule(nn.Module):
    """``forward(batch) = objective's loss of model on batch``, as a module.

    :func:`torch.func.functional_call` on it (with the model's parameters under the
    prefix ``model.``) evaluates the loss, including a user's ``loss(model, batch)``, at
    any weights without touching the model's own tensors.
    """

    PREFIX = "model."

    def __init__(self, model: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: Any, check_index: int | None = None) -> Tensor:
        return self.objective.evaluate(self.model, batch, check_index)
