"""Algorithm 2 of the paper: estimate the Lipschitz smoothness K of a loss.

    K_hat = max_{j = 1..N} || Hessian of L at w_j ||_2,      w_j ~ W  i.i.d.,

where W is the model's own initialisation distribution: ``make_model()`` returns a freshly
initialised network of the architecture, one sample ``w_j``. Theorem 4: as N grows, K_hat
converges in distribution to K(L). Every sample is kept (value, both extreme eigenvalues,
products, seconds) together with the running maximum, so that convergence can be plotted.

Two variants of L:

* ``variant="full"`` (default): the Hessian of the full-data loss over all batches.
* ``variant="minibatch"``: the spectral norm on each mini-batch separately, max over
  batches (what the authors' mini-batch code does); an upper-bound-flavoured estimate of
  the smoothness of the stochastic losses.

Several samples can be evaluated together (``sample_batch``): their weights are stacked
and one vmapped Hessian-vector product serves all of them
(:func:`~exactlr.curvature.hessian_spectral_norms`); each sample's value is the one the
sequential loop gives, to the solver tolerance.

With a subsample start and N fixed, the samples go through the subsample screen of
:mod:`exactlr.screening` (``screen``, on by default): every sample's subsample norm
first, then full-data solves from the largest down, skipping the samples far below the
largest; otherwise they are evaluated in draw order.

The records, the running maximum and the adaptive stop (``patience``, ``rel_tol``) are
kept by :mod:`exactlr.running_max`; :class:`SampleRecord` and
:class:`SmoothnessEstimate` are re-exported here.

Global RNG state is never changed: each sample's weights are drawn inside
:func:`torch.random.fork_rng` from a seed taken from ``generator``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from exactlr.curvature import LossFn, SpectralOptions, materialize_batches
from exactlr.curvature.distributed import (
    PARALLEL_MODES,
    all_or_none,
    gather_objects,
    passed_on,
    rank_share,
    resolve_group,
    same_on_all_ranks,
)
from exactlr.curvature.objective import BatchSize, ModelLoss, Objective
from exactlr.curvature.spectral import WarmStart, solve_spectral_norm, solve_spectral_norms
from exactlr.running_max import (
    SampleEvaluation,
    SampleRecord,
    SampleTrace,
    SmoothnessEstimate,
    check_stop_arguments,
)
from exactlr.sampling import draw_model
from exactlr.screening import can_screen, screened_samples

try:  # tqdm is an optional extra: without it there is no progress bar
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - depends on the environment
    tqdm = None

__all__ = [
    "LR_TOL",
    "VARIANTS",
    "SampleRecord",
    "SmoothnessEstimate",
    "estimate_smoothness",
    "smoothness_options",
]

VARIANTS = ("full", "minibatch")


def _evaluate_one(
    model: nn.Module,
    objective: Objective,
    data: list[Any],
    *,
    variant: str,
    seed: int,
    options: SpectralOptions,
    ceiling: float | None = None,
    group: dist.ProcessGroup | None = None,
    start: WarmStart | None = None,
) -> SampleEvaluation:
    """``||H(w)||_2`` of one sample (max over batches for ``"minibatch"``).

    ``ceiling``: the running maximum so far; a solver run may stop once its norm is
    certified to be at most it (or the sample's best batch so far), since it cannot
    change K_hat then. ``start``: the sample's kept multi-fidelity start
    (``"full"`` only; :mod:`exactlr.screening`).

    With a process group, ``data`` is this rank's shard: ``"full"`` takes data-parallel
    products; ``"minibatch"`` evaluates this rank's batches alone and takes the max over
    the ranks (:func:`_best_over_ranks`).
    """
    groups = [[b] for b in data] if variant == "minibatch" else [data]
    products_group = passed_on(group if variant == "full" else None)
    best = None
    hvps, sub_hvps, converged, loss = 0, 0, True, -math.inf
    solver_gen = torch.Generator().manual_seed(seed)
    for part in groups:
        res = solve_spectral_norm(
            model,
            objective,
            part,
            options,
            generator=solver_gen,
            ceiling=_ceiling(ceiling, best.value if best is not None else None, options),
            process_group=products_group,
            start=start,
        )
        hvps += res.num_hvps
        sub_hvps += res.subsample_hvps
        converged = converged and res.converged
        loss = max(loss, res.loss)
        if best is None or res.value > best.value:
            best = res
    assert best is not None
    evaluation = SampleEvaluation(
        best.value,
        best.lambda_max,
        best.lambda_min,
        hvps,
        converged,
        loss,
        sub_hvps,
        best.certified,
    )
    if variant == "minibatch" and group is not None:
        return _best_over_ranks(evaluation, group)
    return evaluation


def _best_over_ranks(evaluation: SampleEvaluation, group: dist.ProcessGroup) -> SampleEvaluation:
    """The max-norm rank's evaluation, with the products and convergence of all ranks."""
    everyone = gather_objects(evaluation, group)
    best = max(everyone, key=lambda ev: ev.value)  # the first rank on ties, alike everywhere
    return dataclasses.replace(
        best,
        num_hvps=sum(ev.num_hvps for ev in everyone),
        subsample_hvps=sum(ev.subsample_hvps for ev in everyone),
        converged=all(ev.converged for ev in everyone),
        loss=max(ev.loss for ev in everyone),
    )


def _ceiling(
    running_max: float | None, best: float | None, options: SpectralOptions
) -> float | None:
    """The value below which a solver run cannot change K_hat (None: none yet, or off)."""
    if not options.stop_below_max or options.method != "lanczos":
        return None
    known = [v for v in (running_max, best) if v is not None]
    return max(known) if known else None


def _evaluate_group(
    models: list[nn.Module],
    objective: Objective,
    data: list[Any],
    *,
    seeds: list[int],
    options: SpectralOptions,
    group: dist.ProcessGroup | None = None,
) -> list[SampleEvaluation]:
    """``||H(w_s)||_2`` of several samples at once (stacked weights, batched Lanczos).

    Each sample's start vector comes from ``Generator().manual_seed(seed_s)``, as in
    :func:`_evaluate_one`, so the values agree with it to the solver tolerance.
    """
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    results = solve_spectral_norms(
        models, objective, data, options, generators=generators, process_group=passed_on(group)
    )
    return [
        SampleEvaluation(
            r.value, r.lambda_max, r.lambda_min, r.num_hvps, r.converged, r.loss, 0, r.certified
        )
        for r in results
    ]


def _evaluate_samples(
    make_model: Callable[[], nn.Module],
    objective: Objective,
    data: list[Any],
    seeds: list[int],
    *,
    device: torch.device | str | None,
    variant: str,
    options: SpectralOptions,
    group: dist.ProcessGroup | None,
    ceiling: float | None = None,
) -> list[SampleEvaluation]:
    """The samples drawn with ``seeds``: stacked if several, else one (none: ``[]``).

    ``ceiling``: the running maximum so far (see :func:`_evaluate_one`).
    """
    if not seeds:
        return []
    models = _draw_models(make_model, seeds, device)
    if len(seeds) > 1:
        return _evaluate_group(models, objective, data, seeds=seeds, options=options, group=group)
    one = _evaluate_one(
        models[0],
        objective,
        data,
        variant=variant,
        seed=seeds[0],
        options=options,
        ceiling=ceiling,
        group=group,
    )
    return [one]


def _check_same_batch_counts(count: int, group: dist.ProcessGroup) -> None:
    """``parallel="samples"`` needs all the data on every rank: equal batch counts."""
    counts = gather_objects(count, group)
    if any(c != counts[0] for c in counts):
        raise ValueError(
            f"parallel='samples' needs all the data on every rank, but the ranks hold "
            f"{counts} batches; pass the same batches everywhere, or use parallel='data' "
            "for sharded data"
        )


def _can_batch(variant: str, options: SpectralOptions, objective: Objective) -> bool:
    """Whether samples can be stacked: full-data Lanczos without a subsample share, on
    ``(inputs, targets)`` pairs (see :func:`~exactlr.curvature.hessian_spectral_norms`);
    stacked samples start from random vectors, so ``subsample="auto"`` means none there."""
    return (
        variant == "full"
        and options.method == "lanczos"
        and options.subsample in (None, "auto")
        and objective.pairs
    )


def _check_arguments(
    num_samples: int,
    variant: str,
    patience: int | None,
    rel_tol: float,
    sample_batch: int,
    parallel: str = "data",
) -> None:
    """Raise ValueError naming the first bad argument of :func:`estimate_smoothness`."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel={parallel!r} is not one of {PARALLEL_MODES}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples=}")
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of {VARIANTS}")
    check_stop_arguments(patience, rel_tol)
    if not isinstance(sample_batch, int) or isinstance(sample_batch, bool) or sample_batch < 1:
        raise ValueError(f"sample_batch must be a positive integer, got {sample_batch=}")


#: The relative tolerance of each sample's spectral norm in Algorithm 2 unless given.
#: alpha ~ K^(-1/2) and the certified norm is a lower bound within ``tol``, so alpha is
#: within ``tol / 2`` of the alpha of the exact norms of the same samples; the
#: tolerance study of ``benchmarks/bench_lr_cost.py`` measures it against ``tol=1e-6``.
LR_TOL = 1e-2


def smoothness_options(options: SpectralOptions | None = None, **keywords: Any) -> SpectralOptions:
    """The spectral-norm options of Algorithm 2: ``options`` updated by ``keywords``.

    ``target`` defaults to ``"norm"`` with Lanczos: K_hat needs only each sample's
    spectral norm, so the solver stops on its error bound and leaves the smaller end of
    the spectrum loose (fewer products when one end dominates). ``tol`` defaults to
    :data:`LR_TOL` (when None): the accuracy the step size needs, not the spectral
    norm's own default.

    Raises:
        ValueError: A keyword that is not an option (naming it and the valid ones) or a
            bad option value.
    """
    merged = SpectralOptions.from_keywords(options, **keywords)
    merged.validate()
    return merged.with_target("norm" if merged.method == "lanczos" else "both").with_tol(LR_TOL)


def _draw_models(
    make_model: Callable[[], nn.Module], seeds: list[int], device: torch.device | str | None
) -> list[nn.Module]:
    """One model per seed from ``make_model`` (see :func:`~exactlr.sampling.draw_model`),
    on ``device``."""
    models = []
    for seed in seeds:
        model = draw_model(make_model, seed)
        models.append(model.to(device) if device is not None else model)
    return models


def estimate_smoothness(
    make_model: Callable[[], nn.Module],
    loss_fn: LossFn | None = None,
    batches: Iterable[Any] | None = None,
    *,
    loss: ModelLoss | None = None,
    batch_size: BatchSize | None = None,
    num_samples: int = 10,
    generator: torch.Generator | None = None,
    variant: str = "full",
    patience: int | None = None,
    rel_tol: float = 0.01,
    device: torch.device | str | None = None,
    progress: bool = False,
    sample_batch: int = 1,
    options: SpectralOptions | None = None,
    process_group: dist.ProcessGroup | bool | None = None,
    parallel: str = "data",
    **option_keywords: Any,
) -> SmoothnessEstimate:
    """Algorithm 2: ``K_hat = max_j ||H(w_j)||_2`` over fresh initialisations ``w_j``.

    Args:
        make_model: Returns a freshly initialised model of the architecture (one sample
            of W). Called with the global RNG seeded per sample (and restored after).
        loss_fn: Mean-reduced loss ``loss_fn(outputs, targets)`` of ``(inputs, targets)``
            batches; None with ``loss``.
        batches: Iterable of batches; the loss is their size-weighted mean.
        loss: ``loss(model, batch) -> mean loss`` for batches of any structure (see
            :func:`~exactlr.curvature.hessian_spectral_norm`); instead of ``loss_fn``.
        batch_size: ``batch_size(batch) -> int``; default: the first dimension of the
            batch's first tensor.
        num_samples: N, the number of weight samples (the maximum if ``patience`` is set).
        generator: Seeds the samples and the solvers' start vectors.
        variant: ``"full"`` (full-data Hessian) or ``"minibatch"`` (max over batches).
        patience: Adaptive stop: end once the running max has not grown by more than
            ``rel_tol`` (relative) over ``patience`` consecutive samples. None: fixed N.
        rel_tol: Relative growth counted as "grown" for the adaptive stop.
        device: Device for the sampled models and the data (default: the model's own).
        progress: Show a tqdm progress bar (if tqdm is installed).
        sample_batch: Samples evaluated together: groups of this many consecutive
            samples (same seeds, same order) have their weights stacked and share one
            vmapped Hessian-vector product per Lanczos step
            (:func:`~exactlr.curvature.hessian_spectral_norms`); each sample keeps its
            own start vector and stopping rule, so its value equals the sequential one
            to the solver tolerance. Records, running max and the adaptive stop are as
            with 1: the stop is checked sample by sample, in order, after each group;
            the group's samples after the stopping one (at most ``sample_batch - 1``)
            were evaluated but are dropped (counted in ``discarded``), so the result is
            the sequential one. A record's ``seconds`` is its group's wall time divided by
            the group size. Only ``variant="full"`` with ``method="lanczos"``, no
            ``subsample`` share (``"auto"``: stacked samples start from random
            vectors) and a ``loss_fn`` on pairs is batched; otherwise the samples are
            evaluated one by one (as with 1). Default 1: one at a time.
        options: How each spectral norm is computed
            (:class:`~exactlr.curvature.SpectralOptions`); default: its defaults.
        process_group: Several processes (:mod:`exactlr.curvature.distributed`): a
            ``ProcessGroup``; None: the default group when ``torch.distributed`` is
            initialised (``torchrun``), else one process; False: one process. Every rank
            gets the same result (seeds and start vectors are rank 0's).
        parallel: How the processes share the work. ``"data"``: ``batches`` is this
            rank's shard; each product is all-reduced over the ranks (one all-reduce of
            the parameter count), every rank evaluates every sample; the choice when the
            data do not fit one rank or a sample is slow. ``"samples"``: ``batches`` is
            all the data on every rank; each rank evaluates whole samples (rounds of
            ``sample_batch`` per rank) with no communication inside them, and the
            records are gathered (the adaptive stop is checked in order after each
            round, later samples of the round discarded); the choice when the data fit
            one rank and there are at least as many samples as ranks.
        **option_keywords: Single options by name, replacing those of ``options``
            (``method``, ``tol``, ``max_iters``, ``hvp_mode``, ``subsample``,
            ``subsample_tol``, ``target``, ``rewrite``, ``stop_below_max``, ``screen``,
            ``check_labels``,
            ``check_determinism``: the probe runs on the first sample, or the first
            group, only). ``target`` defaults to
            ``"norm"`` here with Lanczos: the spectral norm is certified to ``tol``; the
            records' smaller-magnitude eigenvalue is then only a loose estimate (pass
            ``target="both"`` for both).

    Returns:
        A :class:`SmoothnessEstimate`.

    Raises:
        ValueError: Bad ``num_samples``, ``variant``, ``patience``, ``rel_tol``,
            ``sample_batch`` or option (an unknown option name is listed with the valid
            ones), models of different architectures in one group, and whatever
            :func:`~exactlr.curvature.hessian_spectral_norm` rejects (empty batches, bad
            labels).

    Example:
        >>> import torch.nn.functional as F
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> est = estimate_smoothness(lambda: torch.nn.Linear(4, 3), F.cross_entropy,
        ...                           [(x, y)], num_samples=3)
        >>> est.k_hat == max(est.samples)
        True
    """
    _check_arguments(num_samples, variant, patience, rel_tol, sample_batch, parallel)
    opts = smoothness_options(options, **option_keywords)
    objective = Objective(loss_fn, loss, batch_size, opts.check_labels)
    group = resolve_group(process_group)
    group_size = sample_batch if _can_batch(variant, opts, objective) else 1
    with all_or_none(group):  # a rank's bad batches stop every rank
        data = materialize_batches(
            batches, torch.device(device) if device is not None else None, pairs=objective.pairs
        )
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    seeds = torch.randint(0, 2**62, (num_samples,), generator=generator)
    seeds = same_on_all_ranks(seeds, group).tolist()
    split = group if parallel == "samples" else None  # the group the samples are split over
    if split is not None:
        _check_same_batch_counts(len(data), split)
    show = progress and tqdm is not None and (group is None or dist.get_rank(group) == 0)
    if can_screen(
        opts,
        variant=variant,
        patience=patience,
        group_size=group_size,
        samples_split=split is not None,
    ):
        screened = _screened(make_model, objective, data, seeds, opts, device, group, show)
        if screened is not None:
            trace = SampleTrace(num_samples, patience, rel_tol, None)
            trace.extend(0, seeds, *screened)
            return trace.estimate(variant)
    evaluate = functools.partial(
        _evaluate_samples,
        make_model,
        objective,
        data,
        device=device,
        variant=variant,
        options=opts,
        group=None if split is not None else group,
    )
    bar = tqdm(total=num_samples, desc="K_hat samples", unit="sample") if show else None
    trace = SampleTrace(num_samples, patience, rel_tol, bar)
    try:
        _in_draw_order(evaluate, seeds, trace, opts, group_size, split)
    finally:
        if bar is not None:
            bar.close()
    return trace.estimate(variant)


def _in_draw_order(
    evaluate: Callable[..., list[SampleEvaluation]],
    seeds: list[int],
    trace: SampleTrace,
    opts: SpectralOptions,
    group_size: int,
    split: dist.ProcessGroup | None,
) -> None:
    """Algorithm 2's loop: rounds of samples in draw order into ``trace``, each under
    the running max so far, until N or the adaptive stop."""
    per_round = group_size * (dist.get_world_size(split) if split is not None else 1)
    for first in range(0, len(seeds), per_round):
        chunk = seeds[first : first + per_round]
        mine = chunk if split is None else rank_share(chunk, group_size, split)
        start = time.perf_counter()
        # The determinism probe is about the architecture: the first round is enough.
        round_opts = opts if first == 0 else dataclasses.replace(opts, check_determinism=False)
        evaluations = evaluate(
            mine,
            options=round_opts,
            ceiling=trace.running[-1] if trace.running else None,
        )
        seconds = [(time.perf_counter() - start) / max(1, len(mine))] * len(mine)
        if split is not None:  # every rank's samples, in draw order
            rounds = gather_objects((evaluations, seconds), split)
            evaluations = [ev for evs, _ in rounds for ev in evs]
            seconds = [sec for _, secs in rounds for sec in secs]
        if trace.extend(first, chunk, evaluations, seconds):
            break


def _screened(
    make_model: Callable[[], nn.Module],
    objective: Objective,
    data: list[Any],
    seeds: list[int],
    options: SpectralOptions,
    device: torch.device | str | None,
    group: dist.ProcessGroup | None,
    progress: bool,
) -> tuple[list[SampleEvaluation], list[float]] | None:
    """The samples through :func:`~exactlr.screening.screened_samples` (None: the data
    take no subsample, so no screen)."""
    quiet = dataclasses.replace(options, check_determinism=False)

    def draw(seed: int) -> nn.Module:
        return _draw_models(make_model, [seed], device)[0]

    def evaluate(
        model: nn.Module, seed: int, ceiling: float | None, start: WarmStart | None
    ) -> SampleEvaluation:
        return _evaluate_one(
            model,
            objective,
            data,
            variant="full",
            seed=seed,
            options=quiet,
            ceiling=ceiling,
            group=group,
            start=start,
        )

    return screened_samples(
        draw, evaluate, objective, data, seeds, options=options, group=group, progress=progress
    )
