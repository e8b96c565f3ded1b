"""The paper's constant step size for Adam, and a one-call suggestion for a model.

Theorems 1 and 2 of the paper give Adam's constant step size

    alpha = sqrt( 2 (L(w0) - L*) / (K delta^2 T) ),

with L(w0) the training loss at the initial weights, L* the minimum loss, K the Lipschitz
smoothness of the loss (Hessian spectral norm bound), delta^2 = gamma^2 / rho^2 and T the
number of optimizer steps. The practical rule sets L* = 0 and delta^2 = 1:
alpha = sqrt(2 L(w0) / (K_hat T)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from exactlr.check import CheckReport, check_step_size
from exactlr.curvature import LossFn, SpectralOptions, full_loss, materialize_batches
from exactlr.curvature.distributed import (
    PARALLEL_MODES,
    all_or_none,
    passed_on,
    resolve_group,
)
from exactlr.curvature.objective import BatchSize, ModelLoss, Objective
from exactlr.sampling import default_make_model
from exactlr.smoothness import SmoothnessEstimate, estimate_smoothness, smoothness_options

__all__ = ["LRSuggestion", "default_make_model", "exact_step_size", "suggest_lr"]


def _finite_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a real number, got {name}={value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {name}={value}")
    return value


def exact_step_size(
    initial_loss: float,
    smoothness: float,
    total_steps: int,
    *,
    min_loss: float = 0.0,
    delta_sq: float = 1.0,
) -> float:
    """Adam's constant step size ``sqrt(2 (L(w0) - L*) / (K delta^2 T))``.

    Args:
        initial_loss: ``L(w0)``, the training loss at the initial weights.
        smoothness: ``K``, the Lipschitz constant of the gradient (e.g. ``K_hat``).
        total_steps: ``T``, optimizer steps (epochs x batches per epoch).
        min_loss: ``L*``, a lower bound of the loss (0 for cross-entropy).
        delta_sq: ``delta^2 = gamma^2 / rho^2``; the practical rule uses 1.

    Returns:
        The learning rate ``alpha``.

    Raises:
        ValueError: If a value is not finite, ``smoothness <= 0``, ``total_steps`` is not a
            positive integer, ``delta_sq <= 0``, ``initial_loss <= min_loss``, or the
            result is not a finite positive float (values out of floating-point range).

    Example:
        >>> round(exact_step_size(2.3, 10.0, 100), 6)  # sqrt(2 * 2.3 / (10 * 100))
        0.067823
    """
    initial_loss = _finite_number("initial_loss", initial_loss)
    smoothness = _finite_number("smoothness", smoothness)
    min_loss = _finite_number("min_loss", min_loss)
    delta_sq = _finite_number("delta_sq", delta_sq)
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(
            f"total_steps must be a positive integer (epochs x batches per epoch), "
            f"got {total_steps=}"
        )
    if smoothness <= 0:
        raise ValueError(
            f"smoothness must be positive, got {smoothness=}; a zero Hessian norm means the "
            "loss is linear in the weights here and the rule does not apply"
        )
    if delta_sq <= 0:
        raise ValueError(f"delta_sq must be positive, got {delta_sq=}")
    if initial_loss <= min_loss:
        raise ValueError(
            f"initial_loss={initial_loss} must exceed min_loss={min_loss}; the model is "
            "already at (or below) the minimum loss"
        )
    try:
        alpha = math.sqrt(2.0 * (initial_loss - min_loss) / (smoothness * delta_sq * total_steps))
    except OverflowError:  # T too large to be a float
        alpha = 0.0
    if not (math.isfinite(alpha) and alpha > 0):
        steps = total_steps if total_steps < 10**15 else f"~1e{len(str(total_steps)) - 1}"
        raise ValueError(
            f"the step size for initial_loss={initial_loss}, smoothness={smoothness}, "
            f"total_steps={steps} is {alpha}, not a finite positive number; the values "
            "are out of floating-point range"
        )
    return alpha


@dataclass(frozen=True)
class LRSuggestion:
    """A learning rate for Adam and its evidence.

    Attributes:
        lr: ``alpha = sqrt(2 L(w0) / (K_hat T))``.
        k_hat: The smoothness estimate used.
        initial_loss: ``L(w0)`` measured on the model to be trained.
        total_steps: ``T``.
        estimate: Algorithm 2's full result (per-sample values, running max).
        check: The safety check's report when ``check_steps`` was given
            (:func:`exactlr.check.check_step_size`), else None.
    """

    lr: float
    k_hat: float
    initial_loss: float
    total_steps: int
    estimate: SmoothnessEstimate = field(repr=False)
    check: CheckReport | None = field(default=None, repr=False)

    @property
    def warning(self) -> str | None:
        """The safety check's warning (the loss rose or the curvature grew), or None."""
        return None if self.check is None else self.check.warning


