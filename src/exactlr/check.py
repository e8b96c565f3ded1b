"""A safety check of a suggested step size: a few real Adam steps from w0, then curvature.

The rule ``alpha = sqrt(2 L(w0) / (K_hat T))`` trusts that the curvature measured on
weight samples at initialisation bounds the curvature met along the run. It can fail:
with PyTorch's default initialisation and no BatchNorm (the paper's appendix C.5),
``K_hat`` at w0 is small, alpha is large, and the loss ends above ``L(w0)``.

:func:`check_step_size` tests that assumption where it is cheapest to test: it runs
``steps`` Adam steps at ``lr`` on a deep copy of the model from w0 (the batches in
order, cycling, as an epoch loop would feed them), then measures the full-data loss
and the Hessian spectral norm ``||H(w_k)||_2`` at the end. It warns when

* the loss rose, ``L(w_k) > L(w0)``, or
* the curvature grew beyond the estimate, ``||H(w_k)||_2 > K_hat``.

It also reports ``2 / lr``, the classical stability threshold of a step of size ``lr``
along a direction of curvature ``||H||``: a norm above it means the step overshoots
there (for Adam's preconditioned step this is a reference point, not a proof).

Cost: ``steps`` gradients of one batch each, plus one spectral norm (a few full-data
Hessian-vector products, Lanczos to ``tol``); ``benchmarks/safety_check.py`` measures
it beside ``suggest_lr`` on the paper's presets (``docs/safety_check.md``).

What it does not guarantee: a check that passes says only that the first ``steps``
steps neither raised the loss nor met curvature above ``K_hat``. Curvature can still
grow later in the run (the check sees a prefix of it), and a loss that fell over the
prefix can rise afterwards; Adam's first few steps at a large step often raise the loss
briefly, so ``steps`` should be 10 or more (``docs/safety_check.md``). A check that
fails is strong evidence the step is too large for the start of this run. The model
itself is never changed.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from exactlr.curvature import (
    LossFn,
    full_loss,
    hessian_spectral_norm,
    materialize_batches,
    training_loss_mode,
)
from exactlr.curvature.objective import BatchSize, ModelLoss, Objective


@dataclass(frozen=True)
class CheckReport:
    """What ``steps`` Adam steps at ``lr`` from w0 did to the loss and the curvature.

    Attributes:
        steps: Adam steps taken (fewer than asked only if the loss became non-finite).
        lr: The step size checked.
        k_hat: The smoothness estimate the step size was computed from.
        initial_loss: ``L(w0)``, the full-data loss at the start.
        final_loss: ``L(w_k)``, the full-data loss after the steps (inf if it diverged).
        end_norm: ``||H(w_k)||_2 = max(|lambda_max|, |lambda_min|)`` at the end (NaN if
            the weights diverged).
        end_lambda_max: Largest Hessian eigenvalue at the end.
        end_lambda_min: Smallest Hessian eigenvalue at the end.
        step_losses: The batch loss before each step (the training curve of the prefix).
        num_hvps: Hessian-vector products spent on the end norm.
        seconds: Wall time of the whole check.
        total_steps: T of the run, when known (used to quote the rule with ``end_norm``).
    """

    steps: int
    lr: float
    k_hat: float
    initial_loss: float
    final_loss: float
    end_norm: float
    end_lambda_max: float
    end_lambda_min: float
    step_losses: tuple[float, ...]
    num_hvps: int
    seconds: float
    total_steps: int | None = None

    @property
    def loss_change(self) -> float:
        """``L(w_k) - L(w0)``: negative when the steps lowered the loss."""
        return self.final_loss - self.initial_loss

    @property
    def stability_threshold(self) -> float:
        """``2 / lr``: the curvature above which a plain step of size ``lr`` overshoots."""
        return 2.0 / self.lr

    @property
    def diverged(self) -> bool:
        """The loss or the weights became non-finite during the steps."""
        return not math.isfinite(self.final_loss)

    @property
    def loss_rose(self) -> bool:
        """``L(w_k) > L(w0)`` (or the run diverged)."""
        return self.diverged or self.final_loss > self.initial_loss

    @property
    def curvature_grew(self) -> bool:
        """``||H(w_k)||_2 > K_hat``: the estimate at w0 did not bound the prefix."""
        return math.isfinite(self.end_norm) and self.end_norm > self.k_hat

    @property
    def passed(self) -> bool:
        """Neither the loss rose nor the curvature grew beyond ``K_hat``."""
        return not (self.loss_rose or self.curvature_grew)

    @property
    def warning(self) -> str | None:
        """One paragraph saying what went wrong and what to try, or None if it passed."""
        if self.passed:
            return None
        head = f"after {self.steps} Adam steps at lr={self.lr:.4g} from w0"
        if self.diverged:
            return f"{head} the loss became non-finite: the step size is far too large"
        found = []
        if self.loss_rose:
            found.append(f"the loss rose from {self.initial_loss:.4g} to {self.final_loss:.4g}")
        if self.curvature_grew:
            found.append(
                f"the Hessian norm grew to {self.end_norm:.4g} > K_hat={self.k_hat:.4g} "
                f"(2/lr = {self.stability_threshold:.4g})"
            )
        if self.curvature_grew:
            advice = "curvature at w0 under-estimates the curvature along the run; use a smaller lr"
        else:
            advice = "the step is too large for the start of this run; use a smaller lr"
        if self.curvature_grew and self.total_steps is not None:
            rule = math.sqrt(2.0 * self.initial_loss / (self.end_norm * self.total_steps))
            advice += f" (the rule with K = {self.end_norm:.4g} gives {rule:.4g})"
        return f"{head} {' and '.join(found)}: {advice}"

    def summary(self) -> str:
        """The check's numbers on one line."""
        return (
            f"check: {self.steps} Adam steps at lr={self.lr:.4g}: L {self.initial_loss:.4g} -> "
            f"{self.final_loss:.4g} ({self.loss_change:+.3g}); ||H||_2 at the end "
            f"{self.end_norm:.4g} vs K_hat {self.k_hat:.4g} and 2/lr "
            f"{self.stability_threshold:.4g}; {self.num_hvps} HVPs, {self.seconds:.1f} s"
        )


