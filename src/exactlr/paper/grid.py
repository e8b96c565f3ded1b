"""A comparison grid: K runs of one model from the same w0, trained together with vmap.

A figure compares K runs (8-15) of one architecture from the same initial weights w0 that
differ only in their LR method (and possibly Adam's betas / eps). `train_grid` trains them
side by side and returns, for every config, what `exactlr.paper.training.train_run` returns for
it alone (same metrics up to floating-point rounding, except `seconds`).

How. Run k keeps its own leaf tensors w^(k) (copies of w0), its own
`torch.optim.Adam(w^(k), lr, betas, eps, weight_decay=0)` and its own scheduler from
`exactlr.paper.schedules.build_scheduler` (stepped after every batch for One Cycle, after every
epoch otherwise), exactly as `train_run` builds them. Only the forward and backward passes
are batched: at each step the K runs' parameters are stacked, W[k] = w^(k), and

    l(W)[k] = CE_mean(f(W[k]; x), y),    k = 1..K,

is evaluated in one pass on the batch (x, y): for the models of `exactlr.models` on a
"folded" layout, the K runs' channels side by side (one wide first layer, one BatchNorm
over K*C channels; see `_Stacked`), for any other model with
`torch.vmap(functional_call(base, ...), in_dims=(0, None, None))`. All runs share the
batch (they shuffle with the same seeded generator). W is a fresh stacked copy made an
autograd leaf; one backward of sum_k l(W)[k] gives dl/dW, whose slice k is run k's
gradient (the runs do not interact); it becomes the `.grad` of run k's leaves (a view, no
copy) and run k's optimizer steps. The result is the same as stacking differentiably and
back-propagating into the leaves, without the K x P copies.

Metrics are `train_run`'s (see its module docstring), computed with the same batches:

- `grad_norm`: sqrt(mean_b ||g_b^(k)||^2) over the epoch's training steps (full batch: the
  norm of the step's gradient, which is the previous epoch's full gradient);
- `grad_norm_full`: ||grad L(w_e^(k))||, L = sum_b (n_b / N) l_b, one batched extra pass;
- `train_loss` / `train_acc`, `test_loss` / `test_acc`: in training-loss mode (BatchNorm
  with batch statistics, no running-stat updates);
- `lr`: mean LR over the epoch's steps (epoch 0: the initial LR);
- `seconds`: cumulative wall time of the whole grid when the epoch's metrics were known
  (shared by the K runs, so not comparable with a single run's `seconds`).

Other `EpochMetrics` fields (diagnostics added after this module, e.g. `gamma_neg_frac`,
`sharpness`) keep their defaults; configs that ask for one (`curvature_every > 0`) or for
an optimizer other than Adam are rejected.

BatchNorm runs on a stateless copy of the model (`torch.func.replace_all_batch_norm_modules_`:
no running statistics, batch statistics in train mode), which is what `train_run`'s outputs
use anyway (running statistics never enter its loss or metrics). Dropout is not supported.

Divergence: a run whose epoch metrics are not finite gets `diverged_at` = that epoch, its
metrics stop there, and it is dropped from the stack; the other runs continue unaffected
(a NaN stays in its own vmap slice).

Speed: on a CPU the grid is not faster than K sequential `train_run` calls
(`benchmarks/bench_grid.py` measures both): the sequential runs are already
compute-bound, a wider GEMM or convolution is no faster per element, and the elementwise
layers (BatchNorm, ReLU, pooling) on a K times larger activation fall out of the cache and
fault fresh pages; the batching is meant for accelerators, where K small kernels become
one. Memory: a pass holds K runs' activations.

Host-device syncs: none inside the batch loop (per-run accumulators live on the device);
one transfer per epoch for all runs' metrics.

Example:
    >>> import torch
    >>> from exactlr.data import synthetic_classification
    >>> from exactlr.models import build_model
    >>> from exactlr.paper.schedules import MethodSpec
    >>> from exactlr.paper.training import TrainConfig
    >>> from exactlr.paper.grid import train_grid
    >>> train, test = synthetic_classification(num_train=200, num_test=50)
    >>> model = build_model("fc1x32", dataset="synthetic", generator=torch.Generator())
    >>> cfgs = [TrainConfig("synthetic", "mini", "fc1x32", MethodSpec(f"c{lr}", "constant", lr),
    ...                     epochs=3, batch_size=None) for lr in (1e-2, 1e-3)]
    >>> [len(r.metrics) for r in train_grid(cfgs, model, train, test)]
    [4, 4]
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from exactlr.data import ArrayDataset, make_batches
from exactlr.paper.passes import _has_dropout, _optimizer_step
from exactlr.paper.runconfig import (
    EpochMetrics,
    RunResult,
    TrainConfig,
    check_dataset,
    validate_config,
)
from exactlr.paper.schedules import build_scheduler
from exactlr.paper.stacked import _Stacked
from exactlr.paper.training import _Data, _prepare_data
from exactlr.progress import progress_bar

__all__ = ["SHARED_FIELDS", "train_grid"]

#: TrainConfig fields that every config of a grid must share (the method, betas and eps
#: may differ).
SHARED_FIELDS: tuple[str, ...] = (
    "dataset",
    "subset",
    "model",
    "epochs",
    "batch_size",
    "seed",
    "num_train",
    "init",
)

Batch = tuple[Tensor, Tensor]


@dataclass(eq=False)
class _Run:
    """One run of the grid: its leaves, optimizer, scheduler and metrics."""

    cfg: TrainConfig
    params: list[Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    per_batch: bool
    metrics: list[EpochMetrics] = field(default_factory=list)
    diverged_at: int | None = None
    lr_sum: float = 0.0

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def _check_shared(cfgs: Sequence[TrainConfig]) -> None:
    """Raises `ValueError` naming the first field in which a config differs from cfgs[0]."""
    if not cfgs:
        raise ValueError("train_grid needs at least one config")
    first = cfgs[0]
    for i, cfg in enumerate(cfgs[1:], start=1):
        for name in SHARED_FIELDS:
            value, expected = getattr(cfg, name), getattr(first, name)
            if value != expected:
                raise ValueError(
                    f"cfgs[{i}] ({cfg.method.name!r}) has {name}={value!r} but cfgs[0] has "
                    f"{name}={expected!r}; a grid's configs may differ only in method, "
                    "betas and eps"
                )


def _stack(runs: Sequence[_Run], names: Sequence[str], *, grad: bool) -> dict[str, Tensor]:
    """{name: [K, *shape]} copy of the runs' current weights (a fresh autograd leaf)."""
    with torch.no_grad():
        stacked = {
            name: torch.stack([run.params[i] for run in runs]) for i, name in enumerate(names)
        }
    if grad:
        for tensor in stacked.values():
            tensor.requires_grad_(True)
    return stacked


