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
import importlib
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.optim import lr_scheduler

__all__ = [
    "CONSTANT_LRS",
    "METHOD_GROUPS",
    "PARAMFREE_OPTIMIZERS",
    "SCHEDULERS",
    "SCHEDULER_BASE_LR",
    "TUNED_LRS",
    "MethodSpec",
    "build_optimizer",
    "build_scheduler",
    "constant_methods",
    "finder_methods",
    "method_specs",
    "needs_train_eval",
    "ours_methods",
    "paramfree_methods",
    "scheduler_methods",
    "step_size_for",
    "tuned_methods",
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
#: Base LRs searched for the tuned schedulers (issue "beyond the paper").
TUNED_LRS: tuple[float, ...] = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)
METHOD_GROUPS: tuple[str, ...] = (
    "schedulers",
    "constants",
    "ours",
    "paramfree",
    "lr_finder",
    "tuned",
)
KINDS: tuple[str, ...] = ("ours", "constant", "scheduler", "paramfree", "lr_finder")

#: Parameter-free optimizers: name -> (legend, PyPI package, published default LR).
PARAMFREE_OPTIMIZERS: dict[str, tuple[str, str, float]] = {
    "prodigy": ("Prodigy", "prodigyopt", 1.0),
    "dadapt_adam": ("D-Adapt Adam", "dadaptation", 1.0),
    "schedulefree_adamw": ("Schedule-Free AdamW", "schedulefree", 0.0025),
}
#: Every optimizer name a method may carry.
OPTIMIZERS: tuple[str, ...] = ("adam", *PARAMFREE_OPTIMIZERS)

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
            "const_1e-05", a scheduler name from `SCHEDULERS` (base LR 0.01), a tuned
            scheduler "<scheduler>_lr<lr:.0e>" (e.g. "cosine_lr3e-03"), a parameter-free
            optimizer from `PARAMFREE_OPTIMIZERS`, or "lr_finder".
        kind: "ours", "constant", "scheduler", "paramfree" (a parameter-free optimizer
            at its published defaults) or "lr_finder" (Adam at the LR range test's
            suggestion, constant).
        lr: Initial LR (the base LR for schedulers; the optimizer's own LR argument for
            parameter-free optimizers).
        scheduler: The scheduler name when `kind == "scheduler"`, else None.
        optimizer: "adam" (torch.optim.Adam) for every kind but "paramfree", whose
            optimizer is one of `PARAMFREE_OPTIMIZERS`.
    """

    name: str
    kind: str
    lr: float
    scheduler: str | None = None
    optimizer: str = "adam"

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
        if self.kind == "paramfree" and self.optimizer not in PARAMFREE_OPTIMIZERS:
            raise ValueError(
                f"method {self.name!r}: unknown parameter-free optimizer="
                f"{self.optimizer!r}; valid: {tuple(PARAMFREE_OPTIMIZERS)}"
            )
        if self.kind != "paramfree" and self.optimizer != "adam":
            raise ValueError(
                f"method {self.name!r} of kind={self.kind!r} uses Adam, not "
                f"optimizer={self.optimizer!r}"
            )

    @property
    def label(self) -> str:
        """Legend text, e.g. "Ours (0.045)", "Ours x 2 (0.09)", "LR 0.1", "Cosine",
        "Cosine (base 0.003)", "Prodigy", "LR finder (0.0021)"."""
        if self.kind == "scheduler":
            assert self.scheduler is not None
            label = _SCHEDULER_LABELS[self.scheduler]
            if math.isclose(self.lr, SCHEDULER_BASE_LR, rel_tol=1e-9):
                return label
            return f"{label} (base {self.lr:g})"
        if self.kind == "constant":
            return f"LR {self.lr:g}"
        if self.kind == "paramfree":
            return PARAMFREE_OPTIMIZERS[self.optimizer][0]
        if self.kind == "lr_finder":
            return f"LR finder ({self.lr:.2g})"
        prefix = _OURS_VARIANTS.get(self.name, (1.0, "Ours"))[1]
        return f"{prefix} ({self.lr:.2g})"

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form; inverse of `from_dict`.

        `optimizer` is left out when it is "adam", so that the configs (and so the
        result files and checkpoint fingerprints) of Adam runs are unchanged.
        """
        data = asdict(self)
        if data["optimizer"] == "adam":
            del data["optimizer"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodSpec:
        """Builds a spec from `to_dict`'s output."""
        return cls(
            name=str(data["name"]),
            kind=str(data["kind"]),
            lr=float(data["lr"]),
            scheduler=data.get("scheduler"),
            optimizer=str(data.get("optimizer", "adam")),
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


def paramfree_methods() -> list[MethodSpec]:
    """Prodigy, D-Adaptation Adam and Schedule-Free AdamW, each at its published LR."""
    return [
        MethodSpec(name=name, kind="paramfree", lr=default_lr, optimizer=name)
        for name, (_, _, default_lr) in PARAMFREE_OPTIMIZERS.items()
    ]


def finder_methods(finder_lr: float) -> list[MethodSpec]:
    """Adam at the constant LR suggested by the LR range test."""
    _check_lr("finder_lr", finder_lr)
    return [MethodSpec(name="lr_finder", kind="lr_finder", lr=float(finder_lr))]


def tuned_methods() -> list[MethodSpec]:
    """Every scheduler at every base LR of `TUNED_LRS` (7 x 7 runs).

    The base LR 0.01 runs are the paper's schedulers themselves (same name, same result
    file); the others are named "<scheduler>_lr<lr:.0e>", e.g. "cosine_lr3e-03".
    """
    methods = []
    for name in SCHEDULERS:
        for lr in TUNED_LRS:
            paper = math.isclose(lr, SCHEDULER_BASE_LR, rel_tol=1e-9)
            run_name = name if paper else f"{name}_lr{lr:.0e}"
            methods.append(MethodSpec(name=run_name, kind="scheduler", lr=lr, scheduler=name))
    return methods


def method_specs(group: str, ours_lr: float, *, finder_lr: float | None = None) -> list[MethodSpec]:
    """The methods a figure compares.

    Args:
        group: "schedulers" (ours + the 7 schedulers), "constants" (ours, ours x 2,
            ours / 2 + the 5 constant LRs), "ours" (ours only), "paramfree" (the three
            parameter-free optimizers), "lr_finder" (Adam at the range test's LR) or
            "tuned" (the 7 schedulers x the 7 base LRs of `TUNED_LRS`).
        ours_lr: Our LR alpha.
        finder_lr: The range test's suggestion (needed for "lr_finder" only; a
            placeholder is fine for planning, run names do not depend on it).

    Returns:
        The methods, ours first where ours is in the group.

    Raises:
        ValueError: Unknown `group`, or a bad `ours_lr` / `finder_lr`.
    """
    if group == "schedulers":
        return ours_methods(ours_lr) + scheduler_methods()
    if group == "constants":
        return ours_methods(ours_lr, variants=True) + constant_methods()
    if group == "ours":
        return ours_methods(ours_lr)
    if group == "paramfree":
        return paramfree_methods()
    if group == "lr_finder":
        if finder_lr is None:
            raise ValueError("method group 'lr_finder' needs finder_lr (run the range test)")
        return finder_methods(finder_lr)
    if group == "tuned":
        return tuned_methods()
    raise ValueError(f"unknown method group={group!r}; valid groups: {METHOD_GROUPS}")


def _import_optional(package: str, optimizer: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise ImportError(
            f"optimizer {optimizer!r} needs the package {package!r}: pip install 'exactlr[beyond]'"
        ) from err


def build_optimizer(
    method: MethodSpec,
    params: list[torch.nn.Parameter],
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """The optimizer of a method: `torch.optim.Adam` or a parameter-free optimizer.

    Adam runs use `torch.optim.Adam(params, lr, betas, eps, weight_decay=0)`. The
    parameter-free optimizers use their packages' published defaults (no weight decay,
    no warm-up), with the run's betas and eps (their defaults are Adam's):

    - "prodigy": `prodigyopt.Prodigy(lr=1.0)`;
    - "dadapt_adam": `dadaptation.DAdaptAdam(lr=1.0)`;
    - "schedulefree_adamw": `schedulefree.AdamWScheduleFree(lr=0.0025)`. It has two
      points: call `optimizer.train()` before training steps and `optimizer.eval()`
      before evaluating (`exactlr.paper.training.train_run` does).

    Raises:
        ImportError: The optimizer's package is missing (names the extra to install).
    """
    if method.optimizer == "adam":
        return torch.optim.Adam(params, lr=method.lr, betas=betas, eps=eps, weight_decay=0.0)
    package = PARAMFREE_OPTIMIZERS[method.optimizer][1]
    module = _import_optional(package, method.optimizer)
    if method.optimizer == "prodigy":
        return module.Prodigy(params, lr=method.lr, betas=betas, eps=eps)
    if method.optimizer == "dadapt_adam":
        return module.DAdaptAdam(params, lr=method.lr, betas=betas, eps=eps)
    return module.AdamWScheduleFree(params, lr=method.lr, betas=betas, eps=eps)


def needs_train_eval(method: MethodSpec) -> bool:
    """Whether the method's optimizer has train / eval modes (Schedule-Free)."""
    return method.optimizer == "schedulefree_adamw"


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
