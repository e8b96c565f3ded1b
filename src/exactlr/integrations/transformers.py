"""A Hugging Face ``TrainerCallback`` that sets the optimizer's LR by the paper's rule.

    from transformers import Trainer, TrainingArguments
    from exactlr.integrations.transformers import ExactLRCallback

    args = TrainingArguments(output_dir="out", num_train_epochs=3, lr_scheduler_type="constant")
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[ExactLRCallback()])
    trainer.train()                   # lr = sqrt(2 L(w0) / (K_hat T)), T = state.max_steps

At ``on_train_begin`` (the Trainer has built its optimizer and LR scheduler, and knows
``state.max_steps``) the callback measures ``L(w0)`` and ``K_hat`` with
:func:`exactlr.suggest_lr` on the model's own loss, ``model(**batch).loss``, over the
Trainer's train dataloader (one epoch, or the first ``num_batches`` batches), with
``T = state.max_steps`` (optimizer steps: gradient accumulation included).

The Trainer's scheduler was built from ``args.learning_rate`` and recomputes the LR at
every step as ``base_lr x factor(step)``. So the callback writes the suggestion in both
places: every param group's ``lr`` and ``initial_lr``, and the scheduler's ``base_lrs``
(the current factor kept). With ``lr_scheduler_type="constant"`` the run is the rule's
constant step; with another schedule (the default is ``"linear"`` decay) the schedule's
shape is kept with the suggestion as its peak, and the callback warns, since the rule
is a constant step. The default optimizer is AdamW with ``weight_decay=0`` (Adam).

When resuming from a checkpoint (``state.global_step > 0``) the callback does nothing:
the checkpoint's optimizer and scheduler state are kept. In a distributed run every
process measures on its own shard of the data and all of them take rank 0's LR.
Drawing the curvature batches iterates the train dataloader once before the first epoch
(a shuffling sampler draws one extra permutation). The result is kept in
:attr:`ExactLRCallback.suggestion` and written to the ``transformers`` logger.
"""

from __future__ import annotations

from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn

from exactlr.integrations._settings import SettingsInit

try:
    from accelerate.utils import send_to_device
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.utils import logging
except ImportError as err:
    raise ImportError(
        "exactlr.integrations.transformers needs transformers and accelerate: "
        "pip install 'exactlr[hf]'"
    ) from err

__all__ = ["ExactLRCallback", "model_output_loss"]

logger = logging.get_logger(__name__)


def model_output_loss(model: nn.Module, batch: Any) -> Tensor:
    """``model(**batch).loss``: the loss a ``transformers`` model computes from its labels.

    Raises:
        ValueError: The output has no loss (the batch has no ``labels``).
    """
    out = model(**batch)
    loss = out.get("loss") if hasattr(out, "get") else getattr(out, "loss", None)
    if loss is None:
        raise ValueError(
            "model(**batch) returned no loss: the batches need 'labels' (or pass "
            "ExactLRCallback(loss=lambda model, batch: ...))"
        )
    return loss


class ExactLRCallback(SettingsInit, TrainerCallback):
    """Sets the Trainer's LR to ``sqrt(2 L(w0) / (K_hat T))`` before training.

    The keyword arguments are the fields of
    :class:`~exactlr.integrations._settings.ExactLRSettings` (``**options`` go to
    :func:`exactlr.suggest_lr`); ``loss(model, batch)`` defaults to :func:`model_output_loss`.

    Attributes:
        settings: The measurement settings, as given.
        suggestion: The :class:`exactlr.LRSuggestion` of the last run (None before).
    """

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        *,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler: Any = None,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        """Measures the LR and writes it into the optimizer and the scheduler."""
        if model is None or optimizer is None or train_dataloader is None:
            raise ValueError(
                "ExactLRCallback needs the Trainer's model, optimizer and train dataloader "
                "at on_train_begin; pass it in Trainer(callbacks=[...])"
            )
        if state.global_step > 0:
            logger.info(
                f"ExactLR: resuming at step {state.global_step}; the LR is the checkpoint's "
                "(the rule is measured at the start of a run, not mid-run)"
            )
            return
        if state.max_steps is None or state.max_steps < 1:
            raise ValueError(f"the run's length is not known ({state.max_steps=}); set max_steps")
        device = next(model.parameters()).device
        batches = [
            send_to_device(b, device) for b in islice(train_dataloader, self.settings.num_batches)
        ]
        loss = self.settings.loss or model_output_loss
        s = self.settings.suggest(model, batches, int(state.max_steps), loss)
        lr = s.lr
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Each process measured its own shard of the data; all must step alike.
            shared = [lr]
            torch.distributed.broadcast_object_list(shared, src=0)
            lr = float(shared[0])
        _set_lr(optimizer, lr_scheduler, lr)
        self.suggestion = s
        logger.info(
            f"ExactLR: lr = sqrt(2 L(w0) / (K_hat T)) = {s.lr:.6g} (L(w0) {s.initial_loss:.6g}, "
            f"K_hat {s.k_hat:.6g}, T {s.total_steps})"
        )
        schedule = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
        if schedule != "constant":
            logger.warning(
                f"ExactLR: lr_scheduler_type='{schedule}' scales the suggested LR over the "
                "run; the rule is a constant step: lr_scheduler_type='constant'"
            )
        if s.warning is not None:
            logger.warning(f"ExactLR safety check: {s.warning}")


def _set_lr(optimizer: torch.optim.Optimizer, lr_scheduler: Any, lr: float) -> None:
    """``lr`` as every group's base LR, in the optimizer and in its scheduler.

    A scheduler's current factor ``lr / base_lr`` is kept, so the schedule continues
    from the same point with ``lr`` as its base.
    """
    # The Trainer may hand over accelerate's wrappers; the torch objects are inside.
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
    base_lrs = getattr(scheduler, "base_lrs", None)
    groups = optimizer.param_groups
    for i, group in enumerate(groups):
        base = base_lrs[i] if base_lrs is not None else group.get("initial_lr", group["lr"])
        factor = group["lr"] / base if base else 1.0
        group["lr"] = lr * factor
        if "initial_lr" in group:
            group["initial_lr"] = lr
    if base_lrs is not None:
        scheduler.base_lrs = [lr] * len(groups)
