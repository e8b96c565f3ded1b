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

Speed: on a CPU the grid is not faster than K sequential `train_run` calls (see
docs/performance.md and `benchmarks/bench_grid.py`): the sequential runs are already
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

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, replace_all_batch_norm_modules_

from exactlr.allocator import keep_freed_memory
from exactlr.data import ArrayDataset, make_batches
from exactlr.paper.schedules import build_scheduler
from exactlr.paper.training import (
    EVAL_CHUNK,
    EpochMetrics,
    RunResult,
    TrainConfig,
    _has_batchnorm,
    _has_dropout,
    _optimizer_step,
    _param_dtype,
    _progress,
    check_dataset,
    validate_config,
)

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


#: Layers without parameters that the folded path applies as they are (per channel or
#: per sample, so they act on every run's block of channels alike).
_FOLD_FREE = (
    nn.ReLU,
    nn.AvgPool2d,
    nn.MaxPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Flatten,
    nn.Identity,
)


def _foldable(model: nn.Module) -> bool:
    """Whether `_Stacked` can run `model` on the folded layout (else it uses `torch.vmap`).

    True for an `nn.Sequential` of Conv2d (groups 1, zero padding, numeric padding),
    Linear, stateless BatchNorm1d/2d and the parameter-free layers of `_FOLD_FREE`
    (Flatten over all but the batch dimension): every model of `exactlr.models`.
    """
    if not isinstance(model, nn.Sequential):
        return False
    for layer in model:
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                return False
        elif isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d):
            if layer.running_mean is not None or layer.running_var is not None:
                return False
        elif isinstance(layer, nn.Flatten):
            if layer.start_dim != 1 or layer.end_dim != -1:
                return False
        elif not isinstance(layer, (nn.Linear, *_FOLD_FREE)):
            return False
    return True


