"""exactlr: a provably motivated constant learning rate for Adam.

    alpha = sqrt(2 L(w0) / (K_hat T))

with ``L(w0)`` the initial training loss, ``K_hat`` the loss's Lipschitz smoothness
(largest Hessian spectral norm over random weight samples) and ``T`` the number of steps.

Module map (data flows one way; nothing upstream imports anything downstream):

- ``datafiles``, ``data``, ``models``: dataset files (locations, parsing, downloads);
  datasets, subsets, the synthetic set, batches; the paper's networks and weight
  re-drawing.
- ``curvature``: the loss as a function of the weights (``batches``), Hessian-vector
  products (``operators``), the solvers (``solvers``: Lanczos, power iteration), their
  options (``options``: ``SpectralOptions``), the subsample start (``multifidelity``) and
  ``hessian_spectral_norm`` (``spectral``).
- ``sampling``: weight samples of a model's own initialisation (``transformers`` models
  rebuilt from their config), checked to be re-drawn.
- ``running_max``: Algorithm 2's record: per-sample records, the running max and the
  adaptive stop (``patience``, ``rel_tol``).
- ``smoothness``: Algorithm 2, ``estimate_smoothness`` (K_hat over weight samples).
- ``check``: the safety check of a step size, ``check_step_size`` (k Adam steps from w0
  on a copy, then the loss and the curvature at the end).
- ``stepsize``: the formula ``exact_step_size`` and ``suggest_lr`` (``check_steps=``).
- ``allocator``: ``keep_freed_memory``, a utility below every other module.
- ``integrations``: Lightning and Hugging Face Trainer callbacks (optional imports).
- ``paper``: the reproduction harness (figures, scales, schedules, training, the LR
  range test, results, report, plotting, the Ray executor).
- ``userspec``: the user's objects from ``module:attribute`` or ``file.py:attribute``.
- ``cli``: the ``exactlr`` command (``lr_command``: ``exactlr lr``).

"""

import importlib
from typing import TYPE_CHECKING, Any

from exactlr._version import __version__

# The names below are imported on first use (PEP 562), so that `import exactlr` (and the
# `exactlr` command's start, which handles Ctrl-C from its first line) does not wait for
# torch.
_EXPORTS = {
    "keep_freed_memory": "exactlr.allocator",
    "CheckReport": "exactlr.check",
    "check_step_size": "exactlr.check",
    "EigenResult": "exactlr.curvature",
    "HessianOperator": "exactlr.curvature",
    "SpectralNormResult": "exactlr.curvature",
    "full_loss": "exactlr.curvature",
    "hessian_spectral_norm": "exactlr.curvature",
    "lanczos": "exactlr.curvature",
    "power_iteration": "exactlr.curvature",
    "SampleRecord": "exactlr.smoothness",
    "SmoothnessEstimate": "exactlr.smoothness",
    "estimate_smoothness": "exactlr.smoothness",
    "LRSuggestion": "exactlr.stepsize",
    "exact_step_size": "exactlr.stepsize",
    "suggest_lr": "exactlr.stepsize",
}

if TYPE_CHECKING:
    from exactlr.allocator import keep_freed_memory
    from exactlr.check import CheckReport, check_step_size
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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'exactlr' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [
    "CheckReport",
    "EigenResult",
    "HessianOperator",
    "LRSuggestion",
    "SampleRecord",
    "SmoothnessEstimate",
    "SpectralNormResult",
    "__version__",
    "check_step_size",
    "estimate_smoothness",
    "exact_step_size",
    "full_loss",
    "hessian_spectral_norm",
    "keep_freed_memory",
    "lanczos",
    "power_iteration",
    "suggest_lr",
]
