"""Data-parallel curvature on :mod:`torch.distributed`: one loss, its data spread over ranks.

Every rank of a process group holds the model and a shard of the batches (e.g. a
``DataLoader`` with a ``DistributedSampler``). Rank ``r`` holds ``N_r`` samples and
computes its local operator exactly as one process would, with batch weights
``n_b / N_r``; the full-data quantities are the size-weighted means over the ranks,

    L(w) = sum_r (N_r / N) L_r(w),    H v = sum_r (N_r / N) H_r v,    N = sum_r N_r,

i.e. one ``all_reduce`` of ``(N_r / N) H_r v`` (the parameter count of numbers) per
product. The shards are taken as given: a ``DistributedSampler`` with
``drop_last=False`` (its default) repeats up to W - 1 samples to even out the shards,
and those count twice, as they do in training with it.

The solvers run identically on every rank: they start from the same vector (broadcast
from the group's rank 0) and see the same all-reduced products, so every rank stops at
the same step with the same K_hat and learning rate.

:class:`DataParallelOperator` wraps an operator of :mod:`exactlr.curvature.operators`
(single or stacked) this way; :func:`data_parallel` builds one after checking that the
ranks agree (same parameter count, same weights, at least one sample each) and chooses
one product mode for all. ``process_group`` arguments are read by :func:`resolve_group`:
a ``ProcessGroup``; None for the default group when one is initialised (``torchrun``)
and single-process otherwise; False for single-process even then.

Failures: a rank whose local work fails (bad labels in its shard, no batches, a
non-finite product) must not leave the others waiting in a collective. Local work runs
inside :func:`all_or_none` (setup) or with a failure flag folded into the product's
``all_reduce``; when any rank failed, every rank raises one :class:`RanksError` (a
:class:`RanksValueError` for bad input) naming the first failed rank and its message.
A rank that dies outright is caught by the group's timeout (``init_process_group``).

The alternative, splitting weight samples instead of data (each rank evaluates whole
samples on all the data), lives in :func:`exactlr.smoothness.estimate_smoothness`
(``parallel="samples"``) and uses :func:`rank_share` and :func:`gather_objects` here.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

PARALLEL_MODES = ("data", "samples")
#: The group timeout the ``exactlr`` command sets: how long a rank waits for a peer in one
#: collective (a sample of ``parallel="samples"`` can take minutes) before it fails.
TORCHRUN_TIMEOUT = datetime.timedelta(minutes=30)

# Computations of a wrapped operator that are local to one rank: reading them through
# the wrapper would silently give one shard's value.
_LOCAL_ONLY = frozenset({"loss", "losses", "gradient", "check_deterministic", "head"})
# Relative difference of the weights' fingerprints above which the ranks hold different
# weights (identical weights give bit-equal fingerprints on one kind of hardware).
_FINGERPRINT_RTOL = 1e-9


class RanksError(RuntimeError):
    """Raised alike on every rank of a group: a rank failed, or the ranks disagree."""


class RanksValueError(RanksError, ValueError):
    """A :class:`RanksError` caused by bad input (a ``ValueError`` on some rank)."""


def resolve_group(
    process_group: dist.ProcessGroup | bool | None = None,
) -> dist.ProcessGroup | None:
    """The group to spread products over, or None for a single process.

    Args:
        process_group: A ``torch.distributed.ProcessGroup``; None: the default group when
            ``torch.distributed`` is initialised (as under ``torchrun``), else single
            process; False: single process even then. A group of one rank is single
            process.

    Raises:
        ValueError: Anything else, or a group this process is not a member of.
    """
    if process_group is False:
        return None
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        process_group = dist.group.WORLD
    elif not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise ValueError(
            f"process_group must be a torch.distributed.ProcessGroup, None (the default "
            f"group if initialised) or False (one process), got {process_group!r}"
        )
    if dist.get_rank(process_group) < 0:
        raise ValueError("this process is not a member of process_group")
    return process_group if dist.get_world_size(process_group) > 1 else None


def is_rank_zero(process_group: dist.ProcessGroup | bool | None = None) -> bool:
    """Whether this process is rank 0 of the group (True for a single process)."""
    group = resolve_group(process_group)
    return group is None or dist.get_rank(group) == 0


def passed_on(group: dist.ProcessGroup | None) -> dist.ProcessGroup | bool:
    """``group`` as a ``process_group`` argument (None, single process, becomes False)."""
    return False if group is None else group


def _comm_device(group: dist.ProcessGroup, preferred: torch.device) -> torch.device:
    """``preferred`` unless the group's backend cannot carry CPU tensors (NCCL alone)."""
    if preferred.type == "cpu" and "gloo" not in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return preferred


