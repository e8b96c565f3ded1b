"""The Hessian spectral norm of a training loss: ``||H||_2 = max(|lambda_max|, |lambda_min|)``.

:func:`hessian_spectral_norm` runs a solver of :mod:`exactlr.curvature.solvers` on a
:class:`~exactlr.curvature.operators.HessianOperator` inside
:func:`~exactlr.curvature.batches.training_loss_mode`;
:func:`hessian_spectral_norms` does the same for S models of one architecture with one
stacked operator and :func:`~exactlr.curvature.solvers.lanczos_batched`. The norm counts
negative curvature. The options they run with are a
:class:`~exactlr.curvature.options.SpectralOptions` (re-exported here).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from exactlr.curvature.batches import (
    LossFn,
    materialize_batches,
    module_device_dtype,
    training_loss_mode,
)
from exactlr.curvature.distributed import (
    all_or_none,
    data_parallel,
    resolve_group,
    same_on_all_ranks,
    shared_start,
)
from exactlr.curvature.multifidelity import (
    num_examples,
    start_vector,
    subsample_eigen,
    subsample_start,
)
from exactlr.curvature.objective import BatchSize, ModelLoss, Objective
from exactlr.curvature.operators import HessianOperator
from exactlr.curvature.options import METHODS, SpectralOptions, resolve_subsample
from exactlr.curvature.solvers import (
    TARGETS,
    EigenResult,
    lanczos,
    lanczos_batched,
    power_iteration_result,
    random_unit_vector,
)
from exactlr.curvature.stacked import StackedHessianOperator

__all__ = [
    "METHODS",
    "SpectralNormResult",
    "SpectralOptions",
    "full_loss",
    "hessian_spectral_norm",
    "hessian_spectral_norms",
]


@dataclass(frozen=True)
class SpectralNormResult:
    """The Hessian spectral norm of a loss at one point of weight space.

    Attributes:
        value: ``max(|lambda_max|, |lambda_min|)``.
        lambda_max: Largest eigenvalue of the Hessian.
        lambda_min: Smallest eigenvalue (negative curvature shows up here).
        num_hvps: Hessian-vector products spent.
        converged: Whether the solver met its tolerance.
        method: ``"lanczos"`` or ``"power"``.
        hvp_mode: ``"forward"`` or ``"reverse"``.
        loss: The full-data loss at these weights.
        error_estimate: The solver's bound on the absolute error of ``value`` for the
            products as computed: rounding inside the products is not in it (see
            :func:`hessian_spectral_norm`, "Precision").
        seconds: Wall time.
        subsample_hvps: Products with the subsample Hessian spent on the start vector
            (``subsample`` set; each costs about ``subsample`` of a full product).
        certified: What ``converged`` and ``error_estimate`` are about: ``"both"``
            (``lambda_max`` and ``lambda_min`` to ``tol`` times ``value``), ``"norm"``
            (``value`` and the end that gives it; the other end is an estimate inside
            the spectrum), ``"ceiling"`` (only ``value <= ceiling``; ``value`` is then
            a lower estimate of the norm) or ``"subsample"`` (the norm of the Hessian
            of a share of the data, :func:`solve_subsample_norm`).
    """

    value: float
    lambda_max: float
    lambda_min: float
    num_hvps: int
    converged: bool
    method: str
    hvp_mode: str
    loss: float
    error_estimate: float
    seconds: float
    subsample_hvps: int = 0
    certified: str = "both"


@dataclass(frozen=True)
class WarmStart:
    """A sample's multi-fidelity start, kept for its full-data solve later.

    Attributes:
        vector: The start vector (on the CPU).
        generator_state: The solver generator's state after the subsample run (None
            without a generator): the full-data solve draws on from there, as after its
            own subsample run.
        local_loss: This process's full-data loss at the sample's weights (None: not
            known), which the full-data solve then does not evaluate again.
    """

    vector: Tensor = field(repr=False)
    generator_state: Tensor | None = field(default=None, repr=False)
    local_loss: float | None = None


def hessian_spectral_norm(
    model: nn.Module,
    loss_fn: LossFn | None = None,
    batches: Iterable[Any] | None = None,
    *,
    loss: ModelLoss | None = None,
    batch_size: BatchSize | None = None,
    method: str = "lanczos",
    tol: float = 1e-4,
    max_iters: int = 100,
    generator: torch.Generator | None = None,
    hvp_mode: str = "auto",
    subsample: float | str | None = "auto",
    subsample_tol: float = 1e-2,
    target: str | None = None,
    rewrite: bool = True,
    check_labels: bool = True,
    check_determinism: bool = True,
    ceiling: float | None = None,
    process_group: dist.ProcessGroup | bool | None = None,
) -> SpectralNormResult:
    """Spectral norm of the Hessian of the full-data loss at the model's weights.

    ``||H||_2 = max(|lambda_max(H)|, |lambda_min(H)|)`` where
    ``H = d^2/dw^2 sum_b (n_b/N) loss_b(w)`` with ``loss_b = loss_fn(model(x_b; w), y_b)``
    or ``loss(model_w, batch_b)``.

    Args:
        model: The network (its weights are the point). Not modified: parameters,
            buffers and train/eval mode are as before on return.
        loss_fn: Mean-reduced loss ``loss_fn(outputs, targets)`` of ``(inputs, targets)``
            batches, e.g. ``torch.nn.functional.cross_entropy``; None with ``loss``.
        batches: Iterable of batches, e.g. a DataLoader or ``[(X, y)]``; every tensor in
            them is moved to the model's device.
        loss: ``loss(model, batch) -> mean loss`` for batches of any structure (dicts,
            ``BatchEncoding``, tuples of several tensors), e.g.
            ``lambda m, b: m(**b).loss``; instead of ``loss_fn``.
        batch_size: ``batch_size(batch) -> int``, the weight of a batch in the full-data
            loss; default: the first dimension of its first tensor.
        method: ``"lanczos"`` (both extremes at once, a-posteriori stop) or ``"power"``
            (power iteration for the dominant eigenvalue, then on ``H - lambda I`` for the
            other end).
        tol: Relative accuracy of the spectral norm (see "Precision" below).
        max_iters: Maximum Hessian-vector products per solver run.
        generator: Source of the random start vector (global RNG untouched if given).
        hvp_mode: ``"auto"``, ``"forward"`` or ``"reverse"``.
        subsample: Multi-fidelity start (Lanczos only): first run Lanczos, to the
            looser ``subsample_tol``, on the Hessian of a random ``subsample`` share of
            every batch (same share of each, so the batch weights stay), then start the
            full-data Lanczos from ``|theta_max| u_max + |theta_min| u_min`` of those
            Ritz pairs and stop it with the full-data error bound as usual. The answer
            and its bound are the full-data ones; the subsample only buys a start vector
            (with BatchNorm its Hessian is of a different function, still a close one).
            ``"auto"`` (the default): 5% of the examples when there are 2,000 or more
            (at least 200), else a random start
            (:func:`~exactlr.curvature.options.resolve_subsample`); None: a random
            start vector.
        subsample_tol: Relative tolerance of the subsample run.
        target: ``"norm"`` (the default with Lanczos): only ``value`` is certified to
            ``tol`` and the smaller end is an estimate; from one random start vector,
            so (as for any Krylov method) the certificate is that ``value`` is within
            ``tol`` of *an* eigenvalue and at most the norm, and that it is the top one
            rests on the start vector not missing its eigenvector (measured in
            ``tests/test_solvers_reference.py``: one miss in 30 small networks at
            ``tol=1e-4``, from below). ``"both"`` (the default and only choice with
            power iteration): ``tol`` bounds both
            extremes (relative to the norm), with a block of two start vectors, so that
            the non-dominant end is not taken from a near neighbour of the extreme
            eigenvalue (see :func:`~exactlr.curvature.solvers.lanczos`).
        rewrite: Exact rewrites of the loss for the products (see
            :class:`~exactlr.curvature.operators.HessianOperator` and
            :mod:`exactlr.curvature.rewrites`).
        check_labels: Check the class targets of a cross-entropy ``loss_fn`` (classes of
            the outputs or ``ignore_index``); False: no check.
        check_determinism: Evaluate the loss and one product twice first, on the first
            examples of the first batch, and raise, naming the random ops found, if
            they differ.
        ceiling: Stop as soon as ``value`` is certified to be at most ``ceiling``
            (``certified="ceiling"``; Lanczos only): Algorithm 2 passes its running
            maximum, which a sample below it cannot change. None: no such stop.
        process_group: Data-parallel products (:mod:`exactlr.curvature.distributed`):
            ``batches`` is this rank's shard, and the loss, the products and so the
            result are those of the data of all ranks, identical on every rank. None:
            the default group when ``torch.distributed`` is initialised (``torchrun``),
            else one process; False: one process.

    Returns:
        A :class:`SpectralNormResult`.

    Precision: the products are computed in the model's dtype, and the solver's bound
    does not see their rounding. In float32 the first layer's weight derivatives of a
    BatchNorm network are sums over batch x positions that cancel large equal terms when
    the data have a dominant value (MNIST's background), so float32 runs from different
    start vectors can each stop with a tiny bound at values further apart than ``tol``.
    With ``rewrite=True`` (the default) the input shift of
    :mod:`exactlr.curvature.rewrites` removes most of that cancellation
    (``benchmarks/bench_rewrites.py`` measures the product's error against float64,
    ``benchmarks/bench_pyhessian.py`` the norm's). For ``tol`` near float32's rounding of
    the products, cast the model and data to float64 (``model.double()``). The step size
    needs far less: alpha ~ K^(-1/2) moves by half the relative error of K.

    Raises:
        ValueError: Empty batches, labels outside the class range, a non-finite loss or
            product, a loss that is not deterministic, an op without the derivative the
            product mode needs, or a bad argument.

    Example:
        >>> import torch.nn.functional as F
        >>> net = torch.nn.Linear(4, 3)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> res = hessian_spectral_norm(net, F.cross_entropy, [(x, y)])
        >>> res.value == max(abs(res.lambda_max), abs(res.lambda_min))
        True
    """
    options = SpectralOptions(
        method=method,
        tol=tol,
        max_iters=max_iters,
        hvp_mode=hvp_mode,
        subsample=subsample,
        subsample_tol=subsample_tol,
        target=target,
        rewrite=rewrite,
        check_labels=check_labels,
        check_determinism=check_determinism,
    ).with_target("norm" if method == "lanczos" else "both")
    options.validate()
    if ceiling is not None and not (method == "lanczos" and ceiling >= 0):
        raise ValueError(f"ceiling must be None or >= 0 with method='lanczos', got {ceiling=}")
    objective = Objective(loss_fn, loss, batch_size, check_labels)
    return solve_spectral_norm(
        model,
        objective,
        batches,
        options,
        generator=generator,
        ceiling=ceiling,
        process_group=process_group,
    )


def solve_spectral_norm(
    model: nn.Module,
    objective: Objective,
    batches: Iterable[Any] | None,
    options: SpectralOptions,
    *,
    generator: torch.Generator | None = None,
    ceiling: float | None = None,
    process_group: dist.ProcessGroup | bool | None = None,
    start: WarmStart | None = None,
) -> SpectralNormResult:
    """:func:`hessian_spectral_norm` of an ``objective`` with ``options`` as one value.

    The typed entry point for callers that hold a :class:`SpectralOptions` (Algorithm 2
    in :mod:`exactlr.smoothness`), so that no option is spelled again as a keyword.
    ``options`` and ``ceiling`` are as :func:`hessian_spectral_norm` checks them
    (:meth:`SpectralOptions.validate`, ``target`` set); ``options.check_labels`` is
    ``objective.check_labels``'s business here. ``start``: the multi-fidelity start of
    :func:`solve_subsample_norm` with the same ``generator`` seed, instead of running
    the subsample again (its products are not counted here).
    """
    began = time.perf_counter()
    known = start.local_loss if start is not None else None
    with _prepared(model, objective, batches, options, generator, process_group, known) as prep:
        op, value, v0, _ = prep
        subsample_hvps, warm = 0, False
        if start is not None:
            v0, warm = start.vector.to(v0), True
            if generator is not None and start.generator_state is not None:
                generator.set_state(start.generator_state)
        elif share := resolve_subsample(options.subsample, num_examples(op), options.method):
            begin, subsample_hvps = subsample_start(op, v0, share, options, generator)
            v0, warm = begin, begin is not v0
        res = _solve(op, v0, options, generator, ceiling, warm=warm)
    return _result(
        res, op, options.method, value, began, op.num_products, subsample_hvps, res.certified
    )


def solve_subsample_norm(
    model: nn.Module,
    objective: Objective,
    batches: Iterable[Any] | None,
    options: SpectralOptions,
    *,
    generator: torch.Generator | None = None,
    process_group: dist.ProcessGroup | bool | None = None,
    keep_start: bool = False,
) -> tuple[SpectralNormResult, WarmStart | None] | None:
    """The subsample run of :func:`solve_spectral_norm`'s multi-fidelity start, alone.

    The same start vector and subsample as :func:`solve_spectral_norm` with the same
    ``generator`` seed draws, so its start is that call's. Returns the spectral norm of
    the subsample Hessian to ``options.subsample_tol`` with ``certified="subsample"``
    (``num_hvps`` 0; ``loss`` the full-data loss) and, with ``keep_start``, the
    :class:`WarmStart` for :func:`solve_spectral_norm`; None when ``options`` take no
    subsample of these data (:func:`~exactlr.curvature.options.resolve_subsample`).
    """
    began = time.perf_counter()
    with _prepared(model, objective, batches, options, generator, process_group) as prep:
        op, value, v0, local = prep
        share = resolve_subsample(options.subsample, num_examples(op), options.method)
        if share is None:
            return None
        res, products = subsample_eigen(op, v0, share, options, generator)
    kept = None
    vector = start_vector(res, v0) if keep_start else v0
    if vector is not v0:  # kept only if warm: a fallback to v0 reruns the same way
        state = generator.get_state() if generator is not None else None
        kept = WarmStart(vector.detach().cpu(), state, local)
    result = _result(res, op, options.method, value, began, 0, products, "subsample")
    return result, kept


def _result(
    res: EigenResult,
    op: HessianOperator,
    method: str,
    loss: float,
    began: float,
    num_hvps: int,
    subsample_hvps: int,
    certified: str,
) -> SpectralNormResult:
    """The :class:`SpectralNormResult` of a solver result on ``op`` (started at
    ``began``, a ``time.perf_counter()``)."""
    return SpectralNormResult(
        value=res.spectral_norm,
        lambda_max=res.lambda_max,
        lambda_min=res.lambda_min,
        num_hvps=num_hvps,
        converged=res.converged,
        method=method,
        hvp_mode=op.hvp_mode,
        loss=loss,
        error_estimate=res.error_estimate,
        seconds=time.perf_counter() - began,
        subsample_hvps=subsample_hvps,
        certified=certified,
    )


@contextlib.contextmanager
def _prepared(
    model: nn.Module,
    objective: Objective,
    batches: Iterable[Any] | None,
    options: SpectralOptions,
    generator: torch.Generator | None,
    process_group: dist.ProcessGroup | bool | None,
    local_loss: float | None = None,
) -> Iterator[tuple[HessianOperator, float, Tensor, float]]:
    """The operator of ``model``'s loss, the loss, the start vector and this process's
    loss (before the all-reduce), for a solve.

    The data on the model's device, the model in its training-loss mode, the
    determinism probe run if asked, the operator data-parallel over the group; the
    operator's graph is released on exit. ``local_loss``: this process's loss at these
    weights from an earlier evaluation (:class:`WarmStart`), not evaluated again.
    """
    group = resolve_group(process_group)
    device, _ = module_device_dtype(model)
    with training_loss_mode(model):
        with all_or_none(group):  # a rank's bad shard stops every rank
            data = materialize_batches(batches, device, pairs=objective.pairs)
            op = HessianOperator(
                model,
                objective=objective,
                batches=data,
                hvp_mode=options.hvp_mode,
                rewrite=options.rewrite,
            )
            local = op.loss() if local_loss is None else local_loss
            v0 = random_unit_vector(op.dim, generator=generator, dtype=op.dtype, device=op.device)
            if options.check_determinism:  # local: before any product is all-reduced
                op.check_deterministic(v0)
        op, value = data_parallel(op, local, group)
        try:
            yield op, value, shared_start(op, v0), local
        finally:
            op.release()


def _solve(
    op: HessianOperator,
    v0: Tensor,
    options: SpectralOptions,
    generator: torch.Generator | None,
    ceiling: float | None = None,
    *,
    warm: bool = False,
) -> EigenResult:
    """The extreme eigenvalues of ``op`` from ``v0`` (Lanczos or power iteration).

    ``warm``: ``v0`` is the multi-fidelity start, so the ``ceiling`` stop may come after
    two products (:func:`~exactlr.curvature.solvers.lanczos`'s ``ceiling_after``).

    Lanczos with ``target="both"`` starts from the block ``[v0, z]`` with a second
    random vector ``z``: the non-dominant end has no margin from the norm and is where
    one start vector mistakes a near neighbour for the extreme eigenvalue
    (``tests/test_solvers_reference.py``).
    """
    tol, max_iters, target = options.tol or 1e-4, options.max_iters, options.target or "both"
    if options.method == "lanczos":
        if target == "both":
            z = random_unit_vector(op.dim, generator=generator, dtype=op.dtype, device=op.device)
            v0 = torch.stack([v0, shared_start(op, z)])
        return lanczos(
            op,
            v0,
            max_iters=max_iters,
            tol=tol,
            target=target,
            ceiling=ceiling,
            ceiling_after=2 if warm else 3,
        )
    first = power_iteration_result(op, v0, max_iters=max_iters, tol=tol)
    lam = first.lambda_max
    # The opposite end of the spectrum is the dominant eigenvalue of H - lam I; its
    # residual there is the residual of H at mu + lam, stopped relative to |lam|.
    v1 = random_unit_vector(op.dim, generator=generator, dtype=op.dtype, device=op.device)
    v1 = shared_start(op, v1)
    second = power_iteration_result(
        lambda v: op(v) - lam * v, v1, max_iters=max_iters, tol=tol, scale=abs(lam)
    )
    other = second.lambda_max + lam
    return EigenResult(
        max(lam, other),
        min(lam, other),
        first.num_matvecs + second.num_matvecs,
        first.converged and second.converged,
        max(first.error_estimate, second.error_estimate),
    )


def hessian_spectral_norms(
    models: Sequence[nn.Module],
    loss_fn: LossFn | None = None,
    batches: Iterable[Any] | None = None,
    *,
    loss: ModelLoss | None = None,
    batch_size: BatchSize | None = None,
    tol: float = 1e-4,
    max_iters: int = 100,
    generators: Sequence[torch.Generator | None] | None = None,
    hvp_mode: str = "auto",
    target: str = "both",
    rewrite: bool = True,
    check_labels: bool = True,
    check_determinism: bool = True,
    process_group: dist.ProcessGroup | bool | None = None,
) -> list[SpectralNormResult]:
    """:func:`hessian_spectral_norm` (Lanczos) of S models of one architecture at once.

    ``||H_s||_2 = max(|lambda_max(H_s)|, |lambda_min(H_s)|)`` for the Hessian ``H_s`` of the
    full-data loss at the weights of ``models[s]``. The weights are stacked
    (:class:`~exactlr.curvature.operators.StackedHessianOperator`) and
    :func:`~exactlr.curvature.solvers.lanczos_batched` runs one Lanczos per model in
    lockstep, each with the start vector, stopping rule and product count that
    :func:`hessian_spectral_norm` (``method="lanczos"``, no ``subsample``) would use with
    ``generator=generators[s]``; results agree with it to the solver tolerance (the
    batched product rounds differently). Finished models stop costing products in
    ``"forward"`` mode and are masked until half the stack is done in ``"reverse"``
    mode (see ``_ActiveProducts``). Only ``loss_fn`` on ``(inputs, targets)`` pairs:
    model code is not always faithful under :func:`~torch.func.vmap` (a tiny Hugging Face
    GPT-2's vmapped Hessian, ``torch.func.hessian``, disagrees with its per-vector one),
    so a ``loss(model, batch)`` objective is evaluated model by model instead.

    Args:
        models: The networks, one architecture (same parameter/buffer names and shapes);
            not modified.
        loss_fn, batches, loss, batch_size: The loss, as for
            :func:`hessian_spectral_norm`; batches are moved to the first model's device.
        tol: Relative accuracy of each spectral norm.
        max_iters: Maximum Hessian-vector products per model.
        generators: One start-vector generator per model, as ``generator`` of
            :func:`hessian_spectral_norm`; None: all drawn from the global RNG.
        hvp_mode: ``"auto"``, ``"forward"`` or ``"reverse"``; ``"auto"`` budgets memory
            for the whole stack.
        target: ``"both"`` or ``"norm"`` (see :func:`~exactlr.curvature.solvers.lanczos`).
        rewrite: Exact rewrites of the loss for the products (see
            :class:`~exactlr.curvature.operators.HessianOperator`).
        check_labels, check_determinism: As for :func:`hessian_spectral_norm` (the
            probe evaluates the whole stack, on the head of the first batch, twice).
        process_group: Data-parallel products, as in :func:`hessian_spectral_norm`.

    Returns:
        One :class:`SpectralNormResult` per model, in order. ``seconds`` is the wall time
        of the whole call divided by S (the products are shared).

    Raises:
        ValueError: Models of different architectures, empty batches, bad labels, a
            non-finite loss or product, or a bad argument.
    """
    SpectralOptions(tol=tol, max_iters=max_iters).validate()
    if target not in TARGETS:
        raise ValueError(f"target={target!r} is not one of {TARGETS}")
    if generators is not None and len(generators) != len(models):
        raise ValueError(f"got {len(generators)} generators for {len(models)} models")
    if not models:
        raise ValueError("models is empty; pass at least one model")
    objective = Objective(loss_fn, loss, batch_size, check_labels)
    options = SpectralOptions(
        tol=tol,
        max_iters=max_iters,
        hvp_mode=hvp_mode,
        target=target,
        rewrite=rewrite,
        check_labels=check_labels,
        check_determinism=check_determinism,
    )
    return solve_spectral_norms(
        models, objective, batches, options, generators=generators, process_group=process_group
    )


def solve_spectral_norms(
    models: Sequence[nn.Module],
    objective: Objective,
    batches: Iterable[Any] | None,
    options: SpectralOptions,
    *,
    generators: Sequence[torch.Generator | None] | None = None,
    process_group: dist.ProcessGroup | bool | None = None,
) -> list[SpectralNormResult]:
    """:func:`hessian_spectral_norms` of an ``objective`` with ``options`` as one value.

    The typed entry point for Algorithm 2's stacked samples (:mod:`exactlr.smoothness`):
    Lanczos with ``options.tol``, ``max_iters``, ``hvp_mode``, ``target`` (None:
    ``"both"``), ``rewrite`` and ``check_determinism``; ``method`` and ``subsample`` are
    not read. ``models`` is not empty and ``generators``, if given, has one per model.
    """
    start = time.perf_counter()
    if not objective.pairs:
        raise ValueError(
            "hessian_spectral_norms stacks models with vmap, which takes loss_fn on "
            "(inputs, targets) batches only; with loss=, call hessian_spectral_norm per model"
        )
    group = resolve_group(process_group)
    device, _ = module_device_dtype(models[0])
    with all_or_none(group):  # a rank's bad shard stops every rank
        data = materialize_batches(batches, device, pairs=objective.pairs)
        op = StackedHessianOperator.from_models(
            models,
            objective=objective,
            batches=data,
            hvp_mode=options.hvp_mode,
            rewrite=options.rewrite,
        )
        losses = op.losses()
        gens = list(generators) if generators is not None else [None] * len(models)
        draws = [random_unit_vector(op.dim, generator=g, dtype=op.dtype) for g in gens]
        v0 = torch.stack(draws).to(op.device)
        if options.check_determinism:  # local: before any product is all-reduced
            op.check_deterministic(v0)
    op, losses = data_parallel(op, losses, group)
    v0 = same_on_all_ranks(v0, group)
    products = _ActiveProducts(op)
    try:
        results = lanczos_batched(
            products,
            v0,
            max_iters=options.max_iters,
            tol=options.tol,
            target=options.target or "both",
        )
    finally:
        products.release()
    seconds = (time.perf_counter() - start) / len(models)
    return [
        SpectralNormResult(
            value=res.spectral_norm,
            lambda_max=res.lambda_max,
            lambda_min=res.lambda_min,
            num_hvps=res.num_matvecs,
            converged=res.converged,
            method="lanczos",
            hvp_mode=op.hvp_mode,
            loss=loss,
            error_estimate=res.error_estimate,
            seconds=seconds,
            certified=res.certified,
        )
        for res, loss in zip(results, losses, strict=True)
    ]


class _ActiveProducts:
    """The ``matvec(Q, index)`` of :func:`lanczos_batched` on a stacked operator.

    Finished samples stop costing compute in ``"forward"`` mode: each product is taken on
    a stack of the active samples only (re-stacking costs a copy of their weights, no
    graph). In ``"reverse"`` mode re-stacking means rebuilding the gradient graph (about
    a product's cost), so finished samples are masked (a zero row, computed and thrown
    away) until the active ones are at most half the stack, and only then re-stacked:
    at most ``log2(S)`` rebuilds and at most half the work wasted.
    """

    def __init__(self, op: StackedHessianOperator) -> None:
        self.full = op
        self.op = op
        self.members = list(range(op.num_models))
        self.row_products = 0  # Hessian-vector products computed, masked rows included

    def __call__(self, block: Tensor, index: list[int]) -> Tensor:
        if index != self.members:
            shrink = self.op.hvp_mode == "forward" or 2 * len(index) <= len(self.members)
            if shrink:
                self.op.release()
                self.op = self.full.subset(index)
                self.members = list(index)
        self.row_products += len(self.members)
        if index == self.members:
            return self.op.matvec(block)
        position = {s: i for i, s in enumerate(self.members)}
        rows = torch.tensor([position[s] for s in index], device=block.device)
        padded = block.new_zeros(len(self.members), block.shape[1])
        padded[rows] = block
        return self.op.matvec(padded)[rows]

    def release(self) -> None:
        self.op.release()
        self.full.release()


def full_loss(
    model: nn.Module,
    loss_fn: LossFn | None = None,
    batches: Iterable[Any] | None = None,
    *,
    loss: ModelLoss | None = None,
    batch_size: BatchSize | None = None,
    check_labels: bool = True,
    process_group: dist.ProcessGroup | bool | None = None,
) -> float:
    """The size-weighted mean loss over ``batches`` as training computes it, without grad.

    The loss is given as for :func:`hessian_spectral_norm` (``loss_fn`` on pairs, or
    ``loss``). The model is left unchanged (see
    :func:`~exactlr.curvature.batches.training_loss_mode`). With a process group (see
    :func:`hessian_spectral_norm`), ``batches`` is this rank's shard and the result the
    loss over the data of all ranks.

    Raises:
        ValueError: Empty batches, bad labels, or a non-finite loss.
    """
    objective = Objective(loss_fn, loss, batch_size, check_labels)
    group = resolve_group(process_group)
    device, _ = module_device_dtype(model)
    with training_loss_mode(model):
        with all_or_none(group):
            data = materialize_batches(batches, device, pairs=objective.pairs)
            op = HessianOperator(
                model, objective=objective, batches=data, hvp_mode="forward", rewrite=False
            )
            value = op.loss()
        return data_parallel(op, value, group)[1]