def _check_arguments(
    total_steps: int, check_steps: int, parallel: str, group: object | None
) -> None:
    """ValueError for a bad ``total_steps``, ``check_steps`` or ``parallel`` of
    :func:`suggest_lr`, or a safety check asked for on a data shard."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(
            f"total_steps must be a positive integer (epochs x batches per epoch), "
            f"got {total_steps=}"
        )
    if isinstance(check_steps, bool) or not isinstance(check_steps, int) or check_steps < 0:
        raise ValueError(
            f"check_steps must be an integer >= 0 (Adam steps of the safety check), "
            f"got {check_steps=}"
        )
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel={parallel!r} is not one of {PARALLEL_MODES}")
    if check_steps and group is not None and parallel == "data":
        raise ValueError(
            f"check_steps={check_steps} takes Adam steps on this process's batches, a shard "
            "here; run the check in one process, or use parallel='samples' (all the data "
            "on every rank)"
        )


def suggest_lr(
    model: nn.Module,
    loss_fn: LossFn | None = None,
    batches: Iterable[Any] | None = None,
    *,
    loss: ModelLoss | None = None,
    batch_size: BatchSize | None = None,
    total_steps: int,
    make_model: Callable[[], nn.Module] | None = None,
    num_samples: int = 10,
    generator: torch.Generator | None = None,
    progress: bool = False,
    variant: str = "full",
    patience: int | None = None,
    rel_tol: float = 0.01,
    sample_batch: int = 1,
    options: SpectralOptions | None = None,
    check_steps: int = 0,
    process_group: dist.ProcessGroup | bool | None = None,
    parallel: str = "data",
    **option_keywords: Any,
) -> LRSuggestion:
    """The paper's learning rate for training ``model`` with Adam for ``total_steps``.

    Measures ``L(w0)`` on ``model`` as it is (unchanged), estimates ``K_hat`` with
    Algorithm 2 over ``num_samples`` fresh initialisations, and returns
    ``sqrt(2 L(w0) / (K_hat T))``.

    Args:
        model: The model that will be trained, at its initial weights.
        loss_fn: Mean-reduced loss of ``(inputs, targets)`` batches, e.g.
            ``torch.nn.functional.cross_entropy``; None with ``loss``.
        batches: The training data: an iterable of batches (a DataLoader, a list).
        loss: ``loss(model, batch) -> mean loss`` for batches of any structure, e.g.
            ``lambda m, b: m(**b).loss`` for a Hugging Face model; instead of ``loss_fn``.
        batch_size: ``batch_size(batch) -> int``; default: the first dimension of the
            batch's first tensor.
        total_steps: T, the number of optimizer steps (epochs x batches per epoch).
        make_model: Returns a fresh model of the architecture; default: fresh draws of
            ``model``'s own initialisation
            (:func:`~exactlr.sampling.default_make_model`; a parameter it cannot re-draw
            is an error asking for ``make_model``).
        num_samples: Weight samples for K_hat.
        generator: Seeds the weight samples and solvers.
        progress: Show a progress bar during estimation.
        variant, patience, rel_tol, sample_batch: As in :func:`estimate_smoothness`.
        options: How each spectral norm is computed
            (:class:`~exactlr.curvature.SpectralOptions`).
        check_steps: If positive, run the safety check: this many Adam steps at the
            suggested LR on a copy of ``model``, then the loss and Hessian norm at the
            end against ``L(w0)``, ``K_hat`` and ``2/lr``
            (:func:`exactlr.check.check_step_size`); the result's ``check`` and
            ``warning`` carry it. Choose 10 or more (``docs/safety_check.md``). Not with
            data-parallel products (its Adam steps would see one shard).
        process_group: Several processes, e.g. every rank of a ``torchrun`` job
            (:mod:`exactlr.curvature.distributed`); None: the default group when
            ``torch.distributed`` is initialised, else one process; False: one process.
            Every rank returns the same suggestion. The model must be the same on
            every rank.
        parallel: ``"data"``: ``batches`` is this rank's shard (e.g. a ``DataLoader``
            with a ``DistributedSampler``), ``L(w0)`` and every product are all-reduced;
            ``"samples"``: ``batches`` is all the data on every rank and the weight
            samples are split over the ranks (see :func:`estimate_smoothness`).
        **option_keywords: Single spectral-norm options by name (``method``, ``tol``,
            ``max_iters``, ``hvp_mode``, ...), as in :func:`estimate_smoothness`.

    Returns:
        An :class:`LRSuggestion`.

    Raises:
        ValueError: Bad ``total_steps``, ``num_samples`` or option, empty batches, a
            non-finite loss, labels outside the class range, a parameter the default
            sampler cannot re-draw, a loss that is not deterministic.

    Example:
        >>> import torch.nn.functional as F
        >>> net = torch.nn.Linear(4, 3)
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> s = suggest_lr(net, F.cross_entropy, [(x, y)], total_steps=100, num_samples=2)
        >>> s.lr > 0
        True
    """
    group = resolve_group(process_group)
    _check_arguments(total_steps, check_steps, parallel, group)
    params = list(model.parameters())
    objective = Objective(loss_fn, loss, batch_size)
    with all_or_none(group):  # a rank's bad batches stop every rank
        data = materialize_batches(
            batches, params[0].device if params else None, pairs=objective.pairs
        )
    opts = smoothness_options(options, **option_keywords)
    sharded = group if parallel == "data" else None
    initial_loss = full_loss(
        model,
        loss_fn,
        data,
        loss=loss,
        batch_size=batch_size,
        check_labels=opts.check_labels,
        process_group=passed_on(sharded),
    )
    estimate = estimate_smoothness(
        make_model or default_make_model(model),
        loss_fn,
        data,
        loss=loss,
        batch_size=batch_size,
        num_samples=num_samples,
        generator=generator,
        progress=progress,
        variant=variant,
        patience=patience,
        rel_tol=rel_tol,
        sample_batch=sample_batch,
        options=opts,
        process_group=passed_on(group),
        parallel=parallel,
    )
    lr = exact_step_size(initial_loss, estimate.k_hat, total_steps)
    check = None
    if check_steps:
        check = check_step_size(
            model,
            loss_fn,
            data,
            loss=loss,
            batch_size=batch_size,
            lr=lr,
            k_hat=estimate.k_hat,
            steps=check_steps,
            initial_loss=initial_loss,
            total_steps=total_steps,
            generator=generator,
        )
    return LRSuggestion(
        lr=lr,
        k_hat=estimate.k_hat,
        initial_loss=initial_loss,
        total_steps=total_steps,
        estimate=estimate,
        check=check,
    )
