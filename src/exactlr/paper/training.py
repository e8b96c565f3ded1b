"""One training run: Adam with one compared method, per-epoch metrics.

`train_run` trains a copy of the given model (at w0; the caller guarantees the same w0
across methods) with `torch.optim.Adam(lr, betas, eps)`, no weight decay, cross-entropy
(mean), and records after every epoch e = 0..E (0 = at w0, before any step):

- `grad_norm`: the paper's gradient norm, sqrt(mean_b ||g_b||^2) over the epoch's
  training steps b (at e = 0: over the training batches at w0, without stepping).
- `grad_norm_full`: ||grad L(w_e)||, the exact gradient of the full training loss
  L(w) = sum_b (n_b / N) l_b(w) at the epoch's end weights w_e.
- `train_loss`, `train_acc`: L(w_e) and the accuracy of the same forward pass.
- `test_loss`, `test_acc`: on the test set, same mode, no gradient.

Full-data quantities are computed as training computes the loss
(`exactlr.curvature.training_loss_mode`: BatchNorm with batch statistics, no running-stat
updates, Dropout off). With BatchNorm in batch-statistics mode the loss depends on how the
data are split into batches, so the evaluation batches are fixed:

- full batch: the one training batch (the loss is exactly the training objective);
- mini-batch with BatchNorm: `make_batches(train, batch_size)`, unshuffled;
- mini-batch without BatchNorm: chunks of up to `EVAL_CHUNK` samples (the value does not
  depend on the chunking then).

Full batch, the gradient at the end weights of epoch e is the gradient of step e + 1,
so it is computed once and used for both (the run costs E + 1 gradients, not 2E).
Mini-batch, the exact full gradient costs one extra pass over the training set per epoch.

Checkpoints: with `checkpoint_path` and `checkpoint_every=k`, every k-th epoch the run's
state (weights, Adam's state, the scheduler's state, the batch-shuffling generator, the
global torch RNG state, the metrics so far, the elapsed time and, full batch, the pending
gradient) is written atomically to `checkpoint_path`, tagged with a fingerprint of the
config, w0 and the data. A later call with the same fingerprint resumes from it and, on
CPU, ends with exactly the metrics of an uninterrupted run (except `seconds`). The caller
deletes the checkpoint once the run's result is saved.

Example:
    >>> import torch
    >>> from exactlr.data import synthetic_classification
    >>> from exactlr.models import build_model
    >>> from exactlr.paper.schedules import MethodSpec
    >>> from exactlr.paper.training import TrainConfig, train_run
    >>> train, test = synthetic_classification(num_train=200, num_test=50)
    >>> model = build_model("fc1x32", dataset="synthetic", generator=torch.Generator())
    >>> cfg = TrainConfig("synthetic", "mini", "fc1x32", MethodSpec("ours", "ours", 0.01),
    ...                   epochs=3, batch_size=None)
    >>> result = train_run(cfg, model, train, test)
    >>> len(result.metrics)
    4
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exactlr.allocator import keep_freed_memory
from exactlr.curvature import hessian_spectral_norm, training_loss_mode
from exactlr.data import ArrayDataset, make_batches, validate_labels
from exactlr.paper.schedules import MethodSpec, build_optimizer, build_scheduler, needs_train_eval

__all__ = [
    "EVAL_CHUNK",
    "METRIC_FIELDS",
    "OPTIONAL_METRIC_FIELDS",
    "REQUIRED_METRIC_FIELDS",
    "EpochMetrics",
    "RunResult",
    "TrainConfig",
    "adam_scales",
    "check_dataset",
    "gamma_negative_fraction",
    "train_run",
    "validate_config",
]

#: Version of the checkpoint format; a checkpoint of another version is ignored.
CHECKPOINT_FORMAT = 1

#: Largest evaluation chunk (samples) for models whose loss does not depend on batching.
EVAL_CHUNK = 10_000

Batch = tuple[Tensor, Tensor]


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

    def run_name(self) -> str:
        """Deterministic, file-name-safe name, e.g. "mnist-mini__fc3x1000__ours__seed0".

        Suffixes only for non-default settings: "__e{epochs}" (epochs != 100),
        "__b{batch_size}", "__eps{eps:g}" (eps != 1e-8), "__n{num_train}",
        "__init-{init}" (init != "paper"), "__curv{k}" (curvature_every = k > 0).
        """
        name = f"{self.dataset}-{self.subset}__{self.model}__{self.method.name}__seed{self.seed}"
        if self.epochs != 100:
            name += f"__e{self.epochs}"
        if self.batch_size is not None:
            name += f"__b{self.batch_size}"
        if self.eps != 1e-8:
            name += f"__eps{self.eps:g}"
        if self.num_train is not None:
            name += f"__n{self.num_train}"
        if self.init != "paper":
            name += f"__init-{self.init}"
        if self.curvature_every > 0:
            name += f"__curv{self.curvature_every}"
        return name

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (the method as a dict, betas as a list).

        `curvature_every` is left out when 0, so that configs written before it existed
        (and their checkpoint fingerprints) are unchanged.
        """
        data = asdict(self)
        data["method"] = self.method.to_dict()
        data["betas"] = list(self.betas)
        if data["curvature_every"] == 0:
            del data["curvature_every"]
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

    def metrics_dict(self) -> dict[str, list[float]]:
        """Metrics as columns: field name -> list over epochs."""
        return {name: [getattr(m, name) for m in self.metrics] for name in METRIC_FIELDS}


