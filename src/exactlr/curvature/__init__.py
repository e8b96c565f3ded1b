"""Curvature of a training loss: Hessian-vector products and extreme eigenvalues.

The loss is the size-weighted mean over an iterable of batches,

    L(w) = sum_b (n_b / N) * loss_b(w),    N = sum_b n_b,

with ``loss_b = loss_fn(model(x_b; w), y_b)`` for ``(inputs, targets)`` pairs or
``loss(model_w, batch_b)`` for batches of any structure: the full-data loss when each
batch loss is a mean. The
spectral norm counts negative curvature: ``||H||_2 = max(|lambda_max|, |lambda_min|)``.

Modules (each imports only those above it):

- :mod:`~exactlr.curvature.solvers`: Lanczos (single and batched, with Ritz error
  bounds) and power iteration on a matvec; pure functions.
- :mod:`~exactlr.curvature.batches`: batches of any structure moved to a device and
  sized, the model's training-loss mode (eval mode, so every dropout is off, with
  BatchNorm on batch statistics without running-stat updates), subsampling.
- :mod:`~exactlr.curvature.objective`: the loss contract (``loss_fn(outputs, targets)``
  on pairs or ``loss(model, batch)``), batch weights, cross-entropy label checks.
- :mod:`~exactlr.curvature.determinism`: the probe that the loss is a deterministic
  function of the weights, and the random ops that make it not.
- :mod:`~exactlr.curvature.rewrites`: exact rewrites of the loss (input shift, composite
  BatchNorm) that change only rounding and cost.
- :mod:`~exactlr.curvature.memory`: the memory estimate behind ``hvp_mode="auto"``.
- :mod:`~exactlr.curvature.operators`: :class:`HessianOperator` (attention on the math
  kernel, ops without a needed derivative named); :mod:`~exactlr.curvature.stacked`:
  :class:`StackedHessianOperator` (S weight samples, one vmapped product).
- :mod:`~exactlr.curvature.distributed`: data-parallel products on
  :mod:`torch.distributed` (each rank a shard of the batches, one ``all_reduce`` per
  product), the ranks' agreement checks, one error on every rank.
- :mod:`~exactlr.curvature.options`: :class:`SpectralOptions`, the solver and product
  options as one typed value, their validation, and what ``subsample="auto"`` means.
- :mod:`~exactlr.curvature.multifidelity`: the start vector from a subsample Hessian.
- :mod:`~exactlr.curvature.spectral`: :func:`hessian_spectral_norm`,
  :func:`hessian_spectral_norms`, :func:`full_loss` (each with ``process_group=``).

The curvature is that of the loss *as training computes it*, made deterministic:
BatchNorm uses batch statistics and never updates its running statistics here; every
dropout is off (the model is in eval mode during the computation), since a random
operator has no eigenvalues, and a forward pass that is still random is an error. The model's
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
from exactlr.curvature.operators import HVP_MODES, HessianOperator
from exactlr.curvature.options import METHODS, SpectralOptions
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
    SpectralNormResult,
    full_loss,
    hessian_spectral_norm,
    hessian_spectral_norms,
)
from exactlr.curvature.stacked import StackedHessianOperator

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