def _sq_norms(grads: Sequence[Tensor]) -> Tensor:
    """[K] float64: sum over tensors of ||g[k]||^2, as `training._grad_sq_norm` per run."""
    k = grads[0].shape[0]
    norms = torch.stack(
        [torch.linalg.vector_norm(g.reshape(k, -1), dim=1, dtype=torch.float64) for g in grads]
    )
    return norms.square().sum(dim=0)


@dataclass
class _PassTotals:
    """Per-run device accumulators of a pass over data."""

    loss_sum: Tensor  # [K] float64, sum of per-sample losses
    correct: Tensor  # [K] int64
    count: int
    grads: list[Tensor] | None = None  # stacked full gradient [K, *shape] per name
    batch_sq: Tensor | None = None  # [K] float64, sum_b ||grad l_b||^2


def _full_pass(
    model: _Stacked,
    runs: Sequence[_Run],
    batches: Sequence[Batch],
    *,
    with_grad: bool,
    batch_grad_sq: bool = False,
) -> _PassTotals:
    """Batched `training._full_pass`: the size-weighted full loss of every run.

    Returns per-run summed losses, numbers correct and, with `with_grad`, the stacked full
    gradient sum_b (n_b / N) grad l_b (accumulated in the same order as `train_run`), and
    with `batch_grad_sq` the per-run sum_b ||grad l_b||^2.
    """
    stacked = _stack(runs, model.names, grad=with_grad)
    tensors = list(stacked.values())
    device = tensors[0].device
    k = len(runs)
    total = sum(len(y) for _, y in batches)
    loss_sum = torch.zeros(k, dtype=torch.float64, device=device)
    correct = torch.zeros(k, dtype=torch.int64, device=device)
    batch_sq = torch.zeros(k, dtype=torch.float64, device=device) if batch_grad_sq else None
    full: list[Tensor] | None = None
    with torch.set_grad_enabled(with_grad):
        for x, y in batches:
            losses, logits = model(stacked, x, y)
            loss_sum += losses.detach().double() * len(y)
            correct += (logits.detach().argmax(dim=2) == y).sum(dim=1)
            if not with_grad:
                continue
            weight = len(y) / total
            grads = torch.autograd.grad(losses.sum(), tensors)
            if batch_sq is not None:
                batch_sq += _sq_norms(grads)
            if full is None:
                full = [g * weight for g in grads]
            else:
                for acc, g in zip(full, grads, strict=True):
                    acc.add_(g, alpha=weight)
    return _PassTotals(loss_sum, correct, total, full, batch_sq)