# ------------------------------------------------------------------------------ helpers


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _has_dropout(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules())


def _param_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _grad_sq_norm(params: Sequence[nn.Parameter]) -> Tensor:
    """sum_p ||p.grad||^2 as a 0-d float64 tensor on the parameters' device (no sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=params[0].device)
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads])
    return norms.square().sum()


@dataclass
class _Totals:
    """Device-side accumulators of a pass over data (one `.item()` set per epoch)."""

    loss: Tensor
    correct: Tensor
    count: int

    def mean_loss(self) -> float:
        return float(self.loss.item()) / self.count

    def accuracy(self) -> float:
        return float(self.correct.item()) / self.count


def _forward_totals(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean loss (with graph), summed loss (float64, detached) and number correct."""
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    correct = (logits.detach().argmax(dim=1) == y).sum()
    return loss, loss.detach().double() * len(y), correct


def _full_pass(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    batches: Sequence[Batch],
    *,
    with_grad: bool,
    batch_grad_sq: bool = False,
) -> tuple[_Totals, Tensor | None, Tensor | None]:
    """Size-weighted full loss over `batches` in training-loss mode.

    Returns the totals, ||grad L||^2 (if `with_grad`) and sum_b ||grad l_b||^2 (if
    `batch_grad_sq`). Leaves the full gradient in `p.grad`.
    """
    device = params[0].device
    total = sum(len(y) for _, y in batches)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    batch_sq = torch.zeros((), dtype=torch.float64, device=device) if batch_grad_sq else None
    if with_grad:
        for p in params:
            p.grad = None
    with training_loss_mode(model), torch.set_grad_enabled(with_grad):
        for x, y in batches:
            loss, summed, right = _forward_totals(model, x, y)
            loss_sum += summed
            correct += right
            if not with_grad:
                continue
            weight = len(y) / total
            if batch_sq is None:
                (loss * weight).backward()
            else:
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for p, g in zip(params, grads, strict=True):
                    if g is None:
                        continue
                    batch_sq += torch.linalg.vector_norm(g, dtype=torch.float64).square()
                    if p.grad is None:
                        p.grad = g * weight
                    else:
                        p.grad.add_(g, alpha=weight)
    totals = _Totals(loss_sum, correct, total)
    return totals, (_grad_sq_norm(params) if with_grad else None), batch_sq


