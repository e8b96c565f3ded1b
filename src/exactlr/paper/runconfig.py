"""A run's configuration, its per-epoch metrics and its outcome.

:class:`TrainConfig` holds everything that determines a run's result besides w0 (its
:meth:`TrainConfig.run_name` says all of it); :meth:`TrainConfig.total_steps` is the one
place T = epochs x steps per epoch is computed, for the formula and for training alike.
:class:`EpochMetrics` is one epoch's row and :class:`RunResult` a run's outcome.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from exactlr.data import ArrayDataset, validate_labels
from exactlr.paper.schedules import MethodSpec

__all__ = [
    "METRIC_FIELDS",
    "OPTIONAL_METRIC_FIELDS",
    "REQUIRED_METRIC_FIELDS",
    "EpochMetrics",
    "RunResult",
    "TrainConfig",
    "check_dataset",
    "first_samples",
    "steps_per_epoch",
    "validate_config",
]


@dataclass(frozen=True)
class TrainConfig:
    """One run: everything that determines its result (besides w0, given by the caller)."""

    dataset: str
    """Dataset name: "mnist", "cifar10" or "synthetic"."""
    subset: str
    """"mini" (the paper's small subsets) or "full"."""
    model: str
    """Model name for `exactlr.models.build_model`, e.g. "fc3x1000", "lenet", "vgg9"."""
    method: MethodSpec
    """The compared method (ours, a constant LR or a scheduler)."""
    epochs: int
    """Number of epochs E (full batch: E optimizer steps)."""
    batch_size: int | None
    """Mini-batch size; None for full-batch training."""
    seed: int = 0
    """Seed of w0 (used by the caller) and of the batch shuffling."""
    init: str = "paper"
    """Initialisation preset of the model ("paper" or "pytorch")."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's betas."""
    eps: float = 1e-8
    """Adam's eps (the paper's rho)."""
    num_train: int | None = None
    """Cap on training samples (the first `num_train` are used); None = all of the subset."""
    curvature_every: int = 0
    """Measure the Hessian spectral norm of the full training loss every this many epochs
    (metric `sharpness`, epoch 0 included); 0: never."""
    data_seed: int = 0
    """Seed of the data draw (which images form mini-MNIST / mini-CIFAR-10, or the
    synthetic set); `seed` draws w0 and the batch order."""

    def run_name(self) -> str:
        """Deterministic, file-name-safe name, e.g. "mnist-mini__fc3x1000__ours__seed0".

        Suffixes only for non-default settings: "__e{epochs}" (epochs != 100),
        "__b{batch_size}", "__eps{eps:g}" (eps != 1e-8), "__betas{b1:g}-{b2:g}" (betas
        != (0.9, 0.999)), "__n{num_train}", "__init-{init}" (init != "paper"),
        "__curv{k}" (curvature_every = k > 0), "__data{k}" (data_seed = k != 0). Every
        field that determines the result (besides w0) is in the name; the method's LR is
        part of its name.
        """
        name = f"{self.dataset}-{self.subset}__{self.model}__{self.method.name}__seed{self.seed}"
        if self.epochs != 100:
            name += f"__e{self.epochs}"
        if self.batch_size is not None:
            name += f"__b{self.batch_size}"
        if self.eps != 1e-8:
            name += f"__eps{self.eps:g}"
        if tuple(self.betas) != (0.9, 0.999):
            name += f"__betas{self.betas[0]:g}-{self.betas[1]:g}"
        if self.num_train is not None:
            name += f"__n{self.num_train}"
        if self.init != "paper":
            name += f"__init-{self.init}"
        if self.curvature_every > 0:
            name += f"__curv{self.curvature_every}"
        if self.data_seed != 0:
            name += f"__data{self.data_seed}"
        return name

    def total_steps(self, num_samples: int) -> int:
        """T = epochs x steps per epoch, the horizon of the formula and of training.

        Args:
            num_samples: Size of the training set before the ``num_train`` cap.
        """
        if self.num_train is not None:
            num_samples = min(num_samples, self.num_train)
        return self.epochs * steps_per_epoch(num_samples, self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (the method as a dict, betas as a list).

        `curvature_every` and `data_seed` are left out when 0, so that configs written
        before they existed (and their checkpoint fingerprints) are unchanged.
        """
        data = asdict(self)
        data["method"] = self.method.to_dict()
        data["betas"] = list(self.betas)
        for name in ("curvature_every", "data_seed"):
            if data[name] == 0:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`; unknown keys raise `ValueError`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}")
        kwargs = dict(data)
        method = kwargs["method"]
        kwargs["method"] = (
            method if isinstance(method, MethodSpec) else MethodSpec.from_dict(method)
        )
        if "betas" in kwargs:
            beta1, beta2 = kwargs["betas"]
            kwargs["betas"] = (float(beta1), float(beta2))
        return cls(**kwargs)


def steps_per_epoch(num_samples: int, batch_size: int | None) -> int:
    """Optimizer steps per epoch: 1 full batch (``batch_size`` None), else
    ceil(num_samples / batch_size) (``make_batches`` keeps a last, smaller batch)."""
    return 1 if batch_size is None else -(-num_samples // batch_size)


def first_samples(dataset: ArrayDataset, count: int | None) -> ArrayDataset:
    """The first ``count`` samples of ``dataset`` (all of it when None or larger): how
    ``TrainConfig.num_train`` caps a training set, everywhere."""
    if count is None or count >= len(dataset):
        return dataset
    return ArrayDataset(
        dataset.inputs[:count], dataset.targets[:count], dataset.num_classes, dataset.name
    )


def validate_config(cfg: TrainConfig) -> None:
    """Checks a config's values up front.

    Raises:
        ValueError: Naming the value: `epochs < 1`, `batch_size < 1`, `num_train < 1`,
            `eps <= 0`, a non-positive or non-finite LR, betas outside [0, 1), an unknown
            subset.
    """
    if cfg.epochs < 1:
        raise ValueError(f"epochs={cfg.epochs} must be at least 1")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise ValueError(f"batch_size={cfg.batch_size} must be at least 1 (or None)")
    if cfg.num_train is not None and cfg.num_train < 1:
        raise ValueError(f"num_train={cfg.num_train} must be at least 1 (or None)")
    if not (math.isfinite(cfg.eps) and cfg.eps > 0):
        raise ValueError(f"eps={cfg.eps} must be positive and finite")
    lr = cfg.method.lr
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr} of method {cfg.method.name!r} must be positive and finite")
    if len(cfg.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.betas):
        raise ValueError(f"betas={cfg.betas} must be two values in [0, 1)")
    if cfg.subset not in ("mini", "full"):
        raise ValueError(f"subset={cfg.subset!r} must be 'mini' or 'full'")
    if isinstance(cfg.data_seed, bool) or not isinstance(cfg.data_seed, int) or cfg.data_seed < 0:
        raise ValueError(f"data_seed={cfg.data_seed!r} must be an integer >= 0")
    if not isinstance(cfg.curvature_every, int) or cfg.curvature_every < 0:
        raise ValueError(
            f"curvature_every={cfg.curvature_every!r} must be a non-negative integer "
            "(0: never measure the curvature)"
        )


@dataclass
class EpochMetrics:
    """Metrics after epoch `epoch` (0 = at w0, before training)."""

    epoch: int
    """Epoch index e; 0 is the initial point w0."""
    grad_norm: float
    """sqrt(mean over the epoch's training batches of ||g_b||^2) (the paper's)."""
    grad_norm_full: float
    """||grad L(w_e)||: exact full training-loss gradient norm at the end weights."""
    train_loss: float
    """L(w_e), the full training loss at the end weights."""
    train_acc: float
    """Training accuracy at the end weights, in [0, 1]."""
    test_loss: float
    """Test loss at the end weights."""
    test_acc: float
    """Test accuracy at the end weights, in [0, 1]."""
    lr: float
    """LR in force during the epoch (mean over its steps for per-batch schedulers);
    at epoch 0 the initial LR."""
    seconds: float
    """Cumulative wall time since the start of the run, metrics included."""
    gamma_neg_frac: float = math.nan
    """The paper's Gamma_t diagnostic: mean over the epoch's steps t of the fraction of
    coordinates i where sqrt(v_hat_t,i) / alpha_t < sqrt(v_hat_t-1,i) / alpha_t-1, i.e.
    where Gamma_t = sqrt(v_t) / alpha_t - sqrt(v_t-1) / alpha_t-1 is negative (v_hat:
    Adam's bias-corrected second moment, v_hat_0 = 0). NaN at epoch 0 and for
    optimizers other than Adam."""
    sharpness: float = math.nan
    """||Hessian of L(w_e)||_2 = max(|lambda_max|, |lambda_min|) when measured
    (`TrainConfig.curvature_every`), else NaN."""

    def is_finite(self) -> bool:
        """True when no loss or gradient norm is NaN or inf."""
        values = (self.grad_norm, self.grad_norm_full, self.train_loss, self.test_loss)
        return all(math.isfinite(v) for v in values)


#: Names of the per-epoch metric fields, in order.
METRIC_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(EpochMetrics))
#: Metric fields added after the first result files were written: optional on load.
OPTIONAL_METRIC_FIELDS: tuple[str, ...] = ("gamma_neg_frac", "sharpness")
#: Metric fields every result file holds.
REQUIRED_METRIC_FIELDS: tuple[str, ...] = tuple(
    name for name in METRIC_FIELDS if name not in OPTIONAL_METRIC_FIELDS
)


@dataclass
class RunResult:
    """The outcome of `train_run`."""

    config: TrainConfig
    """The run's config."""
    metrics: list[EpochMetrics]
    """One entry per epoch 0..E (fewer when the run diverged)."""
    diverged_at: int | None
    """First epoch whose loss or gradient was NaN/inf (its metrics are the last), or None."""
    seconds: float
    """Total wall time."""
    device: str = field(default="cpu")
    """Device the run used, e.g. "cpu", "cuda:0"."""
    total_steps: int | None = None
    """T = epochs x steps per epoch the run was planned for (`TrainConfig.total_steps`)."""

    def metrics_dict(self) -> dict[str, list[float]]:
        """Metrics as columns: field name -> list over epochs."""
        return {name: [getattr(m, name) for m in self.metrics] for name in METRIC_FIELDS}


def check_dataset(dataset: ArrayDataset) -> None:
    """Checks that a dataset can be trained on: finite inputs, labels in range.

    Raises:
        ValueError: Naming the dataset: an empty set, a NaN / inf input (with its sample
            index), or a label outside `[0, num_classes)`.
    """
    if len(dataset) == 0:
        raise ValueError(f"dataset {dataset.name!r} is empty")
    if dataset.inputs.is_floating_point():
        finite = torch.isfinite(dataset.inputs.reshape(len(dataset), -1)).all(dim=1)
        if not bool(finite.all()):
            index = int(torch.nonzero(~finite)[0])
            raise ValueError(
                f"dataset {dataset.name!r} has NaN or inf inputs (first at sample {index}); "
                "clean the data before training"
            )
    try:
        validate_labels(dataset.targets, dataset.num_classes)
    except ValueError as err:
        raise ValueError(f"dataset {dataset.name!r}: {err}") from err