def _set_grads(runs: Sequence[_Run], grads: Sequence[Tensor]) -> None:
    """Gives run k the slice k of each stacked gradient as its leaves' `.grad`."""
    for k, run in enumerate(runs):
        for p, g in zip(run.params, grads, strict=True):
            p.grad = g[k]


def _check_grid(cfgs: Sequence[TrainConfig], model: nn.Module) -> None:
    """Raises `ValueError` for configs or a model the grid cannot train."""
    _check_shared(cfgs)
    for cfg in cfgs:
        validate_config(cfg)
        if cfg.method.optimizer != "adam":
            raise ValueError(
                f"method {cfg.method.name!r} uses optimizer={cfg.method.optimizer!r}; "
                "train_grid supports Adam only (use train_run)"
            )
        if cfg.curvature_every:
            raise ValueError(
                f"curvature_every={cfg.curvature_every!r}: train_grid does not measure "
                "the sharpness (use train_run)"
            )
    if _has_dropout(model):
        raise ValueError("train_grid does not support Dropout; use train_run")


def _new_run(cfg: TrainConfig, w0: Sequence[Tensor], steps_per_epoch: int) -> _Run:
    """Run k's leaves (copies of w0), Adam and scheduler, built as `train_run` builds them."""
    params = [p.clone().requires_grad_(True) for p in w0]
    optimizer = torch.optim.Adam(
        params, lr=cfg.method.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=0.0
    )
    scheduler, per_batch = None, False
    if cfg.method.kind == "scheduler":
        assert cfg.method.scheduler is not None
        scheduler, per_batch = build_scheduler(
            cfg.method.scheduler, optimizer, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch
        )
    return _Run(cfg, params, optimizer, scheduler, per_batch)


class _Grid:
    """The grid's stacked model, data, runs and the runs still active (not diverged).

    Its methods are the steps of :func:`train_grid`: the metrics at w0, one epoch, and
    recording an epoch's metrics for every active run.
    """

    def __init__(self, stacked_model: _Stacked, runs: list[_Run], data: _Data) -> None:
        self.model, self.runs, self.data = stacked_model, runs, data
        self.active = list(runs)
        self.device = stacked_model.w0[0].device
        self.generator = torch.Generator().manual_seed(runs[0].cfg.seed)
        self.start = time.perf_counter()
        # Full batch: the gradient at w_e is the gradient of step e + 1 (E + 1 gradients).
        self.pending: list[Tensor] | None = None

    @property
    def divisor(self) -> int:
        return 1 if self.data.full_batch else self.data.steps_per_epoch

    def record(self, epoch: int, grad_sq: Tensor, totals: _PassTotals) -> None:
        """Appends every active run's metrics (one device transfer); drops diverged runs."""
        assert totals.grads is not None
        active = self.active
        tested = _full_pass(self.model, active, self.data.test_batches, with_grad=False)
        columns = torch.stack(
            [
                grad_sq,
                _sq_norms(totals.grads),
                totals.loss_sum,
                totals.correct.double(),
                tested.loss_sum,
                tested.correct.double(),
            ]
        ).tolist()
        now = time.perf_counter() - self.start
        survivors = []
        for k, run in enumerate(active):
            g_sq, full_sq, loss, right, test_loss, test_right = (col[k] for col in columns)
            lr = run.lr if epoch == 0 else run.lr_sum / self.data.steps_per_epoch
            metrics = EpochMetrics(
                epoch=epoch,
                grad_norm=math.sqrt(g_sq / self.divisor),
                grad_norm_full=math.sqrt(full_sq),
                train_loss=loss / totals.count,
                train_acc=right / totals.count,
                test_loss=test_loss / tested.count,
                test_acc=test_right / tested.count,
                lr=lr,
                seconds=now,
            )
            run.metrics.append(metrics)
            if metrics.is_finite():
                survivors.append(run)
            else:
                run.diverged_at = epoch
        if self.data.full_batch:
            self.pending = _keep(active, survivors, totals.grads)
        self.active = survivors

    def epoch_zero(self) -> None:
        """Metrics at w0 (as train_run: the paper's grad_norm over the unshuffled batches)."""
        data, model, active = self.data, self.model, self.active
        same_batches = data.eval_batches is data.train_batches
        totals = _full_pass(
            model,
            active,
            data.eval_batches,
            with_grad=True,
            batch_grad_sq=not data.full_batch and same_batches,
        )
        assert totals.grads is not None
        if data.full_batch:
            batch_sq = _sq_norms(totals.grads)
        elif totals.batch_sq is not None:
            batch_sq = totals.batch_sq
        else:
            batch_sq = _full_pass(
                model, active, data.train_batches, with_grad=True, batch_grad_sq=True
            ).batch_sq
        assert batch_sq is not None
        self.record(0, batch_sq, totals)

    def _full_batch_step(self) -> Tensor:
        assert self.pending is not None
        _set_grads(self.active, self.pending)
        grad_sq = _sq_norms(self.pending)
        for run in self.active:
            run.lr_sum += run.lr
            _optimizer_step(run.optimizer, run.params)
            if run.scheduler is not None:
                run.scheduler.step()
        return grad_sq

    def _mini_batch_steps(self) -> Tensor:
        active, data = self.active, self.data
        grad_sq = torch.zeros(len(active), dtype=torch.float64, device=self.device)
        for x, y in make_batches(
            data.train, data.batch_size, shuffle=True, generator=self.generator
        ):
            stacked = _stack(active, self.model.names, grad=True)
            tensors = list(stacked.values())
            losses, _ = self.model(stacked, x, y)
            grads = torch.autograd.grad(losses.sum(), tensors)
            grad_sq += _sq_norms(grads)
            _set_grads(active, grads)
            for run in active:
                run.lr_sum += run.lr
                _optimizer_step(run.optimizer, run.params)
                if run.per_batch and run.scheduler is not None:
                    run.scheduler.step()
        for run in active:
            if run.scheduler is not None and not run.per_batch:
                run.scheduler.step()
        return grad_sq

    def epoch(self, epoch: int) -> None:
        """Trains every active run for one epoch and records its metrics."""
        for run in self.active:
            run.lr_sum = 0.0
        grad_sq = self._full_batch_step() if self.data.full_batch else self._mini_batch_steps()
        totals = _full_pass(self.model, self.active, self.data.eval_batches, with_grad=True)
        self.record(epoch, grad_sq, totals)