def gather_objects(obj: Any, group: dist.ProcessGroup) -> list[Any]:
    """Every rank's ``obj``, in group-rank order (``all_gather_object``)."""
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _raise_on_all_ranks(group: dist.ProcessGroup, error: BaseException | None) -> None:
    """Called by every rank once some rank failed: all raise the first failure's message."""
    mine = None if error is None else (isinstance(error, ValueError), f"{error}")
    reports = gather_objects(mine, group)
    rank = next(r for r, report in enumerate(reports) if report is not None)
    bad_input, text = reports[rank]
    cls = RanksValueError if bad_input else RanksError
    raise cls(f"rank {rank} of {len(reports)} failed: {text}") from error


@contextlib.contextmanager
def all_or_none(group: dist.ProcessGroup | None) -> Iterator[None]:
    """Run a block of local work on every rank; if it fails on any rank, it fails on all.

    The block must not communicate itself. On leaving it every rank takes part in one
    ``all_reduce`` of a failure flag; if any rank failed, every rank raises
    :class:`RanksError` (or :class:`RanksValueError`) with the first failed rank's
    message, instead of the healthy ranks waiting for it in their next collective.
    With ``group=None`` the block runs as is.
    """
    if group is None:
        yield
        return
    error: Exception | None = None
    try:
        yield
    except Exception as err:  # re-raised on every rank below
        error = err
    flag = torch.tensor([0.0 if error is None else 1.0])
    flag = flag.to(_comm_device(group, flag.device))
    dist.all_reduce(flag, group=group)
    if float(flag) > 0:
        _raise_on_all_ranks(group, error)


