"""The multi-fidelity start of :func:`~exactlr.curvature.hessian_spectral_norm`.

Lanczos on the Hessian of a random share of every batch, to a loose tolerance, gives
Ritz pairs whose combination starts the full-data Lanczos: the full-data run then needs
fewer products for the same certified bound (the answer and its bound are the full-data
ones; the subsample only buys a start vector). :func:`num_examples` counts the examples
behind an operator, which ``subsample="auto"`` turns into a share
(:func:`~exactlr.curvature.options.resolve_subsample`). ``benchmarks/bench_lr_cost.py``
and ``benchmarks/bench_pyhessian.py`` measure what it saves.
"""

from __future__ import annotations

import torch
from torch import Tensor

from exactlr.curvature.batches import subsample_batches
from exactlr.curvature.distributed import DataParallelOperator, data_parallel
from exactlr.curvature.operators import HessianOperator
from exactlr.curvature.options import SpectralOptions
from exactlr.curvature.solvers import EigenResult, lanczos


def num_examples(op: HessianOperator | DataParallelOperator) -> int:
    """The examples behind ``op``'s loss: this process's, or all ranks' for a
    data-parallel operator (``N_r / share``), so that every rank decides alike."""
    local = sum(op.sizes)
    if isinstance(op, DataParallelOperator):
        return round(local / op.share) if op.share > 0 else 0
    return local


def subsample_eigen(
    op: HessianOperator,
    v0: Tensor,
    share: float,
    options: SpectralOptions,
    generator: torch.Generator | None,
) -> tuple[EigenResult, int]:
    """Lanczos, to ``options.subsample_tol``, on the Hessian of a ``share`` of every batch.

    Returns the result (with its Ritz vectors) and the subsample products spent.
    """
    # A local generator when none is given: library code leaves the global RNG alone.
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    data = subsample_batches(op.batches, share, generator=generator, sizes=op.sizes)
    sub = HessianOperator(
        op.model, objective=op.objective, batches=data, hvp_mode=op.hvp_mode, rewrite=op.rewrite
    )
    if isinstance(op, DataParallelOperator):  # every rank's subsample, weighted by size
        sub, _ = data_parallel(sub, 0.0, op.group)
    try:
        res = lanczos(
            sub,
            v0,
            max_iters=options.max_iters,
            tol=max(options.tol or 1e-4, options.subsample_tol),
            return_vectors=True,
            target=options.target or "both",
        )
    finally:
        sub.release()
    return res, sub.num_products


def subsample_start(
    op: HessianOperator,
    v0: Tensor,
    share: float,
    options: SpectralOptions,
    generator: torch.Generator | None,
) -> tuple[Tensor, int]:
    """Start vector for the full-data Lanczos from the Ritz pairs of the Hessian of a
    ``share`` of every batch (:func:`subsample_eigen`).

    Returns the start vector and the subsample products spent.
    """
    res, products = subsample_eigen(op, v0, share, options, generator)
    return start_vector(res, v0), products


def start_vector(res: EigenResult, v0: Tensor) -> Tensor:
    """The full-data start from a subsample run's Ritz pairs (``v0`` if they give none):
    ``|theta_max| u_max + |theta_min| u_min``, normalised."""
    assert res.vector_max is not None and res.vector_min is not None
    # Weighting by |theta| favours the dominant end, which the norm needs most; the other
    # end still spans the start so both extremes converge together.
    start = abs(res.lambda_max) * res.vector_max + abs(res.lambda_min) * res.vector_min
    if not torch.isfinite(start).all() or float(start.norm()) == 0.0:
        return v0
    return start / start.norm()
