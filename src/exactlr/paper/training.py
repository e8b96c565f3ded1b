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

import contextlib
import copy
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exactlr.curvature import hessian_spectral_norm
from exactlr.data import ArrayDataset, make_batches
from exactlr.paper.passes import (
    Batch,
    _full_pass,
    _grad_sq_norm,
    _has_batchnorm,
    _has_dropout,
    _optimizer_step,
    _param_dtype,
    _Totals,
    adam_scales,
    gamma_negative_fraction,
)
from exactlr.paper.provenance import state_dict_sha256, tensor_digest
from exactlr.paper.runconfig import (
    METRIC_FIELDS,
    OPTIONAL_METRIC_FIELDS,
    REQUIRED_METRIC_FIELDS,
    EpochMetrics,
    RunResult,
    TrainConfig,
    check_dataset,
    first_samples,
    steps_per_epoch,
    validate_config,
)
from exactlr.paper.schedules import build_optimizer, build_scheduler, needs_train_eval
from exactlr.paper.stopping import raise_if_stop_requested, stop_at_epoch_end, stop_requested
from exactlr.paper.store import atomic_target
from exactlr.progress import progress_bar

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
    "first_samples",
    "gamma_negative_fraction",
    "steps_per_epoch",
    "train_run",
    "validate_config",
]

#: Version of the checkpoint format; a checkpoint of another version is ignored.
CHECKPOINT_FORMAT = 1

#: Largest evaluation chunk (samples) for models whose loss does not depend on batching.
EVAL_CHUNK = 10_000


def _fingerprint(
    cfg: TrainConfig, state: Mapping[str, Tensor], train: ArrayDataset, test: ArrayDataset
) -> str:
    """SHA-256 of what determines a run: config, w0, the data (targets, input sums)."""
    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    digest.update(state_dict_sha256(state).encode())
    for data in (train, test):
        tensor_digest(digest, data.targets)
        # A float64 sum, not the bytes: no copy of a big set, enough to tell sets apart.
        total = float(data.inputs.sum(dtype=torch.float64))
        digest.update(f"{tuple(data.inputs.shape)}|{total!r}".encode())
    return digest.hexdigest()


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """`torch.save` to `path` atomically (`exactlr.paper.store.atomic_target`)."""
    with atomic_target(path) as tmp:
        torch.save(state, tmp)


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


@dataclass(frozen=True)
class _Checkpoints:
    """Where and how often a run checkpoints (``path`` None: never)."""

    path: Path | None
    every: int
    fingerprint: str

    def due(self, epoch: int, last: int) -> bool:
        """Whether to checkpoint after ``epoch``: every ``every`` epochs, or when a stop
        was asked for; never after the ``last`` epoch (its state is the result)."""
        if self.path is None or epoch >= last:
            return False
        return (self.every > 0 and epoch % self.every == 0) or stop_requested()


@dataclass
class _Data:
    """A run's batches, fixed before training (see the module docstring)."""

    train: ArrayDataset
    test: ArrayDataset
    train_batches: list[Batch]
    eval_batches: list[Batch]
    test_batches: list[Batch]
    batch_size: int
    full_batch: bool

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_batches)


def _prepare_data(
    cfg: TrainConfig,
    net: nn.Module,
    train: ArrayDataset,
    test: ArrayDataset,
    device: torch.device,
) -> _Data:
    """Caps, moves (in the model's dtype) and batches the data of a run."""
    dtype = _param_dtype(net)
    train = first_samples(train, cfg.num_train).to(device, dtype=dtype)
    test = test.to(device, dtype=dtype)
    full_batch = cfg.batch_size is None
    batch_size = len(train) if cfg.batch_size is None else cfg.batch_size
    if batch_size > len(train):
        raise ValueError(
            f"batch_size={batch_size} is larger than the training set ({len(train)} samples)"
        )
    train_batches = make_batches(train, batch_size)  # unshuffled, fixed
    if full_batch or _has_batchnorm(net):
        eval_batches = train_batches
    else:
        eval_batches = make_batches(train, min(EVAL_CHUNK, len(train)))
    test_batches = make_batches(test, len(test) if full_batch else min(batch_size, len(test)))
    return _Data(train, test, train_batches, eval_batches, test_batches, batch_size, full_batch)


