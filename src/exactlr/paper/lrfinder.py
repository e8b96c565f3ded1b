"""The LR range test (Smith 2017, as torch-lr-finder runs it): what users pick instead.

Adam runs from w0 for `num_iter` steps while its LR grows exponentially from `start_lr`
to `end_lr`,

    lr_i = start_lr * (end_lr / start_lr) ** (i / (num_iter - 1)),   i = 0 .. num_iter - 1,

(a `torch.optim.lr_scheduler.LambdaLR`), recording the training loss of each step,
smoothed as torch-lr-finder does (`s_0 = l_0`, `s_i = f l_i + (1 - f) s_{i-1}` with
`f = smooth_f`). The test stops early once `s_i > diverge_th * min_j s_j`. The suggestion
is torch-lr-finder's "steepest descent" point: the LR at the most negative finite
difference `numpy.gradient(s)` of the smoothed losses, after dropping `skip_start` points
at the start and `skip_end` at the end.

Differences from torch-lr-finder, on purpose: each loss is recorded with the LR that
produced it (torch-lr-finder records the next step's LR beside it), and batches come
from `exactlr.data.make_batches` with a seeded generator.

Cost: `steps` optimizer steps on batches of `batch_size` samples, i.e.
`steps * batch_size / N` gradient-equivalents (one = a gradient over all N training
samples); training then restarts from w0. The losses stay on the device and are read on
the host once every `READ_EVERY` steps (on a GPU, no stall after every step); the curve
is cut at the first divergent step, as a read after every step would cut it, and the
at most `READ_EVERY - 1` steps computed past it are counted in the cost.

Example:
    >>> lrs = [10 ** (-7 + 8 * i / 99) for i in range(100)]
    >>> losses = [2 - math.tanh(math.log10(lr) + 3) for lr in lrs]  # steepest at 1e-3
    >>> round(math.log10(steepest_lr(lrs, losses)), 1)
    -3.0
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exactlr.curvature import LossFn
from exactlr.data import ArrayDataset, make_batches

__all__ = ["RangeTestResult", "lr_range_test", "steepest_lr"]

# Steps between two reads of the losses on the host (one device-to-host copy each).
READ_EVERY = 16


@dataclass(frozen=True)
class RangeTestResult:
    """Outcome of :func:`lr_range_test`.

    Attributes:
        suggestion: The LR at the steepest descent of the smoothed loss.
        lrs: LR of each step taken.
        losses: Smoothed loss after each step's batch (recorded before the step).
        raw_losses: The unsmoothed mini-batch losses.
        steps: Optimizer steps taken (fewer than `num_iter` when it stopped early).
        diverged: Whether the test stopped on `diverge_th`.
        gradient_equivalents: Cost, `steps * batch_size / N` (plus the steps computed
            past a divergence before its loss was read: at most `READ_EVERY - 1`).
        seconds: Wall time.
    """

    suggestion: float
    lrs: list[float] = field(repr=False)
    losses: list[float] = field(repr=False)
    raw_losses: list[float] = field(repr=False)
    steps: int = 0
    diverged: bool = False
    gradient_equivalents: float = 0.0
    seconds: float = 0.0


def steepest_lr(
    lrs: Sequence[float], losses: Sequence[float], *, skip_start: int = 10, skip_end: int = 5
) -> float:
    """torch-lr-finder's suggestion: the LR where the smoothed loss falls fastest.

    `argmin_i numpy.gradient(losses[skip_start : len - skip_end])`, mapped back to `lrs`.
    When fewer than 2 points remain after skipping, no points are skipped. Non-finite
    losses are dropped first.

    Args:
        lrs: LRs, increasing.
        losses: Loss at each LR.
        skip_start: Points dropped at the start (noisy, the loss has not moved yet).
        skip_end: Points dropped at the end (the loss blows up there).

    Returns:
        The suggested LR.

    Raises:
        ValueError: `lrs` and `losses` differ in length, or fewer than 2 finite points.
    """
    if len(lrs) != len(losses):
        raise ValueError(f"lrs has {len(lrs)} points but losses has {len(losses)}")
    if skip_start < 0 or skip_end < 0:
        raise ValueError(f"skip_start={skip_start} and skip_end={skip_end} must be >= 0")
    pairs = [(lr, loss) for lr, loss in zip(lrs, losses, strict=True) if math.isfinite(loss)]
    if len(pairs) < 2:
        raise ValueError(
            f"the range test has {len(pairs)} finite loss(es); it needs at least 2 "
            "(lower start_lr or raise num_iter)"
        )
    kept = pairs[skip_start : len(pairs) - skip_end]
    if len(kept) < 2:
        kept = pairs
    values = np.array([loss for _, loss in kept], dtype=np.float64)
    index = int(np.gradient(values).argmin())
    return float(kept[index][0])


def _exponential_factor(step: int, *, ratio: float, num_iter: int) -> float:
    """LambdaLR multiplier (end_lr / start_lr) ** (step / (num_iter - 1))."""
    return ratio ** (step / max(1, num_iter - 1))


def _check_range(
    start_lr: float, end_lr: float, num_iter: int, smooth_f: float, diverge_th: float
) -> None:
    """Raises `ValueError` naming a bad range-test setting."""
    if not (0 < start_lr < end_lr and math.isfinite(end_lr)):
        raise ValueError(f"need 0 < start_lr < end_lr, got start_lr={start_lr}, end_lr={end_lr}")
    if num_iter < 2:
        raise ValueError(f"num_iter={num_iter} must be at least 2")
    if not 0 < smooth_f <= 1:
        raise ValueError(f"smooth_f={smooth_f} must be in (0, 1]")
    if diverge_th <= 1:
        raise ValueError(f"diverge_th={diverge_th} must be above 1")


class _Curve:
    """The recorded curve: each step's LR, raw and smoothed loss, cut at divergence."""

    def __init__(self, smooth_f: float, diverge_th: float) -> None:
        self.smooth_f, self.diverge_th = smooth_f, diverge_th
        self.lrs: list[float] = []
        self.raw: list[float] = []
        self.smoothed: list[float] = []
        self.best = math.inf

    def read(self, pending: Sequence[tuple[float, Tensor]]) -> bool:
        """Appends the pending steps (one device-to-host copy); True once diverged.

        The curve is cut at the first divergent step, so it is the one a read after
        every step gives.
        """
        f = self.smooth_f
        values = torch.stack([t for _, t in pending]).double().tolist()
        for (lr, _), value in zip(pending, values, strict=True):
            self.lrs.append(lr)
            self.raw.append(value)
            if self.smoothed:
                value = f * value + (1 - f) * self.smoothed[-1]
            self.smoothed.append(value)
            self.best = min(self.best, value)
            if not math.isfinite(value) or value > self.diverge_th * self.best:
                return True
        return False