def adam_scales(optimizer: torch.optim.Optimizer, lr: float) -> list[Tensor]:
    """Adam's per-coordinate inverse step scale sqrt(v_hat_t) / alpha_t for every parameter.

    v_hat_t = v_t / (1 - beta2^t) is the bias-corrected second moment (`exp_avg_sq`
    after t steps) and alpha_t = `lr`, the LR of step t. Parameters without Adam state
    (no step taken yet) are skipped.

    Args:
        optimizer: An Adam-type optimizer (state `exp_avg_sq` and `step`).
        lr: The LR the last step used.

    Returns:
        One tensor per parameter with state, shaped like the parameter.
    """
    scales = []
    for group in optimizer.param_groups:
        beta2 = float(group["betas"][1])
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state or "exp_avg_sq" not in state:
                continue
            # `step` is a CPU tensor (or a number) unless Adam is capturable: no sync.
            steps = float(state["step"])
            denom = math.sqrt(1.0 - beta2**steps) * lr
            scales.append(state["exp_avg_sq"].sqrt() / denom)
    return scales


def gamma_negative_fraction(previous: Sequence[Tensor] | None, current: Sequence[Tensor]) -> Tensor:
    """Fraction of coordinates where Gamma_t = current - previous is negative.

    Gamma_t = sqrt(v_t) / alpha_t - sqrt(v_{t-1}) / alpha_{t-1} (the paper's eq. 1, with
    `adam_scales` giving each term); Adam's convergence proofs need Gamma_t positive
    semi-definite, i.e. this fraction to be 0.

    Args:
        previous: The scales of step t - 1 (None before the first step: all zeros).
        current: The scales of step t, same shapes.

    Returns:
        A 0-d float64 tensor on the scales' device (no host synchronisation).

    Example:
        >>> prev = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
        >>> cur = [torch.tensor([0.5, 2.5]), torch.tensor([3.0])]
        >>> float(gamma_negative_fraction(prev, cur))  # 1 of 3 coordinates decreased
        0.3333333333333333
    """
    total = sum(t.numel() for t in current)
    if total == 0:
        raise ValueError("gamma_negative_fraction needs at least one coordinate")
    if previous is not None and len(previous) != len(current):
        raise ValueError(f"previous has {len(previous)} tensors but current has {len(current)}")
    count = torch.zeros((), dtype=torch.float64, device=current[0].device)
    for index, cur in enumerate(current):
        below = (cur < 0) if previous is None else (cur < previous[index])
        count += below.sum()
    return count / total


def _optimizer_step(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter]) -> None:
    """`optimizer.step()`; an update too large for the parameters' dtype makes them NaN.

    Adam's step size lr / (1 - beta1^t) can overflow float32 for a huge LR (torch raises
    "value cannot be converted to type float without overflow"): the run has diverged,
    and NaN weights make the epoch's metrics NaN, so it is recorded as such.
    """
    try:
        optimizer.step()
    except RuntimeError as err:
        if "overflow" not in str(err):
            raise
        with torch.no_grad():
            for p in params:
                p.fill_(math.nan)


def _progress(iterable: range, enabled: bool, desc: str) -> Iterator[int]:
    if not enabled:
        return iter(iterable)
    from tqdm.auto import tqdm  # optional dependency, imported only when asked for

    return tqdm(iterable, desc=desc, unit="epoch")


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


