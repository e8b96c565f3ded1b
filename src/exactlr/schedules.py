"""The compared methods: ours, constant learning rates and the authors' LR schedulers.

Every scheduler is one of `torch.optim.lr_scheduler`'s, configured as in the authors'
public code (PAPER.md section 4) with base LR `SCHEDULER_BASE_LR = 0.01`, horizons scaled
to the run's number of epochs. With `t` the number of completed epochs (the LR in force
during epoch `t + 1`) and `E` the number of epochs:

| name | torch scheduler | lr_t |
|---|---|---|
| linear | LinearLR(1, 0.1, total_iters=E) | 0.01 (1 - 0.9 min(t, E) / E) |
| step | StepLR(step_size=s(E), gamma=0.1) | 0.01 * 0.1 ** (t // s(E)) |
| onecycle | OneCycleLR(max_lr=0.01, total_steps=E * batches) | per batch, from 0.01/25 |
| sqrt | LambdaLR(1 / sqrt(t + 1)) | 0.01 / sqrt(t + 1) |
| inverse_time | LambdaLR(1 / (1 + 0.01 t)) | 0.01 / (1 + 0.01 t) |
| cosine | CosineAnnealingLR(T_max=E, eta_min=0.005) | 0.005 + 0.005 (1 + cos(pi t / E)) / 2 |
| exponential | ExponentialLR(gamma=0.9) | 0.01 * 0.9 ** t |

Deviations from the authors' code, on purpose:
- sqrt: the authors write 0.01 / sqrt(t), undefined at t = 0; we use t + 1.
- step: the authors use step sizes 10 / 20 / 40 for 20 / 50 / 100 epochs, which is no
  single formula (0.4 E gives 8 for E = 20); those three are kept verbatim and any other E
  uses `max(1, round(0.4 E))`.
- onecycle's `max_lr` and cosine's `eta_min` are taken relative to the optimizer's LR
  (max_lr = base, eta_min = base / 2), which equals the authors' 0.01 / 0.005 at base 0.01.

Example:
    >>> opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=SCHEDULER_BASE_LR)
    >>> scheduler, per_batch = build_scheduler("step", opt, epochs=100, steps_per_epoch=1)
    >>> per_batch
    False
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.optim import lr_scheduler

__all__ = [
    "CONSTANT_LRS",
    "METHOD_GROUPS",
    "SCHEDULERS",
    "SCHEDULER_BASE_LR",
    "MethodSpec",
    "build_scheduler",
    "constant_methods",
    "method_specs",
    "ours_methods",
    "scheduler_methods",
    "step_size_for",
]

SCHEDULERS: tuple[str, ...] = (
    "linear",
    "step",
    "onecycle",
    "sqrt",
    "inverse_time",
    "cosine",
    "exponential",
)
CONSTANT_LRS: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
SCHEDULER_BASE_LR = 0.01
METHOD_GROUPS: tuple[str, ...] = ("schedulers", "constants", "ours")
KINDS: tuple[str, ...] = ("ours", "constant", "scheduler")

_SCHEDULER_LABELS = {
    "linear": "Linear",
    "step": "Step",
    "onecycle": "One Cycle",
    "sqrt": "Square Root",
    "inverse_time": "Inverse Time",
    "cosine": "Cosine",
    "exponential": "Exponential",
}
# The authors' StepLR step sizes, keyed by number of epochs (PAPER.md section 4).
_AUTHORS_STEP_SIZES = {20: 10, 50: 20, 100: 40}
# Legend of the ours variants: name -> (factor on ours_lr, legend prefix).
_OURS_VARIANTS = {
    "ours": (1.0, "Ours"),
    "ours_x2": (2.0, "Ours x 2"),
    "ours_half": (0.5, "Ours / 2"),
}


@dataclass(frozen=True)
class MethodSpec:
    """One compared method.

    Attributes:
        name: File-name-safe id: "ours", "ours_x2", "ours_half", "const_1e-01" ..
            "const_1e-05", or a scheduler name from `SCHEDULERS`.
        kind: "ours", "constant" or "scheduler".
        lr: Initial LR (the base LR for schedulers).
        scheduler: The scheduler name when `kind == "scheduler"`, else None.
    """

    name: str
    kind: str
    lr: float
    scheduler: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown method kind={self.kind!r}; valid kinds: {KINDS}")
        if self.kind == "scheduler" and self.scheduler not in SCHEDULERS:
            raise ValueError(
                f"method {self.name!r}: unknown scheduler={self.scheduler!r}; "
                f"valid schedulers: {SCHEDULERS}"
            )
        if self.kind != "scheduler" and self.scheduler is not None:
            raise ValueError(
                f"method {self.name!r} of kind={self.kind!r} cannot have "
                f"scheduler={self.scheduler!r}"
            )

    @property
    def label(self) -> str:
        """Legend text, e.g. "Ours (0.045)", "Ours x 2 (0.09)", "LR 0.1", "Cosine"."""
        if self.kind == "scheduler":
            assert self.scheduler is not None
            return _SCHEDULER_LABELS[self.scheduler]
        if self.kind == "constant":
            return f"LR {self.lr:g}"
        prefix = _OURS_VARIANTS.get(self.name, (1.0, "Ours"))[1]
        return f"{prefix} ({self.lr:.2g})"

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form; inverse of `from_dict`."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodSpec:
        """Builds a spec from `to_dict`'s output."""
        return cls(
            name=str(data["name"]),
            kind=str(data["kind"]),
            lr=float(data["lr"]),
            scheduler=data.get("scheduler"),
        )


