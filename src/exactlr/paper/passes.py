"""The primitives of training: a full-data pass, one optimizer step, Adam's Gamma_t.

Shared by :func:`exactlr.paper.training.train_run` and the LR range test. A full-data
pass computes the loss as training computes it (``training_loss_mode``: BatchNorm with
batch statistics, no running-stat updates, Dropout off), size-weighted over the batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exactlr.curvature import training_loss_mode

__all__ = ["adam_scales", "gamma_negative_fraction"]

Batch = tuple[Tensor, Tensor]


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _has_dropout(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules())


def _param_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _grad_sq_norm(params: Sequence[nn.Parameter]) -> Tensor:
    """sum_p ||p.grad||^2 as a 0-d float64 tensor on the parameters' device (no sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=params[0].device)
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads])
    return norms.square().sum()


@dataclass
class _Totals:
    """Device-side accumulators of a pass over data (one `.item()` set per epoch)."""

    loss: Tensor
    correct: Tensor
    count: int

    def mean_loss(self) -> float:
        return float(self.loss.item()) / self.count

    def accuracy(self) -> float:
        return float(self.correct.item()) / self.count


def _forward_totals(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean loss (with graph), summed loss (float64, detached) and number correct."""
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    correct = (logits.detach().argmax(dim=1) == y).sum()
    return loss, loss.detach().double() * len(y), correct


def _full_pass(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    batches: Sequence[Batch],
    *,
    with_grad: bool,
    batch_grad_sq: bool = False,
) -> tuple[_Totals, Tensor | None, Tensor | None]:
    """Size-weighted full loss over `batches` in training-loss mode.

    Returns the totals, ||grad L||^2 (if `with_grad`) and sum_b ||grad l_b||^2 (if
    `batch_grad_sq`). Leaves the full gradient in `p.grad`.
    """
    device = params[0].device
    total = sum(len(y) for _, y in batches)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    batch_sq = torch.zeros((), dtype=torch.float64, device=device) if batch_grad_sq else None
    if with_grad:
        for p in params:
            p.grad = None
    with training_loss_mode(model), torch.set_grad_enabled(with_grad):
        for x, y in batches:
            loss, summed, right = _forward_totals(model, x, y)
            loss_sum += summed
            correct += right
            if not with_grad:
                continue
            weight = len(y) / total
            if batch_sq is None:
                (loss * weight).backward()
            else:
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for p, g in zip(params, grads, strict=True):
                    if g is None:
                        continue
                    batch_sq += torch.linalg.vector_norm(g, dtype=torch.float64).square()
                    if p.grad is None:
                        p.grad = g * weight
                    else:
                        p.grad.add_(g, alpha=weight)
    totals = _Totals(loss_sum, correct, total)
    return totals, (_grad_sq_norm(params) if with_grad else None), batch_sq


def adam_scales(optimizer: torch.optim.Optimizer, lr: float) -> list[Tensor]:
    """Adam's per-coordinate inverse step scale sqrt(v_hat_t) / alpha_t for every parameter.

    v_hat_t = v_t / (1 - beta2^t) is the bias-corrected second moment (`exp_avg_sq`
    after t steps) and alpha_t = `lr`, the LR of step t. Parameters without Adam state
    (no step taken yet) are skipped.

    Args:
        optimizer: An Adam-type optimizer (state `exp_avg_sq` and `step`).
        lr: The LR the last step used.

    Returns:
        One tensor per parameter with state, shaped like the parameter.
    """
    scales = []
    for group in optimizer.param_groups:
        beta2 = float(group["betas"][1])
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state or "exp_avg_sq" not in state:
                continue
            # `step` is a CPU tensor (or a number) unless Adam is capturable: no sync.
            steps = float(state["step"])
            denom = math.sqrt(1.0 - beta2**steps) * lr
            scales.append(state["exp_avg_sq"].sqrt() / denom)
    return scales


def gamma_negative_fraction(previous: Sequence[Tensor] | None, current: Sequence[Tensor]) -> Tensor:
    """Fraction of coordinates where Gamma_t = current - previous is negative.

    Gamma_t = sqrt(v_t) / alpha_t - sqrt(v_{t-1}) / alpha_{t-1} (the paper's eq. 1, with
    `adam_scales` giving each term); Adam's convergence proofs need Gamma_t positive
    semi-definite, i.e. this fraction to be 0.

    Args:
        previous: The scales of step t - 1 (None before the first step: all zeros).
        current: The scales of step t, same shapes.

    Returns:
        A 0-d float64 tensor on the scales' device (no host synchronisation).

    Example:
        >>> prev = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
        >>> cur = [torch.tensor([0.5, 2.5]), torch.tensor([3.0])]
        >>> float(gamma_negative_fraction(prev, cur))  # 1 of 3 coordinates decreased
        0.3333333333333333
    """
    total = sum(t.numel() for t in current)
    if total == 0:
        raise ValueError("gamma_negative_fraction needs at least one coordinate")
    if previous is not None and len(previous) != len(current):
        raise ValueError(f"previous has {len(previous)} tensors but current has {len(current)}")
    count = torch.zeros((), dtype=torch.float64, device=current[0].device)
    for index, cur in enumerate(current):
        below = (cur < 0) if previous is None else (cur < previous[index])
        count += below.sum()
    return count / total


def _optimizer_step(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter]) -> None:
    """`optimizer.step()`; an update too large for the parameters' dtype makes them NaN.

    Adam's step size lr / (1 - beta1^t) can overflow float32 for a huge LR (torch raises
    "value cannot be converted to type float without overflow"): the run has diverged,
    and NaN weights make the epoch's metrics NaN, so it is recorded as such.
    """
    try:
        optimizer.step()
    except RuntimeError as err:
        if "overflow" not in str(err):
            raise
        with torch.no_grad():
            for p in params:
                p.fill_(math.nan)