def _tensor_digest(digest: Any, tensor: Tensor) -> None:
    tensor = tensor.detach().to("cpu").contiguous()
    digest.update(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    if tensor.numel():
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def _fingerprint(
    cfg: TrainConfig, state: Mapping[str, Tensor], train: ArrayDataset, test: ArrayDataset
) -> str:
    """SHA-256 of what determines a run: config, w0, the data (targets, input sums)."""
    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    for key in sorted(state):
        digest.update(key.encode())
        _tensor_digest(digest, state[key])
    for data in (train, test):
        _tensor_digest(digest, data.targets)
        # A float64 sum, not the bytes: no copy of a big set, enough to tell sets apart.
        total = float(data.inputs.sum(dtype=torch.float64))
        digest.update(f"{tuple(data.inputs.shape)}|{total!r}".encode())
    return digest.hexdigest()


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """`torch.save` to a temporary file in the same folder, then `os.replace`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint at `path` if it belongs to this run, else None (with a warning)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or corrupt: start over rather than crash
        warnings.warn(f"ignoring unreadable checkpoint {path} ({err!r})", stacklevel=3)
        return None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        warnings.warn(f"ignoring checkpoint {path} of another format", stacklevel=3)
        return None
    if state.get("fingerprint") != fingerprint:
        warnings.warn(
            f"ignoring checkpoint {path}: it belongs to another config, w0 or data set",
            stacklevel=3,
        )
        return None
    return state


# ------------------------------------------------------------------------------ train


@keep_freed_memory()
def train_run(
    cfg: TrainConfig,
    model: nn.Module,
    train: ArrayDataset,
    test: ArrayDataset,
    *,
    device: torch.device | str = "cpu",
    progress: bool = False,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    checkpoint_path: Path | str | None = None,
    checkpoint_every: int = 0,
) -> RunResult:
    """Trains a copy of `model` (at w0) with Adam and the method of `cfg`.

    The update is Adam's, w_{k+1} = w_k - lr_k m_hat_k / (sqrt(v_hat_k) + eps), on the
    cross-entropy of each batch; mini-batches are reshuffled every epoch with a
    `torch.Generator` seeded by `cfg.seed` (the global RNG is never used). The data are
    moved to `device` in the model's floating dtype (so a float64 model trains in float64).

    Args:
        cfg: The run's config (validated with `validate_config`).
        model: The model at w0; it is deep-copied and never modified.
        train: Training set (capped to its first `cfg.num_train` samples if set).
        test: Test set.
        device: Device to train on.
        progress: Show a tqdm bar over epochs (needs tqdm).
        on_epoch: Called with each epoch's metrics as soon as they are known (on resume,
            only for the epochs trained after the checkpoint).
        checkpoint_path: File to checkpoint to and resume from (see the module
            docstring); None: no checkpoints.
        checkpoint_every: Save a checkpoint after every `checkpoint_every`-th epoch
            (0: never save; an existing checkpoint is still resumed from).

    Returns:
        The per-epoch metrics (epochs 0..E, or up to the divergence epoch).

    Raises:
        ValueError: A bad config, `batch_size` larger than the training set, NaN / inf
            inputs, labels outside the class range, a negative `checkpoint_every`.
    """
    validate_config(cfg)
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every={checkpoint_every} must be >= 0 (0: never)")
    check_dataset(train)
    check_dataset(test)
    start = time.perf_counter()
    device = torch.device(device)
    net = copy.deepcopy(model).to(device)
    net.train()
    dtype = _param_dtype(net)
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")

    if cfg.num_train is not None and len(train) > cfg.num_train:
        train = ArrayDataset(
            train.inputs[: cfg.num_train],
            train.targets[: cfg.num_train],
            train.num_classes,
            train.name,
        )
    train = train.to(device, dtype=dtype)
    test = test.to(device, dtype=dtype)
    full_batch = cfg.batch_size is None
    batch_size = len(train) if full_batch else cfg.batch_size
    assert batch_size is not None
    if batch_size > len(train):
        raise ValueError(
            f"batch_size={batch_size} is larger than the training set ({len(train)} samples)"
        )
    train_batches = make_batches(train, batch_size)  # unshuffled, fixed
    steps_per_epoch = len(train_batches)
    batchnorm = _has_batchnorm(net)
    if full_batch or batchnorm:
        eval_batches = train_batches
    else:
        eval_batches = make_batches(train, min(EVAL_CHUNK, len(train)))
    test_batches = make_batches(test, len(test) if full_batch else min(batch_size, len(test)))
    # Schedule-Free optimizers evaluate at x and take gradients at y (train/eval modes).
    train_eval = needs_train_eval(cfg.method)
    # Full batch without Dropout: the training forward at w_e is the metrics' forward.
    reuse = full_batch and not _has_dropout(net) and not train_eval
    track_gamma = cfg.method.optimizer == "adam"

    optimizer = build_optimizer(cfg.method, params, betas=cfg.betas, eps=cfg.eps)
    scheduler = None
    per_batch = False
    if cfg.method.kind == "scheduler":
        assert cfg.method.scheduler is not None
        scheduler, per_batch = build_scheduler(
            cfg.method.scheduler, optimizer, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch
        )
    generator = torch.Generator().manual_seed(cfg.seed)

    ckpt_path = Path(checkpoint_path) if checkpoint_path is not None else None
    fingerprint = ""
    resumed: dict[str, Any] | None = None
    if ckpt_path is not None:
        fingerprint = _fingerprint(cfg, model.state_dict(), train, test)
        resumed = _load_checkpoint(ckpt_path, fingerprint)

    def save_checkpoint(epoch: int) -> None:
        assert ckpt_path is not None
        state: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": fingerprint,
            "run_name": cfg.run_name(),
            "epoch": epoch,
            "model": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": (torch.cuda.get_rng_state(device) if device.type == "cuda" else None),
            # Full batch, the next step reuses the gradient of the last full pass.
            "grads": [p.grad for p in params] if reuse else None,
            "gamma_prev": gamma_prev,
            "metrics": [asdict(m) for m in metrics],
            "seconds": time.perf_counter() - start,
        }
        _save_checkpoint(ckpt_path, state)

    def test_metrics() -> _Totals:
        return _full_pass(net, params, test_batches, with_grad=False)[0]

    def sharpness(epoch: int) -> float:
        if cfg.curvature_every <= 0 or epoch % cfg.curvature_every != 0:
            return math.nan
        saved = [p.grad for p in params]  # full batch, the next step reuses them
        res = hessian_spectral_norm(
            net,
            F.cross_entropy,
            eval_batches,
            tol=1e-3,
            target="norm",
            generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch),
        )
        for p, g in zip(params, saved, strict=True):
            p.grad = g
        return res.value

    def record(
        epoch: int,
        grad_norm: float,
        totals: _Totals,
        full_sq: Tensor,
        lr: float,
        gamma: float = math.nan,
    ) -> EpochMetrics:
        tested = test_metrics()
        return EpochMetrics(
            epoch=epoch,
            grad_norm=grad_norm,
            grad_norm_full=math.sqrt(float(full_sq.item())),
            train_loss=totals.mean_loss(),
            train_acc=totals.accuracy(),
            test_loss=tested.mean_loss(),
            test_acc=tested.accuracy(),
            lr=lr,
            seconds=time.perf_counter() - start,
            gamma_neg_frac=gamma,
            sharpness=sharpness(epoch),
        )

    def step() -> None:
        """One optimizer step at the LR in force, added to the epoch's LR sum and (Adam)
        its Gamma_t negative fraction to the epoch's sum."""
        nonlocal gamma_prev, lr_sum, gamma_sum
        lr_used = optimizer.param_groups[0]["lr"]
        lr_sum += lr_used
        _optimizer_step(optimizer, params)
        if track_gamma:
            current = adam_scales(optimizer, lr_used)
            gamma_sum += gamma_negative_fraction(gamma_prev, current)
            gamma_prev = current

    gamma_prev: list[Tensor] | None = None
    metrics: list[EpochMetrics] = []
    if resumed is not None:
        net.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(resumed["scheduler"])
        generator.set_state(resumed["generator"])
        # Restored so that Dropout masks continue as in an uninterrupted run.
        torch.set_rng_state(resumed["torch_rng"])
        if resumed["cuda_rng"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(resumed["cuda_rng"], device)
        if resumed["grads"] is not None:
            for p, g in zip(params, resumed["grads"], strict=True):
                p.grad = None if g is None else g.to(device)
        if resumed.get("gamma_prev") is not None:
            gamma_prev = [t.to(device) for t in resumed["gamma_prev"]]
        metrics = [EpochMetrics(**m) for m in resumed["metrics"]]
        start = time.perf_counter() - float(resumed["seconds"])
        first_epoch = int(resumed["epoch"]) + 1
    else:
        # Epoch 0: at w0. The paper's grad_norm over the (unshuffled) training batches.
        if train_eval:
            optimizer.eval()  # type: ignore[attr-defined]
        same_batches = eval_batches is train_batches
        totals, full_sq, batch_sq = _full_pass(
            net,
            params,
            eval_batches,
            with_grad=True,
            batch_grad_sq=not full_batch and same_batches,
        )
        assert full_sq is not None
        if full_batch:
            batch_sq = full_sq
        elif batch_sq is None:
            batch_sq = _full_pass(net, params, train_batches, with_grad=True, batch_grad_sq=True)[2]
            # That pass overwrote p.grad; the full gradient is not needed mini-batch.
        assert batch_sq is not None
        grad0 = math.sqrt(float(batch_sq.item()) / (1 if full_batch else steps_per_epoch))
        metrics = [record(0, grad0, totals, full_sq, optimizer.param_groups[0]["lr"])]
        if on_epoch is not None:
            on_epoch(metrics[0])
        diverged_at = None if metrics[0].is_finite() else 0
        if diverged_at is not None:
            return RunResult(cfg, metrics, diverged_at, time.perf_counter() - start, str(device))
        first_epoch = 1

    diverged_at = None
    bar = _progress(range(first_epoch, cfg.epochs + 1), progress, cfg.run_name())
    for epoch in bar:
        lr_sum = 0.0
        gamma_sum = torch.zeros((), dtype=torch.float64, device=device)
        if train_eval:
            optimizer.train()  # type: ignore[attr-defined]
        if full_batch:
            if reuse:
                # p.grad holds grad L(w_{e-1}) from the last full pass: this step's gradient.
                grad_norm = metrics[-1].grad_norm_full
            else:
                # Dropout: the training gradient differs from the metrics' (Dropout off).
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(net(train_batches[0][0]), train_batches[0][1]).backward()
                grad_norm = math.sqrt(float(_grad_sq_norm(params).item()))
            step()
            if scheduler is not None:
                scheduler.step()
        else:
            batch_sq = torch.zeros((), dtype=torch.float64, device=device)
            for x, y in make_batches(train, batch_size, shuffle=True, generator=generator):
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(net(x), y).backward()
                batch_sq += _grad_sq_norm(params)
                step()
                if per_batch and scheduler is not None:
                    scheduler.step()
            if scheduler is not None and not per_batch:
                scheduler.step()
            grad_norm = math.sqrt(float(batch_sq.item()) / steps_per_epoch)
        if train_eval:
            optimizer.eval()  # type: ignore[attr-defined]
        totals, full_sq, _ = _full_pass(net, params, eval_batches, with_grad=True)
        assert full_sq is not None
        gamma = float(gamma_sum.item()) / steps_per_epoch if track_gamma else math.nan
        metrics.append(record(epoch, grad_norm, totals, full_sq, lr_sum / steps_per_epoch, gamma))
        if progress and hasattr(bar, "set_postfix"):
            bar.set_postfix(
                loss=f"{metrics[-1].train_loss:.4g}", grad=f"{metrics[-1].grad_norm_full:.3g}"
            )
        if on_epoch is not None:
            on_epoch(metrics[-1])
        if not metrics[-1].is_finite():
            diverged_at = epoch
            break
        due = checkpoint_every > 0 and epoch % checkpoint_every == 0
        # The last epoch's state is the result itself: no checkpoint for it.
        if ckpt_path is not None and due and epoch < cfg.epochs:
            save_checkpoint(epoch)
    if hasattr(bar, "close"):
        bar.close()
    return RunResult(
        config=cfg,
        metrics=metrics,
        diverged_at=diverged_at,
        seconds=time.perf_counter() - start,
        device=str(device),
    )