def same_on_all_ranks(tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """``tensor`` as group rank 0 has it (``broadcast``), e.g. a solver's start vector.

    The solvers see the same products on every rank; the same start makes the whole run
    identical, whatever each rank's generator holds.
    """
    if group is None:
        return tensor
    buffer = tensor.detach().clone().to(_comm_device(group, tensor.device))
    dist.broadcast(buffer, group=group, group_src=0)
    return buffer.to(tensor.device)


def shared_start(op: Any, vector: Tensor) -> Tensor:
    """A start vector for ``op``: rank 0's if ``op`` is a :class:`DataParallelOperator`."""
    return same_on_all_ranks(vector, op.group) if isinstance(op, DataParallelOperator) else vector


class DataParallelOperator:
    """An operator's Hessian over the data of all ranks: ``H v = sum_r (N_r / N) H_r v``.

    Wraps a :class:`~exactlr.curvature.operators.HessianOperator` or
    :class:`~exactlr.curvature.operators.StackedHessianOperator` whose batches are this
    rank's shard. A product computes the local one, scales it by ``N_r / N`` and sums it
    over the group with one ``all_reduce`` (one more number carries a failure flag, so
    that a rank whose product raised ends every rank with its error). Attributes not
    defined here (``dim``, ``dtype``, ``hvp_mode``, ``num_products``, ``release``, ...)
    are the wrapped operator's; its local-only computations (``loss``, ``gradient``) are
    not reachable through the wrapper. Build one with :func:`data_parallel`.

    Args:
        op: The local operator (this rank's batches).
        group: The process group.
        share: ``N_r / N``, this rank's share of the samples.
    """

    def __init__(self, op: Any, group: dist.ProcessGroup, share: float) -> None:
        self.op, self.group, self.share = op, group, share

    def __getattr__(self, name: str) -> Any:
        if name == "op":  # not set yet (copy, unpickling): no recursion through self.op
            raise AttributeError(name)
        if name in _LOCAL_ONLY:
            raise AttributeError(
                f"{name} of a data-parallel operator is not defined: it would be one "
                "rank's value; data_parallel() returns the full-data loss"
            )
        return getattr(self.op, name)

    def matvec(self, vectors: Tensor) -> Tensor:
        """``sum_r (N_r / N) H_r v`` for ``vectors`` of the wrapped operator's layout."""
        error: Exception | None = None
        try:
            local = self.op.matvec(vectors) * self.share
        except Exception as err:  # re-raised on every rank below
            error, local = err, None
        device = _comm_device(self.group, self.op.device)
        buffer = torch.zeros(vectors.numel() + 1, dtype=self.op.dtype, device=device)
        if local is None:
            buffer[-1] = 1.0
        else:
            buffer[:-1] = local.reshape(-1)
        dist.all_reduce(buffer, group=self.group)
        if float(buffer[-1]) > 0:
            _raise_on_all_ranks(self.group, error)
        return buffer[:-1].reshape(vectors.shape).to(self.op.device)

    def __call__(self, vectors: Tensor) -> Tensor:
        return self.matvec(vectors)

    def subset(self, index: Sequence[int]) -> DataParallelOperator:
        """The stacked operator of the samples ``index``, still data-parallel."""
        return DataParallelOperator(self.op.subset(index), self.group, self.share)


def _fingerprint(params: dict[str, Tensor]) -> tuple[float, float]:
    """``(sum_i c_i w_i, sum_i |w_i|)`` in float64 with fixed pseudo-random ``c_i``.

    Equal weights give equal fingerprints; different ones, almost surely not. Computed
    one tensor at a time (no copy of all the weights).
    """
    weighted, scale, offset = 0.0, 0.0, 0
    for p in params.values():
        w = p.detach().reshape(-1).to(torch.float64)
        index = torch.arange(offset, offset + w.numel(), dtype=torch.float64, device=w.device)
        weighted += float((w * (index * 0.6180339887498949).frac()).sum())
        scale += float(w.abs().sum())
        offset += w.numel()
    return weighted, scale


def data_parallel(
    op: Any, losses: float | Sequence[float], group: dist.ProcessGroup | None
) -> tuple[Any, Any]:
    """Spread ``op`` over ``group``: ``(DataParallelOperator, full-data loss(es))``.

    ``op`` holds this rank's batches (its ``sizes`` are their sample counts) and
    ``losses`` its local loss (a float, or one per stacked sample). One ``all_gather``
    of a short row per rank checks that the ranks agree and gives
    ``L = sum_r (N_r / N) L_r``. If any rank's ``op`` chose the ``"forward"`` product
    mode (its memory budget), all use it, so that every rank runs the same steps. With
    ``group=None``, ``(op, losses)`` unchanged.

    Raises:
        RanksValueError: On every rank, if a rank has no samples or the ranks' models
            differ in parameter count or weights.
    """
    if group is None:
        return op, losses
    values = [float(losses)] if isinstance(losses, int | float) else [float(v) for v in losses]
    weighted, scale = _fingerprint(op.params)
    local_size = float(sum(op.sizes))
    row = [local_size, float(op.dim), float(op.hvp_mode == "reverse"), weighted, scale, *values]
    device = _comm_device(group, torch.device("cpu"))
    mine = torch.tensor(row, dtype=torch.float64, device=device)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, mine, group=group)
    table = torch.stack(rows).cpu()
    _check_agreement(table)
    sizes = table[:, 0]
    if not bool(table[:, 2].all()):
        op.hvp_mode = "forward"
    total = float(sizes.sum())
    means = [float(v) for v in (table[:, 5:] * sizes[:, None]).sum(0) / total]
    wrapped = DataParallelOperator(op, group, local_size / total)
    return wrapped, means[0] if isinstance(losses, int | float) else means


def _check_agreement(table: Tensor) -> None:
    """Raise :class:`RanksValueError` if the ranks' rows of :func:`data_parallel` disagree."""
    sizes, dims, weighted, scale = table[:, 0], table[:, 1], table[:, 3], table[:, 4]
    for rank, size in enumerate(sizes.tolist()):
        if size <= 0:
            raise RanksValueError(
                f"rank {rank} has no samples; give every rank at least one non-empty batch "
                "(e.g. a DataLoader with a DistributedSampler)"
            )
    if bool((dims != dims[0]).any()):
        counts = ", ".join(f"rank {r}: {int(d)}" for r, d in enumerate(dims.tolist()))
        raise RanksValueError(
            f"the ranks' models have different parameter counts ({counts}); every rank "
            "must hold the same model"
        )
    tolerance = _FINGERPRINT_RTOL * float(scale.max()) + 1e-300
    bad = [r for r, w in enumerate(weighted.tolist()) if abs(w - float(weighted[0])) > tolerance]
    if bad:
        raise RanksValueError(
            f"the weights on rank {bad[0]} differ from rank 0's; every rank must hold the "
            "same weights (build the model with the same seed on every rank, or broadcast "
            "rank 0's state before calling)"
        )