class _RunState:
    """One run's model, optimizer, scheduler, generators and metrics so far.

    Its methods are the steps of :func:`train_run`: the metrics at w0, one epoch, the
    evaluation of an epoch's end weights, and saving / restoring a checkpoint.
    """

    def __init__(self, cfg: TrainConfig, net: nn.Module, data: _Data, device: torch.device):
        self.cfg, self.net, self.data, self.device = cfg, net, data, device
        self.params = [p for p in net.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model has no trainable parameters")
        # Schedule-Free optimizers evaluate at x and take gradients at y (train/eval modes).
        self.train_eval = needs_train_eval(cfg.method)
        # Full batch without Dropout: the training forward at w_e is the metrics' forward.
        self.reuse = data.full_batch and not _has_dropout(net) and not self.train_eval
        self.track_gamma = cfg.method.optimizer == "adam"
        self.optimizer = build_optimizer(cfg.method, self.params, betas=cfg.betas, eps=cfg.eps)
        self.scheduler: Any = None
        self.per_batch = False
        if cfg.method.kind == "scheduler":
            assert cfg.method.scheduler is not None
            self.scheduler, self.per_batch = build_scheduler(
                cfg.method.scheduler,
                self.optimizer,
                epochs=cfg.epochs,
                steps_per_epoch=data.steps_per_epoch,
            )
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.start = time.perf_counter()
        self.metrics: list[EpochMetrics] = []
        self.gamma_prev: list[Tensor] | None = None
        self.lr_sum = 0.0
        self.gamma_sum = torch.zeros((), dtype=torch.float64, device=device)

    # -------------------------------------------------------------- evaluation

    def _sharpness(self, epoch: int) -> float:
        cfg = self.cfg
        if cfg.curvature_every <= 0 or epoch % cfg.curvature_every != 0:
            return math.nan
        saved = [p.grad for p in self.params]  # full batch, the next step reuses them
        res = hessian_spectral_norm(
            self.net,
            F.cross_entropy,
            self.data.eval_batches,
            tol=1e-3,
            target="norm",
            generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch),
        )
        for p, g in zip(self.params, saved, strict=True):
            p.grad = g
        return res.value

    def record(
        self,
        epoch: int,
        grad_norm: float,
        totals: _Totals,
        full_sq: Tensor,
        lr: float,
        gamma: float = math.nan,
    ) -> EpochMetrics:
        """Evaluates the test set (and sharpness) at the current weights; appends and
        returns the epoch's metrics."""
        tested = _full_pass(self.net, self.params, self.data.test_batches, with_grad=False)[0]
        metrics = EpochMetrics(
            epoch=epoch,
            grad_norm=grad_norm,
            grad_norm_full=math.sqrt(float(full_sq.item())),
            train_loss=totals.mean_loss(),
            train_acc=totals.accuracy(),
            test_loss=tested.mean_loss(),
            test_acc=tested.accuracy(),
            lr=lr,
            seconds=time.perf_counter() - self.start,
            gamma_neg_frac=gamma,
            sharpness=self._sharpness(epoch),
        )
        self.metrics.append(metrics)
        return metrics

    def epoch_zero(self) -> EpochMetrics:
        """Metrics at w0: the paper's grad_norm over the (unshuffled) training batches."""
        data, params = self.data, self.params
        if self.train_eval:
            self.optimizer.eval()  # type: ignore[attr-defined]
        same_batches = data.eval_batches is data.train_batches
        totals, full_sq, batch_sq = _full_pass(
            self.net,
            params,
            data.eval_batches,
            with_grad=True,
            batch_grad_sq=not data.full_batch and same_batches,
        )
        assert full_sq is not None
        if data.full_batch:
            batch_sq = full_sq
        elif batch_sq is None:
            # That pass overwrites p.grad; the full gradient is not needed mini-batch.
            batch_sq = _full_pass(
                self.net, params, data.train_batches, with_grad=True, batch_grad_sq=True
            )[2]
        assert batch_sq is not None
        divisor = 1 if data.full_batch else data.steps_per_epoch
        grad0 = math.sqrt(float(batch_sq.item()) / divisor)
        return self.record(0, grad0, totals, full_sq, self.optimizer.param_groups[0]["lr"])

    # -------------------------------------------------------------- training

    def _step(self) -> None:
        """One optimizer step at the LR in force, added to the epoch's LR sum and (Adam)
        its Gamma_t negative fraction to the epoch's sum."""
        lr_used = self.optimizer.param_groups[0]["lr"]
        self.lr_sum += lr_used
        _optimizer_step(self.optimizer, self.params)
        if self.track_gamma:
            current = adam_scales(self.optimizer, lr_used)
            self.gamma_sum += gamma_negative_fraction(self.gamma_prev, current)
            self.gamma_prev = current

    def _full_batch_steps(self) -> float:
        """The epoch's one step; returns its gradient norm."""
        if self.reuse:
            # p.grad holds grad L(w_{e-1}) from the last full pass: this step's gradient.
            grad_norm = self.metrics[-1].grad_norm_full
        else:
            # Dropout: the training gradient differs from the metrics' (Dropout off).
            x, y = self.data.train_batches[0]
            self.optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(self.net(x), y).backward()
            grad_norm = math.sqrt(float(_grad_sq_norm(self.params).item()))
        self._step()
        if self.scheduler is not None:
            self.scheduler.step()
        return grad_norm

    def _mini_batch_steps(self) -> float:
        """The epoch's steps over reshuffled batches; returns the paper's grad_norm."""
        data = self.data
        batch_sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for x, y in make_batches(
            data.train, data.batch_size, shuffle=True, generator=self.generator
        ):
            self.optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(self.net(x), y).backward()
            batch_sq += _grad_sq_norm(self.params)
            self._step()
            if self.per_batch and self.scheduler is not None:
                self.scheduler.step()
        if self.scheduler is not None and not self.per_batch:
            self.scheduler.step()
        return math.sqrt(float(batch_sq.item()) / data.steps_per_epoch)

    def epoch(self, epoch: int) -> EpochMetrics:
        """Trains epoch ``epoch`` and evaluates its end weights."""
        self.lr_sum = 0.0
        self.gamma_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        if self.train_eval:
            self.optimizer.train()  # type: ignore[attr-defined]
        full = self.data.full_batch
        grad_norm = self._full_batch_steps() if full else self._mini_batch_steps()
        if self.train_eval:
            self.optimizer.eval()  # type: ignore[attr-defined]
        totals, full_sq, _ = _full_pass(
            self.net, self.params, self.data.eval_batches, with_grad=True
        )
        assert full_sq is not None
        steps = self.data.steps_per_epoch
        gamma = float(self.gamma_sum.item()) / steps if self.track_gamma else math.nan
        return self.record(epoch, grad_norm, totals, full_sq, self.lr_sum / steps, gamma)

    # -------------------------------------------------------------- checkpoints

    def checkpoint(self, epoch: int, fingerprint: str) -> dict[str, Any]:
        """The state after ``epoch``, as a checkpoint (see the module docstring)."""
        device = self.device
        return {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": fingerprint,
            "run_name": self.cfg.run_name(),
            "epoch": epoch,
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": (torch.cuda.get_rng_state(device) if device.type == "cuda" else None),
            # Full batch, the next step reuses the gradient of the last full pass.
            "grads": [p.grad for p in self.params] if self.reuse else None,
            "gamma_prev": self.gamma_prev,
            "metrics": [asdict(m) for m in self.metrics],
            "seconds": time.perf_counter() - self.start,
        }

    def restore(self, state: dict[str, Any]) -> int:
        """Continues from a checkpoint; returns the first epoch still to train."""
        device = self.device
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        # Restored so that Dropout masks continue as in an uninterrupted run.
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        if state["grads"] is not None:
            for p, g in zip(self.params, state["grads"], strict=True):
                p.grad = None if g is None else g.to(device)
        if state.get("gamma_prev") is not None:
            self.gamma_prev = [t.to(device) for t in state["gamma_prev"]]
        self.metrics = [EpochMetrics(**m) for m in state["metrics"]]
        self.start = time.perf_counter() - float(state["seconds"])
        return int(state["epoch"]) + 1

    def result(self, diverged_at: int | None) -> RunResult:
        """The run's outcome so far."""
        return RunResult(
            config=self.cfg,
            metrics=self.metrics,
            diverged_at=diverged_at,
            seconds=time.perf_counter() - self.start,
            device=str(self.device),
            total_steps=self.cfg.epochs * self.data.steps_per_epoch,
        )