class _Stacked:
    """The batched loss of K runs: `losses(W, x, y) -> ([K] mean losses, [K, B, C] logits)`.

    `W` maps parameter names to stacked tensors `[K, *shape]`; the model's other tensors
    (frozen parameters, buffers) are shared by all runs.

    Two ways to evaluate it, the same function (tested equal in float64):

    - **folded** (`_foldable` models, i.e. every model of `exactlr.models`): the K runs'
      activations are laid side by side along the feature / channel dimension,
      `h[n, k*C + c, ...]` = run k's channel c of sample n. A Conv2d or Linear layer
      whose input is still the shared batch becomes *one* layer with K*O outputs
      (weights reshaped to `[K*O, ...]`); a later Conv2d is, on a CPU, K convolutions on
      the runs' channel blocks, concatenated (oneDNN's grouped convolution, `groups=K`,
      is 2.2-2.6x slower than K separate ones here, forward + backward, LeNet's second
      layer: `benchmarks/bench_grid_layers.py`), and one grouped convolution on other
      devices (one kernel launch); a later Linear is one `bmm` over `[K, B, I]`;
      BatchNorm is one `F.batch_norm` over K*C channels (batch statistics: per run and
      channel, as alone); pooling, ReLU and Flatten act per channel / block and need
      nothing; the loss is `F.cross_entropy` over the `[B, C, K]` logits.
    - **vmap** (any other model): `torch.vmap(functional_call(...))` over the stacked
      weights, data unbatched. vmap's batch rules make every later convolution a
      grouped one and route BatchNorm through permuted elementwise ops: LeNet's forward
      + backward for 15 runs on 2,000 images took 7.57 s against 4.07 s folded (1 CPU
      thread; 15 sequential runs: 3.32 s; `benchmarks/bench_grid_layers.py`).
    """

    def __init__(self, model: nn.Module, device: torch.device, *, fold: bool = True) -> None:
        base = copy.deepcopy(model).to(device)
        replace_all_batch_norm_modules_(base)  # no running stats: nothing updated in place
        base.train()
        self.base = base
        self.names = [n for n, p in base.named_parameters() if p.requires_grad]
        self.w0 = [p.detach() for p in base.parameters() if p.requires_grad]
        self.shared: dict[str, Tensor] = {
            n: p.detach() for n, p in base.named_parameters() if not p.requires_grad
        }
        self.shared.update({n: b for n, b in base.named_buffers() if b is not None})
        self.folded = fold and _foldable(base)
        # Later convolutions: K separate ones on a CPU (measured faster than oneDNN's
        # grouped convolution), one grouped convolution (groups=K) elsewhere (one launch).
        self.loop_convs = device.type == "cpu"

        def loss(params: dict[str, Tensor], shared: dict[str, Tensor], x: Tensor, y: Tensor):
            logits = functional_call(base, (params, shared), (x,))
            return F.cross_entropy(logits, y), logits

        self._batched = torch.vmap(loss, in_dims=(0, None, None, None))

    def __call__(self, stacked: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.folded:
            return self._folded(stacked, x, y)
        return self._batched(stacked, self.shared, x, y)

    def _folded(self, stacked: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The folded evaluation (see the class docstring)."""
        k = next(iter(stacked.values())).shape[0]

        def weight(name: str) -> Tensor | None:
            """Stacked `[K, *shape]` tensor `name` (a frozen one expanded), None if absent."""
            if name in stacked:
                return stacked[name]
            tensor = self.shared.get(name)
            return None if tensor is None else tensor.expand(k, *tensor.shape)

        h, folded = x, False  # folded: h is [B, K*C, ...]; else the shared [B, C, ...]
        for prefix, layer in self.base.named_children():
            w = weight(f"{prefix}.weight")
            b = weight(f"{prefix}.bias")
            if isinstance(layer, nn.Conv2d):
                conv = partial(
                    F.conv2d, stride=layer.stride, padding=layer.padding, dilation=layer.dilation
                )
                if folded and self.loop_convs:  # oneDNN's grouped conv is ~2x slower
                    blocks = h.chunk(k, dim=1)
                    h = torch.cat(
                        [conv(blocks[i], w[i], None if b is None else b[i]) for i in range(k)],
                        dim=1,
                    )
                else:  # shared input: one wide conv; folded input: one grouped conv
                    h = conv(
                        h,
                        w.reshape(k * layer.out_channels, *w.shape[2:]),
                        None if b is None else b.reshape(-1),
                        groups=k if folded else 1,
                    )
            elif isinstance(layer, nn.Linear):
                if folded:  # [K, B, I] @ [K, I, O] -> [B, K*O]
                    batch = h.shape[0]
                    out = torch.bmm(
                        h.reshape(batch, k, layer.in_features).transpose(0, 1),
                        w.transpose(1, 2),
                    )
                    if b is not None:
                        out = out + b[:, None, :]
                    h = out.transpose(0, 1).reshape(batch, k * layer.out_features)
                else:
                    h = F.linear(
                        h,
                        w.reshape(k * layer.out_features, layer.in_features),
                        None if b is None else b.reshape(-1),
                    )
            elif isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d):
                if not folded:
                    h = h.repeat(1, k, *[1] * (h.dim() - 2))
                h = F.batch_norm(
                    h,
                    None,
                    None,
                    None if w is None else w.reshape(-1),
                    None if b is None else b.reshape(-1),
                    True,
                    0.0,
                    layer.eps,
                )
            else:
                h = layer(h)
                continue
            folded = True
        # A model without weighted layers has no trainable parameters (train_grid refuses it).
        assert folded, "the folded path needs a Conv2d, Linear or BatchNorm layer"
        batch = h.shape[0]
        logits = h.reshape(batch, k, -1)  # [B, K, C]
        losses = F.cross_entropy(
            logits.transpose(1, 2), y[:, None].expand(batch, k), reduction="none"
        ).mean(dim=0)
        return losses, logits.transpose(0, 1)


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


@keep_freed_memory()
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
    _check_shared(cfgs)
    for cfg in cfgs:
        validate_config(cfg)
        # Fields that newer TrainConfig / MethodSpec versions may carry.
        optimizer = getattr(cfg.method, "optimizer", "adam")
        if optimizer != "adam":
            raise ValueError(
                f"method {cfg.method.name!r} uses optimizer={optimizer!r}; train_grid "
                "supports Adam only (use train_run)"
            )
        if getattr(cfg, "curvature_every", 0):
            raise ValueError(
                f"curvature_every={cfg.curvature_every!r}: train_grid does not measure "
                "the sharpness (use train_run)"
            )
    check_dataset(train)
    check_dataset(test)
    if _has_dropout(model):
        raise ValueError("train_grid does not support Dropout; use train_run")
    start = time.perf_counter()
    first = cfgs[0]
    device = torch.device(device)
    stacked_model = _Stacked(model, device, fold=fold)
    if not stacked_model.names:
        raise ValueError("model has no trainable parameters")
    w0 = stacked_model.w0
    dtype = _param_dtype(stacked_model.base)

    if first.num_train is not None and len(train) > first.num_train:
        train = ArrayDataset(
            train.inputs[: first.num_train],
            train.targets[: first.num_train],
            train.num_classes,
            train.name,
        )
    train = train.to(device, dtype=dtype)
    test = test.to(device, dtype=dtype)
    full_batch = first.batch_size is None
    batch_size = len(train) if full_batch else first.batch_size
    assert batch_size is not None
    if batch_size > len(train):
        raise ValueError(
            f"batch_size={batch_size} is larger than the training set ({len(train)} samples)"
        )
    train_batches = make_batches(train, batch_size)
    steps_per_epoch = len(train_batches)
    if full_batch or _has_batchnorm(model):
        eval_batches = train_batches
    else:
        eval_batches = make_batches(train, min(EVAL_CHUNK, len(train)))
    test_batches = make_batches(test, len(test) if full_batch else min(batch_size, len(test)))

    runs: list[_Run] = []
    for cfg in cfgs:
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
        runs.append(_Run(cfg, params, optimizer, scheduler, per_batch))
    generator = torch.Generator().manual_seed(first.seed)

    def record(
        epoch: int, active: list[_Run], grad_sq: Tensor, divisor: int, totals: _PassTotals
    ) -> list[_Run]:
        """Appends every active run's metrics (one device transfer); returns the survivors."""
        assert totals.grads is not None
        tested = _full_pass(stacked_model, active, test_batches, with_grad=False)
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
        now = time.perf_counter() - start
        survivors = []
        for k, run in enumerate(active):
            g_sq, full_sq, loss, right, test_loss, test_right = (col[k] for col in columns)
            lr = run.lr if epoch == 0 else run.lr_sum / steps_per_epoch
            metrics = EpochMetrics(
                epoch=epoch,
                grad_norm=math.sqrt(g_sq / divisor),
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
        return survivors

    # Epoch 0, at w0 (as train_run: the paper's grad_norm over the unshuffled batches).
    active = list(runs)
    same_batches = eval_batches is train_batches
    totals = _full_pass(
        stacked_model,
        active,
        eval_batches,
        with_grad=True,
        batch_grad_sq=not full_batch and same_batches,
    )
    assert totals.grads is not None
    if full_batch:
        batch_sq = _sq_norms(totals.grads)
    elif totals.batch_sq is not None:
        batch_sq = totals.batch_sq
    else:
        batch_sq = _full_pass(
            stacked_model, active, train_batches, with_grad=True, batch_grad_sq=True
        ).batch_sq
    assert batch_sq is not None
    survivors = record(0, active, batch_sq, 1 if full_batch else steps_per_epoch, totals)
    # Full batch: the gradient at w_e is the gradient of step e + 1 (E + 1 gradients in all).
    pending = _keep(active, survivors, totals.grads) if full_batch else None
    active = survivors

    bar = _progress(range(1, first.epochs + 1), progress, f"grid of {len(runs)} runs")
    for epoch in bar:
        if not active:
            break
        for run in active:
            run.lr_sum = 0.0
        if full_batch:
            assert pending is not None
            _set_grads(active, pending)
            grad_sq = _sq_norms(pending)
            for run in active:
                run.lr_sum += run.lr
                _optimizer_step(run.optimizer, run.params)
                if run.scheduler is not None:
                    run.scheduler.step()
        else:
            grad_sq = torch.zeros(len(active), dtype=torch.float64, device=device)
            for x, y in make_batches(train, batch_size, shuffle=True, generator=generator):
                stacked = _stack(active, stacked_model.names, grad=True)
                tensors = list(stacked.values())
                losses, _ = stacked_model(stacked, x, y)
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
        totals = _full_pass(stacked_model, active, eval_batches, with_grad=True)
        assert totals.grads is not None
        survivors = record(epoch, active, grad_sq, 1 if full_batch else steps_per_epoch, totals)
        if full_batch:
            pending = _keep(active, survivors, totals.grads)
        active = survivors
        if progress and hasattr(bar, "set_postfix"):
            bar.set_postfix(active=len(active))
    if hasattr(bar, "close"):
        bar.close()
    return [
        RunResult(
            config=run.cfg,
            metrics=run.metrics,
            diverged_at=run.diverged_at,
            seconds=run.metrics[-1].seconds,
            device=str(device),
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
