"""Curvature of a training loss: Hessian-vector products and extreme eigenvalues.

The loss is the size-weighted mean over an iterable of ``(inputs, targets)`` batches,

    L(w) = sum_b (n_b / N) * loss_fn(model(x_b; w), y_b),    N = sum_b n_b,

i.e. the full-data loss when ``loss_fn`` uses ``reduction="mean"`` (torch's default). The
spectral norm counts negative curvature: ``||H||_2 = max(|lambda_max|, |lambda_min|)``.

Modules (each imports only those above it):

- :mod:`~exactlr.curvature.solvers`: Lanczos (single and batched, with Ritz error
  bounds) and power iteration on a matvec; pure functions.
- :mod:`~exactlr.curvature.batches`: batches materialised on a device, the model's
  training-loss mode (BatchNorm batch statistics without running-stat updates, Dropout
  off), label checks, subsampling.
- :mod:`~exactlr.curvature.rewrites`: exact rewrites of the loss (input shift, composite
  BatchNorm) that change only rounding and cost.
- :mod:`~exactlr.curvature.memory`: the memory estimate behind ``hvp_mode="auto"``.
- :mod:`~exactlr.curvature.operators`: :class:`HessianOperator` and
  :class:`StackedHessianOperator` (S weight samples, one vmapped product).
- :mod:`~exactlr.curvature.distributed`: data-parallel products on
  :mod:`torch.distributed` (each rank a shard of the batches, one ``all_reduce`` per
  product), the ranks' agreement checks, one error on every rank.
- :mod:`~exactlr.curvature.spectral`: :class:`SpectralOptions`,
  :func:`hessian_spectral_norm`, :func:`hessian_spectral_norms`, :func:`full_loss`
  (each with ``process_group=``).

The curvature is that of the loss *as training computes it*: BatchNorm uses batch
statistics (train mode) and never updates its running statistics here; Dropout is
switched off (its expectation), since a random operator has no eigenvalues. The model's
parameters, buffers and train/eval flags are left exactly as they were.

The functions here leave glibc's allocator as they found it; a loop of many products
runs faster inside :func:`exactlr.allocator.keep_freed_memory`, which the ``exactlr``
command enters (``benchmarks/bench_allocator.py``).
"""

from exactlr.curvature.batches import (
    Batch,
    LossFn,
    materialize_batches,
    subsample_batches,
    training_loss_mode,
)
from exactlr.curvature.operators import HVP_MODES, HessianOperator, StackedHessianOperator
from exactlr.curvature.solvers import (
    TARGETS,
    EigenResult,
    Matvec,
    StackedMatvec,
    lanczos,
    lanczos_batched,
    power_iteration,
    random_unit_vector,
)
from exactlr.curvature.spectral import (
    METHODS,
    SpectralNormResult,
    SpectralOptions,
    full_loss,
    hessian_spectral_norm,
    hessian_spectral_norms,
)

__all__ = [
    "HVP_MODES",
    "METHODS",
    "TARGETS",
    "Batch",
    "EigenResult",
    "HessianOperator",
    "LossFn",
    "Matvec",
    "SpectralNormResult",
    "SpectralOptions",
    "StackedHessianOperator",
    "StackedMatvec",
    "full_loss",
    "hessian_spectral_norm",
    "hessian_spectral_norms",
    "lanczos",
    "lanczos_batched",
    "materialize_batches",
    "power_iteration",
    "random_unit_vector",
    "subsample_batches",
    "training_loss_mode",
]