def _check_lr(name: str, lr: float) -> None:
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"{name}={lr!r} must be a positive finite learning rate")


def ours_methods(ours_lr: float, *, variants: bool = False) -> list[MethodSpec]:
    """Our constant LR alpha, and optionally 2 alpha and alpha / 2.

    Args:
        ours_lr: alpha = sqrt(2 L(w0) / (K_hat T)).
        variants: Also return "ours_x2" (2 alpha) and "ours_half" (alpha / 2).

    Returns:
        `[ours]` or `[ours, ours_x2, ours_half]`.

    Raises:
        ValueError: `ours_lr` is not positive and finite.
    """
    _check_lr("ours_lr", ours_lr)
    names = list(_OURS_VARIANTS) if variants else ["ours"]
    return [
        MethodSpec(name=name, kind="ours", lr=_OURS_VARIANTS[name][0] * float(ours_lr))
        for name in names
    ]


def scheduler_methods() -> list[MethodSpec]:
    """The seven schedulers of `SCHEDULERS`, each with base LR `SCHEDULER_BASE_LR`."""
    return [
        MethodSpec(name=name, kind="scheduler", lr=SCHEDULER_BASE_LR, scheduler=name)
        for name in SCHEDULERS
    ]


def constant_methods() -> list[MethodSpec]:
    """Constant LRs 1e-1 .. 1e-5, named "const_1e-01" .. "const_1e-05"."""
    return [MethodSpec(name=f"const_{lr:.0e}", kind="constant", lr=lr) for lr in CONSTANT_LRS]


def method_specs(group: str, ours_lr: float) -> list[MethodSpec]:
    """The methods a figure compares.

    Args:
        group: "schedulers" (ours + the 7 schedulers), "constants" (ours, ours x 2,
            ours / 2 + the 5 constant LRs) or "ours" (ours only).
        ours_lr: Our LR alpha.

    Returns:
        The methods, ours first.

    Raises:
        ValueError: Unknown `group`, or a bad `ours_lr`.
    """
    if group == "schedulers":
        return ours_methods(ours_lr) + scheduler_methods()
    if group == "constants":
        return ours_methods(ours_lr, variants=True) + constant_methods()
    if group == "ours":
        return ours_methods(ours_lr)
    raise ValueError(f"unknown method group={group!r}; valid groups: {METHOD_GROUPS}")


def step_size_for(epochs: int) -> int:
    """StepLR's step size: the authors' 10 / 20 / 40 for 20 / 50 / 100 epochs, else
    `max(1, round(0.4 * epochs))`."""
    return _AUTHORS_STEP_SIZES.get(epochs, max(1, round(0.4 * epochs)))


# Module-level (picklable) LR multipliers for LambdaLR: runs may go to other processes.
def _sqrt_decay(t: int) -> float:
    """1 / sqrt(t + 1): the authors' 1 / sqrt(t), shifted so that t = 0 is defined."""
    return 1.0 / math.sqrt(t + 1)


def _inverse_time_decay(t: int, rate: float = 0.01) -> float:
    """1 / (1 + rate t)."""
    return 1.0 / (1.0 + rate * t)


def build_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    steps_per_epoch: int,
) -> tuple[lr_scheduler.LRScheduler, bool]:
    """Builds one of the authors' schedulers (table in the module docstring).

    The optimizer's current LR is the base LR (0.01 in the paper). Call
    `scheduler.step()` after every `optimizer.step()` when `per_batch`, else once after
    each epoch.

    Args:
        name: One of `SCHEDULERS`.
        optimizer: The optimizer whose LR is scheduled.
        epochs: Number of training epochs E (the schedules' horizon).
        steps_per_epoch: Optimizer steps per epoch (used by One Cycle only).

    Returns:
        `(scheduler, per_batch)`; `per_batch` is True for "onecycle" only.

    Raises:
        ValueError: Unknown `name`, or `epochs` / `steps_per_epoch` below 1.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler name={name!r}; valid names: {SCHEDULERS}")
    if epochs < 1:
        raise ValueError(f"epochs={epochs} must be at least 1")
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch={steps_per_epoch} must be at least 1")
    base_lr = optimizer.param_groups[0]["lr"]
    if name == "onecycle":
        return (
            lr_scheduler.OneCycleLR(
                optimizer, max_lr=base_lr, total_steps=epochs * steps_per_epoch
            ),
            True,
        )
    scheduler: lr_scheduler.LRScheduler
    if name == "linear":
        scheduler = lr_scheduler.LinearLR(
            optimizer, start_factor=1.0, end_factor=0.1, total_iters=epochs
        )
    elif name == "step":
        scheduler = lr_scheduler.StepLR(optimizer, step_size=step_size_for(epochs), gamma=0.1)
    elif name == "exponential":
        scheduler = lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
    elif name == "sqrt":
        scheduler = lr_scheduler.LambdaLR(optimizer, _sqrt_decay)
    elif name == "inverse_time":
        scheduler = lr_scheduler.LambdaLR(
            optimizer, functools.partial(_inverse_time_decay, rate=0.01)
        )
    else:  # cosine
        scheduler = lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=0.5 * base_lr)
    return scheduler, False
