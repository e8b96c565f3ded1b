"""Algorithm 2 with a subsample screen: full-data solves only for samples that can set K_hat.

K_hat is the largest of N spectral norms, so a sample far below the largest one cannot
change it. Every sample's multi-fidelity start already computes the spectral norm of the
Hessian ``H_S`` of a random share ``S`` of the data (to ``subsample_tol``); the screen
runs those first, for all N samples, and uses them twice:

1. **Order.** The samples are solved on all the data in decreasing order of their
   subsample norm, so the running maximum is high from the first solve and the
   ``stop_below_max`` ceiling stops the rest early.
2. **Screen.** A sample whose subsample norm plus its bound is below
   ``screen * m`` (``m``: the largest full-data norm so far) skips its full-data solve.

Why the subsample norm does not undershoot much: ``H_S`` is an unbiased estimate of the
full-data Hessian ``H`` (each batch subsampled by the same share), and the spectral norm
is convex, so ``E ||H_S||_2 >= ||H||_2`` (Jensen); the sampling noise of a small ``S``
adds to the norm rather than taking from it. A single draw can still fall below, and a
loose Lanczos run can miss the top of ``H_S``; the default ``screen = 0.5`` asks for a
shortfall of half the norm before a sample that could set K_hat is skipped.
``benchmarks/bench_lr_cost.py`` measures, on the paper's configurations, alpha against
the unscreened defaults and, for the screened samples, the ratio of their subsample
norm to their full-data norm and how close to K_hat the full-data norm came.

What a screened record says: ``certified="screened"``, ``value`` the subsample estimate
(not the full-data norm; below ``screen`` times K_hat), ``num_hvps`` 0 and the subsample
products in ``subsample_hvps``. K_hat is a full-data norm. The running maximum in draw
order is exact from the sample that holds K_hat on; before it, a screened record's
estimate stands in for a norm that was not computed.

The screen needs N fixed (no adaptive stop: it looks at all N samples first), one sample
at a time and ``variant="full"``; :func:`can_screen` says when it applies.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from exactlr.curvature import SpectralOptions
from exactlr.curvature.distributed import passed_on
from exactlr.curvature.objective import Objective
from exactlr.curvature.spectral import SpectralNormResult, WarmStart, solve_subsample_norm
from exactlr.progress import progress_bar
from exactlr.running_max import SampleEvaluation

__all__ = ["can_screen", "screened_samples"]

#: ``evaluate(model, seed, ceiling, start)``: one sample's full-data evaluation, from
#: its kept multi-fidelity start if not None.
Evaluate = Callable[[nn.Module, int, float | None, WarmStart | None], SampleEvaluation]

#: The start vectors of the subsample pass are kept (on the CPU) for the full-data
#: solves when all N of them take at most this many bytes; otherwise each full-data
#: solve runs its subsample again (the same draws, so the same start).
KEEP_STARTS_BYTES = 2**30


def can_screen(
    options: SpectralOptions,
    *,
    variant: str,
    patience: int | None,
    group_size: int,
    samples_split: bool,
) -> bool:
    """Whether Algorithm 2 runs with the screen: ``options.screen`` set with
    ``stop_below_max``, Lanczos with a subsample start, ``variant="full"``, N fixed, one
    sample at a time and the samples not split over ranks (``parallel="samples"``)."""
    return (
        options.screen is not None
        and options.stop_below_max
        and options.method == "lanczos"
        and options.subsample is not None
        and variant == "full"
        and patience is None
        and group_size == 1
        and not samples_split
    )


def screened_samples(
    draw: Callable[[int], nn.Module],
    evaluate: Evaluate,
    objective: Objective,
    data: list[Any],
    seeds: list[int],
    *,
    options: SpectralOptions,
    group: dist.ProcessGroup | None,
    progress: bool,
) -> tuple[list[SampleEvaluation], list[float]] | None:
    """Every sample's evaluation and wall time, in draw order, with the screen.

    ``draw(seed)`` returns the sample's model; ``evaluate`` its full-data evaluation
    under a ceiling, from the start the subsample pass kept (see
    :data:`KEEP_STARTS_BYTES`). ``options.check_determinism`` runs on the first
    sample's subsample pass only.

    Returns None when the options take no subsample of these data (too few examples):
    the caller then runs the samples in draw order.
    """
    passed = _subsample_pass(draw, objective, data, seeds, options, group, progress)
    if passed is None:
        return None
    subs, starts, seconds = passed
    assert options.screen is not None
    order = sorted(range(len(seeds)), key=lambda i: (-_upper(subs[i]), i))
    evaluations: list[SampleEvaluation | None] = [None] * len(seeds)
    best = -math.inf
    bar = progress_bar(total=len(seeds), desc="K_hat samples", unit="sample", enabled=progress)
    try:
        for i in order:
            start = time.perf_counter()
            if _upper(subs[i]) < options.screen * best:
                evaluations[i] = _screened(subs[i])
            else:
                ceiling = best if best > -math.inf else None
                full = evaluate(draw(seeds[i]), seeds[i], ceiling, starts[i])
                starts[i] = None
                extra = subs[i].subsample_hvps
                evaluations[i] = dataclasses.replace(
                    full, subsample_hvps=full.subsample_hvps + extra
                )
                best = max(best, full.value)
            seconds[i] += time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(k_hat=f"{best:.4g}")
    finally:
        bar.close()
    return [ev for ev in evaluations if ev is not None], seconds


def _subsample_pass(
    draw: Callable[[int], nn.Module],
    objective: Objective,
    data: list[Any],
    seeds: list[int],
    options: SpectralOptions,
    group: dist.ProcessGroup | None,
    progress: bool,
) -> tuple[list[SpectralNormResult], list[WarmStart | None], list[float]] | None:
    """Each sample's subsample norm, kept start and seconds (None if the data take no
    subsample)."""
    subs: list[SpectralNormResult] = []
    starts: list[WarmStart | None] = []
    seconds: list[float] = []
    keep = False
    bar = progress_bar(total=len(seeds), desc="K_hat screen", unit="sample", enabled=progress)
    try:
        for i, seed in enumerate(seeds):
            start = time.perf_counter()
            model = draw(seed)
            if i == 0:
                keep = len(seeds) * _vector_bytes(model) <= KEEP_STARTS_BYTES
            opts = options if i == 0 else dataclasses.replace(options, check_determinism=False)
            solved = solve_subsample_norm(
                model,
                objective,
                data,
                opts,
                generator=torch.Generator().manual_seed(seed),
                process_group=passed_on(group),
                keep_start=keep,
            )
            if solved is None:
                return None
            subs.append(solved[0])
            starts.append(solved[1])
            seconds.append(time.perf_counter() - start)
            bar.update(1)
    finally:
        bar.close()
    return subs, starts, seconds


def _vector_bytes(model: nn.Module) -> int:
    """Bytes of one vector over ``model``'s trainable parameters."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def _upper(sub: SpectralNormResult) -> float:
    """The subsample norm plus its bound: what the screen compares."""
    return sub.value + sub.error_estimate


def _screened(sub: SpectralNormResult) -> SampleEvaluation:
    """The record of a screened sample: its subsample estimate, no full-data product."""
    return SampleEvaluation(
        sub.value,
        sub.lambda_max,
        sub.lambda_min,
        0,
        sub.converged,
        sub.loss,
        sub.subsample_hvps,
        "screened",
    )
