"""A Lightning ``Callback`` that sets Adam's learning rate by the paper's rule at fit start.

    import lightning as L
    from exactlr.integrations.lightning import ExactLR

    trainer = L.Trainer(max_epochs=10, callbacks=[ExactLR(num_samples=10)])
    trainer.fit(model, datamodule=dm)        # lr = sqrt(2 L(w0) / (K_hat T)) on every optimizer

At ``on_fit_start`` (after ``configure_optimizers``, before the first batch) the callback

1. takes ``T = trainer.estimated_stepping_batches`` (epochs x batches, accumulation and
   ``max_steps`` included; this also loads the train dataloader);
2. measures ``L(w0)`` and ``K_hat`` with :func:`exactlr.suggest_lr` on the module's own
   loss, the ``"loss"`` that ``training_step(batch, batch_idx)`` returns (a tensor or a
   dict), over the train dataloader's batches (one epoch, or the first ``num_batches``);
3. writes the LR into every param group of every optimizer in ``trainer.optimizers``
   (Lightning has already normalised all ``configure_optimizers`` return forms there);
4. logs ``exactlr/lr``, ``exactlr/k_hat``, ``exactlr/initial_loss`` (and the safety check's
   numbers with ``check_steps``) to every logger of the trainer, and keeps the result in
   :attr:`ExactLR.suggestion`.

While the curvature is measured, ``training_step`` is evaluated many times at weights
that are not the run's (weight samples, Lanczos products): its ``self.log`` and
``self.log_dict`` calls are dropped then, and nothing else of the module changes.

LR schedulers configured by ``configure_optimizers`` are left alone: they were built
from the optimizer's LR before the callback ran and compute their LR from their own
``base_lrs``, so they override the suggestion at their first step. The rule is a
constant step; use it without a scheduler (the callback warns when one is configured).
When resuming (``fit(ckpt_path=...)``) the callback does nothing: the checkpoint's
optimizer state, LR included, is restored. Iterating the train dataloader for the
curvature draws one extra permutation from a shuffling sampler. In a distributed run
every process measures on its own shard of the data and all of them take rank 0's LR
(``trainer.strategy.broadcast``). Manual optimisation (``automatic_optimization =
False``) needs ``loss=``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn

from exactlr.integrations._settings import SettingsInit
from exactlr.stepsize import LRSuggestion

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities import move_data_to_device, rank_zero_info, rank_zero_warn
except ImportError:  # the standalone package
    try:
        import pytorch_lightning as pl
        from pytorch_lightning.utilities import (
            move_data_to_device,
            rank_zero_info,
            rank_zero_warn,
        )
    except ImportError as err:
        raise ImportError(
            "exactlr.integrations.lightning needs Lightning: pip install 'exactlr[lightning]'"
        ) from err

__all__ = ["ExactLR", "training_step_loss"]


@contextlib.contextmanager
def _logging_muted(module: nn.Module) -> Iterator[None]:
    """Drops ``module.log``/``log_dict`` calls (instance attributes, removed on exit)."""
    names = [n for n in ("log", "log_dict") if n not in module.__dict__]
    for name in names:
        object.__setattr__(module, name, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        for name in names:
            module.__dict__.pop(name, None)


def training_step_loss(module: nn.Module, batch: Any) -> Tensor:
    """The mean loss of ``batch`` as ``module.training_step(batch, 0)`` returns it.

    ``training_step`` may return a tensor or a dict with a ``"loss"`` entry (Lightning's
    two forms); its logging calls are dropped.

    Raises:
        ValueError: ``training_step`` returned None (a skipped batch) or something else.
    """
    with _logging_muted(module):
        out = module.training_step(batch, 0)
    if isinstance(out, dict):
        out = out.get("loss")
    if not isinstance(out, Tensor):
        raise ValueError(
            f"training_step returned {type(out).__name__}, not a loss tensor or a dict with "
            "'loss'; pass ExactLR(loss=lambda module, batch: ...)"
        )
    return out


class ExactLR(SettingsInit, pl.Callback):
    """Sets every optimizer's LR to ``sqrt(2 L(w0) / (K_hat T))`` when fitting starts.

    The keyword arguments are the fields of
    :class:`~exactlr.integrations._settings.ExactLRSettings` (``**options`` go to
    :func:`exactlr.suggest_lr`); ``loss(module, batch)`` defaults to
    :func:`training_step_loss`, and ``num_batches`` counts batches of the train dataloader.

    Attributes:
        settings: The measurement settings, as given.
        suggestion: The :class:`exactlr.LRSuggestion` of the last fit (None before).
    """

    def _total_steps(self, trainer: pl.Trainer) -> int:
        steps = trainer.estimated_stepping_batches
        if not math.isfinite(steps) or steps < 1:
            raise ValueError(
                f"the run's length is not known (estimated_stepping_batches={steps}); set "
                "Trainer(max_epochs=...) or max_steps"
            )
        return int(steps)

    def _batches(self, trainer: pl.Trainer, device: torch.device) -> list[Any]:
        loader = trainer.train_dataloader  # loaded by estimated_stepping_batches
        if loader is None or isinstance(loader, dict | list | tuple):
            raise ValueError(
                "ExactLR needs one train dataloader; with several (or none), compute the LR "
                "with exactlr.suggest_lr on the data you choose"
            )
        batches = list(islice(iter(loader), self.settings.num_batches))
        return [move_data_to_device(b, device) for b in batches]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measures the LR and writes it into ``trainer.optimizers``."""
        if trainer.ckpt_path is not None:
            rank_zero_info(
                f"ExactLR: resuming from {trainer.ckpt_path}; the LR is the checkpoint's "
                "(the rule is measured at the start of a run, not mid-run)"
            )
            return
        loss = self.settings.loss
        if loss is None:
            if not pl_module.automatic_optimization:
                raise ValueError(
                    "with manual optimization training_step does not return the loss; pass "
                    "ExactLR(loss=lambda module, batch: ...)"
                )
            loss = training_step_loss
        total_steps = self._total_steps(trainer)
        batches = self._batches(trainer, pl_module.device)
        s = self.settings.suggest(pl_module, batches, total_steps, loss)
        # Each process measured its own shard of the data; all must step alike: rank 0's.
        lr = float(trainer.strategy.broadcast(s.lr, src=0))
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        self.suggestion = s
        self._report(trainer, s)

    def _report(self, trainer: pl.Trainer, s: LRSuggestion) -> None:
        metrics = {
            "exactlr/lr": s.lr,
            "exactlr/k_hat": s.k_hat,
            "exactlr/initial_loss": s.initial_loss,
        }
        if s.check is not None:
            metrics["exactlr/check_loss_change"] = s.check.loss_change
            metrics["exactlr/check_end_norm"] = s.check.end_norm
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(
            f"ExactLR: lr = sqrt(2 L(w0) / (K_hat T)) = {s.lr:.6g} (L(w0) {s.initial_loss:.6g}, "
            f"K_hat {s.k_hat:.6g}, T {s.total_steps}) on {len(trainer.optimizers)} optimizer(s)"
        )
        if trainer.lr_scheduler_configs:
            rank_zero_warn(
                "ExactLR set a constant LR, but configure_optimizers also returned LR "
                "scheduler(s), which compute the LR from their own base LR and will override "
                "it; the rule is meant without a scheduler"
            )
        if s.warning is not None:
            rank_zero_warn(f"ExactLR safety check: {s.warning}")