def lr_range_test(
    model: nn.Module,
    train: ArrayDataset,
    *,
    batch_size: int | None = None,
    loss_fn: LossFn = F.cross_entropy,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_iter: int = 100,
    smooth_f: float = 0.05,
    diverge_th: float = 5.0,
    skip_start: int = 10,
    skip_end: int = 5,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> RangeTestResult:
    """Runs the LR range test on a copy of `model` (the model is not modified).

    Args:
        model: The network at w0.
        train: Training data.
        batch_size: Samples per step (None: the whole set, full batch). Batches are
            reshuffled each pass with a generator seeded by `seed`.
        loss_fn: Mean-reduced loss.
        start_lr: First LR (torch-lr-finder's default range is 1e-7 .. 10).
        end_lr: Last LR.
        num_iter: Steps (torch-lr-finder's default: 100).
        smooth_f: Loss smoothing factor (torch-lr-finder: 0.05).
        diverge_th: Stop once the smoothed loss exceeds this multiple of its minimum.
        skip_start: See :func:`steepest_lr`.
        skip_end: See :func:`steepest_lr`.
        betas: Adam's betas.
        eps: Adam's eps.
        seed: Seeds the batch order.
        device: Device (default: the model's).

    Returns:
        A :class:`RangeTestResult`.

    Raises:
        ValueError: A bad range, `num_iter < 2`, `smooth_f` outside (0, 1], a
            `batch_size` larger than the data, or too few finite losses to suggest.
    """
    _check_range(start_lr, end_lr, num_iter, smooth_f, diverge_th)
    size = len(train) if batch_size is None else batch_size
    if not 1 <= size <= len(train):
        raise ValueError(f"batch_size={batch_size} must be in [1, {len(train)}] (or None)")
    start = time.perf_counter()
    net = copy.deepcopy(model)
    if device is not None:
        net = net.to(device)
    net.train()
    param = next(net.parameters())
    data = train.to(param.device, dtype=param.dtype)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=start_lr, betas=betas, eps=eps)
    ratio = end_lr / start_lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: _exponential_factor(i, ratio=ratio, num_iter=num_iter)
    )
    generator = torch.Generator().manual_seed(seed)
    curve = _Curve(smooth_f, diverge_th)
    batches: list = []
    computed = 0  # steps taken, including those past a divergence not read yet
    pending: list[tuple[float, Tensor]] = []  # (lr, loss on the device) not read yet
    diverged = False
    while computed < num_iter and not diverged:
        if not batches:
            batches = list(make_batches(data, size, shuffle=True, generator=generator))
        x, y = batches.pop(0)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        pending.append((float(optimizer.param_groups[0]["lr"]), loss.detach()))
        optimizer.step()
        scheduler.step()
        computed += 1
        if len(pending) < READ_EVERY and computed < num_iter:
            continue
        diverged = curve.read(pending)
        pending.clear()
    suggestion = steepest_lr(curve.lrs, curve.smoothed, skip_start=skip_start, skip_end=skip_end)
    return RangeTestResult(
        suggestion=suggestion,
        lrs=curve.lrs,
        losses=curve.smoothed,
        raw_losses=curve.raw,
        steps=len(curve.lrs),
        diverged=diverged,
        gradient_equivalents=computed * size / len(train),
        seconds=time.perf_counter() - start,
    )
