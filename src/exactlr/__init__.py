"""exactlr: a provably motivated constant learning rate for Adam.

    alpha = sqrt(2 L(w0) / (K_hat T))

with ``L(w0)`` the initial training loss, ``K_hat`` the loss's Lipschitz smoothness
(largest Hessian spectral norm over random weight samples) and ``T`` the number of steps.
"""

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
    "lanczos",
    "power_iteration",
    "suggest_lr",
]