def _train_epochs(
    state: _RunState,
    first_epoch: int,
    checkpoints: _Checkpoints,
    on_epoch: Callable[[EpochMetrics], None] | None,
    progress: bool,
) -> int | None:
    """Trains epochs ``first_epoch..E``; returns the epoch it diverged at, or None.

    With checkpoints, a SIGINT / SIGTERM (under the CLI's handlers) stops the run at the
    end of its epoch, after a checkpoint, so that a rerun resumes there.
    """
    last = state.cfg.epochs
    bar = progress_bar(
        range(first_epoch, last + 1), desc=state.cfg.run_name(), unit="epoch", enabled=progress
    )
    zone = stop_at_epoch_end() if checkpoints.path is not None else contextlib.nullcontext()
    try:
        with zone:
            for epoch in bar:
                metrics = state.epoch(epoch)
                bar.set_postfix(
                    loss=f"{metrics.train_loss:.4g}", grad=f"{metrics.grad_norm_full:.3g}"
                )
                if on_epoch is not None:
                    on_epoch(metrics)
                if not metrics.is_finite():
                    return epoch
                if checkpoints.due(epoch, last):
                    assert checkpoints.path is not None
                    _save_checkpoint(
                        checkpoints.path, state.checkpoint(epoch, checkpoints.fingerprint)
                    )
                if epoch < last:
                    raise_if_stop_requested()
    finally:
        bar.close()
    return None


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
        The per-epoch metrics (epochs 0..E, or up to the divergence epoch) and T.

    Raises:
        ValueError: A bad config, `batch_size` larger than the training set, NaN / inf
            inputs, labels outside the class range, a negative `checkpoint_every`.
    """
    validate_config(cfg)
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every={checkpoint_every} must be >= 0 (0: never)")
    check_dataset(train)
    check_dataset(test)
    device = torch.device(device)
    net = copy.deepcopy(model).to(device)
    net.train()
    state = _RunState(cfg, net, _prepare_data(cfg, net, train, test, device), device)
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    fingerprint = ""
    resumed = None
    if ckpt is not None:
        fingerprint = _fingerprint(cfg, model.state_dict(), state.data.train, state.data.test)
        resumed = _load_checkpoint(ckpt, fingerprint)
    if resumed is not None:
        first_epoch = state.restore(resumed)
    else:
        metrics = state.epoch_zero()
        if on_epoch is not None:
            on_epoch(metrics)
        if not metrics.is_finite():
            return state.result(0)
        first_epoch = 1
    diverged_at = _train_epochs(
        state, first_epoch, _Checkpoints(ckpt, checkpoint_every, fingerprint), on_epoch, progress
    )
    return state.result(diverged_at)