def train_grid(
    cfgs: Sequence[TrainConfig],
    model: nn.Module,
    train: ArrayDataset,
    test: ArrayDataset,
    *,
    device: torch.device | str = "cpu",
    progress: bool = False,
    fold: bool = True,
) -> list[RunResult]:
    """Trains one run per config from the same w0, batching their forward/backward passes.

    Equivalent to `[train_run(cfg, model, train, test, device=device) for cfg in cfgs]`
    (same optimizers, schedulers, batches and metrics; see the module docstring), but each
    step evaluates all runs with one vmapped forward and backward.

    Args:
        cfgs: The runs; all share `SHARED_FIELDS` (dataset, subset, model, epochs,
            batch_size, seed, num_train, init); method, betas and eps may differ.
        model: The model at w0 (deep-copied, never modified). No Dropout.
        train: Training set (capped to its first `num_train` samples if set).
        test: Test set.
        device: Device to train on.
        progress: Show a tqdm bar over epochs (needs tqdm).
        fold: Evaluate on the folded layout when the model allows it (see `_Stacked`);
            False always uses `torch.vmap` (the same results; for comparison).

    Returns:
        One `RunResult` per config, in order. `EpochMetrics.seconds` and
        `RunResult.seconds` are the grid's cumulative wall time (at the epoch's end, and at
        the run's last epoch).

    Raises:
        ValueError: No configs, configs differing in a shared field (named in the
            message), a bad config, a model with Dropout or without trainable parameters,
            `batch_size` larger than the training set, NaN / inf inputs, bad labels.
    """
    _check_grid(cfgs, model)
    check_dataset(train)
    check_dataset(test)
    device = torch.device(device)
    stacked_model = _Stacked(model, device, fold=fold)
    if not stacked_model.names:
        raise ValueError("model has no trainable parameters")
    data = _prepare_data(cfgs[0], model, train, test, device)
    runs = [_new_run(cfg, stacked_model.w0, data.steps_per_epoch) for cfg in cfgs]
    grid = _Grid(stacked_model, runs, data)
    grid.epoch_zero()
    bar = progress_bar(
        range(1, cfgs[0].epochs + 1),
        desc=f"grid of {len(runs)} runs",
        unit="epoch",
        enabled=progress,
    )
    try:
        for epoch in bar:
            if not grid.active:
                break
            grid.epoch(epoch)
            bar.set_postfix(active=len(grid.active))
    finally:
        bar.close()
    total_steps = cfgs[0].epochs * data.steps_per_epoch
    return [
        RunResult(
            config=run.cfg,
            metrics=run.metrics,
            diverged_at=run.diverged_at,
            seconds=run.metrics[-1].seconds,
            device=str(device),
            total_steps=total_steps,
        )
        for run in runs
    ]


def _keep(active: Sequence[_Run], survivors: Sequence[_Run], grads: list[Tensor]) -> list[Tensor]:
    """The slices of stacked `grads` (over `active`) that belong to `survivors`."""
    if len(survivors) == len(active):
        return grads
    index = torch.tensor(
        [k for k, run in enumerate(active) if any(run is s for s in survivors)],
        device=grads[0].device,
    )
    return [g.index_select(0, index) for g in grads]