def _adam_prefix(
    trial: nn.Module,
    objective: Objective,
    data: list[Any],
    *,
    lr: float,
    steps: int,
) -> list[float]:
    """Runs up to ``steps`` Adam steps on ``trial`` in place; the batch loss before each.

    Stops early when a batch loss is non-finite (the run diverged).
    """
    params = [p for p in trial.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    losses: list[float] = []
    # Dropout off and BatchNorm on batch statistics: the steps are those of the loss whose
    # curvature K_hat measures, and they are deterministic.
    with training_loss_mode(trial):
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            value = objective.evaluate(trial, data[step % len(data)])
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise ValueError(f"the loss must be a scalar tensor (a mean loss), got {value!r}")
            losses.append(float(value.detach()))
            if not math.isfinite(losses[-1]):
                break
            value.backward()
            optimizer.step()
    return losses


def _check_args(lr: float, k_hat: float, steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer (Adam steps to try), got {steps=}")
    for name, value in (("lr", lr), ("k_hat", k_hat)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number, got {name}={value!r}")


def check_step_size(
    model: nn.Module,
    loss_fn: LossFn | None = None,
    batches: Iterable[Any] | None = None,
    *,
    lr: float,
    k_hat: float,
    steps: int,
    loss: ModelLoss | None = None,
    batch_size: BatchSize | None = None,
    initial_loss: float | None = None,
    total_steps: int | None = None,
    tol: float = 1e-2,
    max_iters: int = 100,
    generator: torch.Generator | None = None,
) -> CheckReport:
    """Runs ``steps`` Adam steps at ``lr`` on a copy of ``model`` and measures the end.

    Args:
        model: The model at its initial weights w0; it is deep-copied, never changed.
        loss_fn: Mean-reduced ``loss_fn(outputs, targets)`` for ``(inputs, targets)``
            batches; or None with ``loss``.
        batches: The training data, as for :func:`exactlr.suggest_lr`. Step ``i`` uses
            batch ``i mod len(batches)``; the end loss and norm are over all of them.
        lr: The step size to check (Adam with torch's default betas and eps).
        k_hat: The smoothness estimate ``lr`` came from.
        steps: Adam steps to run, k; at most ``total_steps`` when that is given (the
            check looks at a prefix of the run, not beyond its end).
        loss: ``loss(model, batch) -> mean loss`` for batches of any structure
            (instead of ``loss_fn``).
        batch_size: ``batch_size(batch) -> int``, the weight of a batch with ``loss``.
        initial_loss: ``L(w0)`` if already measured (e.g. by ``suggest_lr``).
        total_steps: T of the run; lets the warning quote the rule with the end norm.
        tol: Relative accuracy of the end norm: the comparisons with ``K_hat`` and
            ``2 / lr`` need little, and only the norm is certified (``target="norm"``).
        max_iters: Hessian-vector products at most for the end norm.
        generator: Seeds the Lanczos start vector.

    Returns:
        A :class:`CheckReport`; its ``warning`` is None when the check passed.

    Raises:
        ValueError: A bad ``lr``, ``k_hat`` or ``steps``, neither or both of ``loss_fn``
            and ``loss``, empty batches, or a loss that is not a scalar.

    Example:
        >>> import torch.nn.functional as F
        >>> net = torch.nn.Linear(4, 3)
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> r = check_step_size(net, F.cross_entropy, [(x, y)], lr=1e-3, k_hat=1.0, steps=3)
        >>> r.steps, r.final_loss < r.initial_loss
        (3, True)
    """
    _check_args(lr, k_hat, steps)
    objective = Objective(loss_fn, loss, batch_size)
    if total_steps is not None:
        steps = min(steps, total_steps)
    start = time.perf_counter()
    device = next(model.parameters()).device
    data = materialize_batches(batches, device, pairs=objective.pairs)
    extra = {"loss": loss, "batch_size": batch_size}
    if initial_loss is None:
        initial_loss = full_loss(model, loss_fn, data, **extra)
    trial = copy.deepcopy(model)
    losses = _adam_prefix(trial, objective, data, lr=lr, steps=steps)
    finite = all(math.isfinite(v) for v in losses) and all(
        bool(torch.isfinite(p).all()) for p in trial.parameters()
    )
    if finite:
        res = hessian_spectral_norm(
            trial,
            loss_fn,
            data,
            tol=tol,
            max_iters=max_iters,
            generator=generator,
            target="norm",
            **extra,
        )
        final, norm, lam_max, lam_min, hvps = (
            res.loss,
            res.value,
            res.lambda_max,
            res.lambda_min,
            res.num_hvps,
        )
    else:
        final, norm, lam_max, lam_min, hvps = math.inf, math.nan, math.nan, math.nan, 0
    taken = len(losses) if losses and math.isfinite(losses[-1]) else len(losses) - 1
    return CheckReport(
        steps=taken,
        lr=float(lr),
        k_hat=float(k_hat),
        initial_loss=float(initial_loss),
        final_loss=float(final) if math.isfinite(final) else math.inf,
        end_norm=norm,
        end_lambda_max=lam_max,
        end_lambda_min=lam_min,
        step_losses=tuple(losses),
        num_hvps=hvps,
        seconds=time.perf_counter() - start,
        total_steps=total_steps,
    )
