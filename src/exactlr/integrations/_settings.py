"""The measurement settings shared by the Lightning and Hugging Face callbacks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from exactlr.stepsize import LRSuggestion, suggest_lr

__all__ = ["ExactLRSettings", "SettingsInit"]


@dataclass(frozen=True)
class ExactLRSettings:
    """How a training callback measures ``lr = sqrt(2 L(w0) / (K_hat T))``.

    Attributes:
        loss: ``loss(model, batch) -> mean loss``; None: the callback's default (the
            Lightning module's ``training_step``, the ``transformers`` model's own loss).
        num_samples: Weight samples for ``K_hat`` (Algorithm 2).
        num_batches: Use only the first ``num_batches`` batches of the train dataloader
            for ``L(w0)`` and ``K_hat`` (None: one whole epoch, the paper's full-data
            loss; fewer batches cost proportionally less).
        make_model: Returns a freshly initialised model (one weight sample); None:
            copies of the model re-initialised by :func:`exactlr.suggest_lr`.
        check_steps: If positive, run the safety check (:mod:`exactlr.check`) and warn
            when it flags the LR.
        generator: Seeds the weight samples and solvers.
        options: Passed to :func:`exactlr.suggest_lr` (``tol``, ``method``, ...).

    Raises:
        ValueError: ``num_batches`` is neither None nor a positive integer.
    """

    loss: Callable[[nn.Module, Any], Tensor] | None = None
    num_samples: int = 10
    num_batches: int | None = None
    make_model: Callable[[], nn.Module] | None = None
    check_steps: int = 0
    generator: torch.Generator | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        num_batches = self.num_batches
        if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
            raise ValueError(f"num_batches must be None or a positive integer, got {num_batches=}")

    def suggest(
        self,
        model: nn.Module,
        batches: list[Any],
        total_steps: int,
        loss: Callable[[nn.Module, Any], Tensor],
    ) -> LRSuggestion:
        """:func:`exactlr.suggest_lr` on ``batches`` with these settings.

        Args:
            model: The model at its initial weights ``w0``.
            batches: The batches, already on the model's device.
            total_steps: ``T``, the run's optimizer steps.
            loss: The loss to use (``self.loss`` or the callback's default).
        """
        return suggest_lr(
            model,
            batches=batches,
            loss=loss,
            total_steps=total_steps,
            make_model=self.make_model,
            num_samples=self.num_samples,
            generator=self.generator,
            check_steps=self.check_steps,
            **self.options,
        )


class SettingsInit:
    """The callbacks' shared keyword constructor: builds ``self.settings``.

    Mixed in before the framework's callback class, so ``ExactLR(...)`` and
    ``ExactLRCallback(...)`` take the same keyword arguments, the fields of
    :class:`ExactLRSettings` (``**options`` become its ``options``).
    """

    def __init__(
        self,
        *,
        loss: Callable[[nn.Module, Any], Tensor] | None = None,
        num_samples: int = 10,
        num_batches: int | None = None,
        make_model: Callable[[], nn.Module] | None = None,
        check_steps: int = 0,
        generator: torch.Generator | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.settings = ExactLRSettings(
            loss=loss,
            num_samples=num_samples,
            num_batches=num_batches,
            make_model=make_model,
            check_steps=check_steps,
            generator=generator,
            options=options,
        )
        self.suggestion: LRSuggestion | None = None
