"""exactlr: a provably motivated constant learning rate for Adam.

    alpha = sqrt(2 L(w0) / (K_hat T))

with ``L(w0)`` the initial training loss, ``K_hat`` the loss's Lipschitz smoothness
(largest Hessian spectral norm over random weight samples) and ``T`` the number of steps.

Modules, data flowing one way (the layout of DESIGN.md, with two additions):
``data``, ``models`` -> ``curvature`` -> ``smoothness`` -> ``stepsize`` ->
``schedules``, ``lrfinder`` -> ``training``, ``grid`` -> ``experiments`` -> ``results``
-> ``plotting``, ``report`` -> ``cli`` (``distributed``: the Ray executor).

- ``lrfinder`` (not in DESIGN.md): the LR range test, a baseline users pick instead of
  this step size; its own module because it trains (like ``training``) but returns a
  learning rate (like ``stepsize``), and neither should depend on the other.
- ``allocator`` (not in DESIGN.md): a context manager that keeps glibc from unmapping
  freed large blocks while exactlr's functions run (a full-batch product page-faulted
  its intermediates in afresh otherwise); a utility below every other module.
- ``grid`` (not in DESIGN.md): many runs of one architecture trained together in one
  forward/backward pass (the runs' channels side by side, or ``torch.vmap`` for other
  models); equal to ``training.train_run`` per run. The experiment runner keeps
  the sequential ``train_run`` path because the grid measured slower on CPU
  (docs/performance.md).
"""

from exactlr.allocator import keep_freed_memory
from exactlr.curvature import (
    EigenResult,
    HessianOperator,
    SpectralNormResult,
    full_loss,
    hessian_spectral_norm,
    lanczos,
    power_iteration,
)
from exactlr.smoothness import SampleRecord, SmoothnessEstimate, estimate_smoothness
from exactlr.stepsize import LRSuggestion, exact_step_size, suggest_lr

__version__ = "0.1.0"

__all__ = [
    "EigenResult",
    "HessianOperator",
    "LRSuggestion",
    "SampleRecord",
    "SmoothnessEstimate",
    "SpectralNormResult",
    "__version__",
    "estimate_smoothness",
    "exact_step_size",
    "full_loss",
    "hessian_spectral_norm",
    "keep_freed_memory",
    "lanczos",
    "power_iteration",
    "suggest_lr",
]