def rank_share(items: Sequence[Any], per_rank: int, group: dist.ProcessGroup) -> list[Any]:
    """This rank's consecutive ``per_rank`` items of ``items`` (group rank r: the r-th)."""
    rank = dist.get_rank(group)
    return list(items[rank * per_rank : (rank + 1) * per_rank])


def _has_batch_statistics(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def shard_batches(
    batches: Sequence[Any], model: nn.Module, process_group: dist.ProcessGroup | bool | None = None
) -> list[Any]:
    """This rank's shard of an in-memory list of ``(inputs, targets)`` batches.

    With at least as many batches as ranks, rank r takes the whole batches
    ``r, r + W, r + 2W, ...``: the loss is the one of these batches exactly. With fewer
    (e.g. one full batch), every batch's samples are split into W consecutive parts, one
    per rank; that keeps the loss only for a model without BatchNorm (whose batch
    statistics would then be per part), so a BatchNorm model is refused. For a
    ``Dataset``, use a ``DataLoader`` with a ``DistributedSampler`` instead.

    Args:
        batches: All the batches, the same on every rank.
        model: The model (checked for BatchNorm when batches are split).
        process_group: As :func:`resolve_group`; single process: ``batches`` as a list.

    Raises:
        RanksValueError: On every rank alike: a BatchNorm model with fewer batches than
            ranks, or a batch with fewer samples than ranks.
    """
    group = resolve_group(process_group)
    if group is None:
        return list(batches)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if len(batches) >= world:
        return list(batches[rank::world])
    if _has_batch_statistics(model):
        raise RanksValueError(
            f"{len(batches)} batch(es) cannot be shared by {world} processes without "
            "changing the loss of a BatchNorm model (batch statistics per part); use at "
            f"least {world} batches (a smaller batch size)"
        )
    out = []
    for i, (x, y) in enumerate(batches):
        if len(x) < world:
            raise RanksValueError(f"batch {i} has {len(x)} samples, fewer than {world} processes")
        out.append((torch.tensor_split(x, world)[rank], torch.tensor_split(y, world)[rank]))
    return out


def _launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def rank_device(device: torch.device) -> torch.device:
    """Under ``torchrun``, a CUDA device without an index becomes ``cuda:LOCAL_RANK``."""
    if device.type == "cuda" and device.index is None and _launched_by_torchrun():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@contextlib.contextmanager
def torchrun_session(enabled: bool = True) -> Iterator[None]:
    """For a command run by ``torchrun``: a default process group, output on rank 0 only.

    When ``enabled`` and the environment is ``torchrun``'s with more than one process
    and no group is initialised yet, initialise the default group (gloo for CPU
    tensors, NCCL for CUDA ones, :data:`TORCHRUN_TIMEOUT`), and destroy it on exit.
    Ranks other than 0 write nothing to stdout or stderr while inside; an error that
    every rank raised alike (:class:`RanksError`) ends them with its exit status (2 for
    bad input, else 1) without a second report, while any other error propagates and is
    reported by that rank. Changes process-wide state (the group, the CUDA device, the
    output streams) by design; restores the streams and the group on exit.
    """
    if not (enabled and _launched_by_torchrun() and dist.is_available()):
        yield
        return
    if dist.is_initialized():
        yield
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=TORCHRUN_TIMEOUT)
    quiet = dist.get_rank() != 0
    try:
        with contextlib.ExitStack() as stack:
            if quiet:
                sink = stack.enter_context(open(os.devnull, "w"))
                stack.enter_context(contextlib.redirect_stdout(sink))
                stack.enter_context(contextlib.redirect_stderr(sink))
            try:
                yield
            except RanksError as err:
                if not quiet:
                    raise
                sys.exit(2 if isinstance(err, ValueError) else 1)
    finally:
        dist.destroy_process_group()
