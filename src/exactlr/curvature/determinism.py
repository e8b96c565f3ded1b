"""Is the loss a deterministic function of the weights? A probe, and a diagnosis.

A random operator has no eigenvalues: if the loss or a Hessian-vector product differs
between two evaluations at the same weights (dropout left on, noise drawn in a forward
pass, a buffer updated by the forward), every solver result is meaningless.
:func:`check_repeatable` compares two evaluations; when they differ,
:func:`random_ops` runs the forward pass once more under a dispatch mode that records
every random ATen op and the module that called it, so the error names the cause.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

#: ATen ops that draw random numbers (overload packets, in-place forms included).
RANDOM_OPS = frozenset(
    {
        "bernoulli",
        "bernoulli_",
        "native_dropout",
        "dropout",
        "feature_dropout",
        "alpha_dropout",
        "rand",
        "rand_like",
        "randn",
        "randn_like",
        "randint",
        "randint_like",
        "randperm",
        "normal",
        "normal_",
        "uniform_",
        "exponential_",
        "geometric_",
        "cauchy_",
        "log_normal_",
        "random_",
        "multinomial",
        "poisson",
        "_fused_dropout",
        "_scaled_dot_product_flash_attention_for_cpu",
    }
)


class _RandomOpRecorder(TorchDispatchMode):
    """Counts random ATen ops by the innermost module running when each was called."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.stack: list[str] = []
        self.seen: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        is_random = name in RANDOM_OPS and (
            "dropout" not in name or _dropout_p(name, args, kwargs) > 0
        )
        if is_random:
            where = self.stack[-1] if self.stack else "outside the model's modules"
            self.seen[f"aten.{name} in {where}"] += 1
        return func(*args, **(kwargs or {}))


def _dropout_p(name: str, args: tuple, kwargs: dict | None) -> float:
    """The dropout probability of a dropout op's call (1 when it cannot be read)."""
    kwargs = kwargs or {}
    if name == "_scaled_dot_product_flash_attention_for_cpu":
        p = kwargs.get("dropout_p", args[3] if len(args) > 3 else 0.0)
    else:
        p = kwargs.get("p", args[1] if len(args) > 1 else 1.0)
    train = kwargs.get("train", args[2] if len(args) > 2 else True)
    return float(p) if train is not False else 0.0


def random_ops(model: nn.Module, forward: Callable[[], object]) -> list[str]:
    """The random ops ``forward()`` calls, as ``"aten.op in path (Class)"``, by frequency."""
    recorder = _RandomOpRecorder(model)
    handles = []
    for path, module in model.named_modules():
        label = f"{path or '<the model>'} ({type(module).__name__})"

        def push(_m: nn.Module, _a: object, label: str = label) -> None:
            recorder.stack.append(label)

        def pop(_m: nn.Module, _a: object, _o: object) -> None:
            if recorder.stack:
                recorder.stack.pop()

        handles.append(module.register_forward_pre_hook(push))
        handles.append(module.register_forward_hook(pop))
    try:
        with torch.no_grad(), recorder:
            forward()
    finally:
        for handle in handles:
            handle.remove()
    return [f"{site} ({count}x)" for site, count in recorder.seen.most_common()]


def relative_difference(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / max(||a||, tiny)`` in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / a.norm().clamp_min(torch.finfo(torch.float64).tiny))


def repeat_tolerance(dtype: torch.dtype) -> float:
    """Relative difference allowed between two evaluations: rounding of a reduction
    order that differs (GPU atomics), far below any random effect."""
    return 1000 * torch.finfo(dtype).eps


def nondeterminism_error(what: str, difference: float, causes: list[str]) -> ValueError:
    """The error for a loss or product that changed between two evaluations."""
    if causes:
        cause = "random ops in the forward pass: " + "; ".join(causes[:5])
        advice = (
            "turn that randomness off in eval mode (modules gated on self.training are "
            "switched off already) or make it a function of the weights"
        )
    else:
        cause = "no random op was seen, so a nondeterministic kernel or state that "
        cause += "changes between calls (a buffer updated in forward)"
        advice = "try torch.use_deterministic_algorithms(True) or remove the state change"
    return ValueError(
        f"the {what} at the same weights differs between two evaluations (relative "
        f"difference {difference:.2e}): the loss is not a deterministic function of the "
        f"weights, so its Hessian has no eigenvalues. Cause: {cause}. Fix: {advice}; or "
        "pass check_determinism=False to skip this check"
    )
