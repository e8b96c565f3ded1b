"""Curvature of a training loss: Hessian-vector products and extreme eigenvalues.

The loss is the size-weighted mean over an iterable of ``(inputs, targets)`` batches,

    L(w) = sum_b (n_b / N) * loss_fn(model(x_b; w), y_b),    N = sum_b n_b,

i.e. the full-data loss when ``loss_fn`` uses ``reduction="mean"`` (torch's default).

Hessian-vector products ``H v`` are built with :mod:`torch.func` on a
:func:`~torch.func.functional_call` of the model, in one of two modes:

* ``"forward"`` -- forward-over-reverse, ``jvp(grad(L), w, v)``: low memory (one batch's
  graph at a time), about two gradients per product.
* ``"reverse"`` -- reverse-over-reverse, ``vjp(grad(L), w)`` built once and reused for
  every product: about one gradient per product, but keeps the gradient graph of all the
  data in memory.

``"auto"`` picks ``"reverse"`` when the estimated graph fits in a memory budget.

Unless ``rewrite=False``, products are taken of an exactly equal rewrite of the loss
(:mod:`exactlr.curvature.rewrites`): the data enter shifted by their median with the first layer
compensating (less float32 cancellation), and in ``"reverse"`` mode training-mode
BatchNorm is built from elementary ops (a cheaper double backward).

Extreme eigenvalues come from :func:`lanczos` (full reorthogonalisation, a-posteriori
error bound) or :func:`power_iteration`, both pure functions of a matvec. The spectral
norm counts negative curvature: ``||H||_2 = max(|lambda_max|, |lambda_min|)``. On a
GPU the vectors stay on the device; each product brings two scalars to the host in one
copy (the solvers' stopping rules need them), and the small tridiagonal algebra runs
there in numpy.

Several weight samples of one architecture can be handled at once:
:class:`StackedHessianOperator` stacks their weights and takes ``(H_1 v_1; ..; H_S v_S)``
with one vmapped product, :func:`lanczos_batched` runs one Lanczos per sample in lockstep
(the iteration and stopping rule of :func:`lanczos`), and :func:`hessian_spectral_norms`
is :func:`hessian_spectral_norm` for a list of models on top of both.

:func:`hessian_spectral_norm` and :func:`hessian_spectral_norms` run inside
:func:`exactlr.allocator.keep_freed_memory` (glibc keeps freed blocks for the next
product instead of page-faulting them in again); wrap your own loops over
:class:`HessianOperator` products in it for the same speed.

The curvature is that of the loss *as training computes it*: BatchNorm uses batch
statistics (train mode) and never updates its running statistics here; Dropout is
switched off (its expectation), since a random operator has no eigenvalues. The model's
parameters, buffers and train/eval flags are left exactly as they were.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from exactlr.allocator import keep_freed_memory
from exactlr.curvature.rewrites import data_shift, rewritten

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
Matvec = Callable[[Tensor], Tensor]
StackedMatvec = Callable[[Tensor, list[int]], Tensor]

HVP_MODES = ("auto", "forward", "reverse")
METHODS = ("lanczos", "power")
TARGETS = ("both", "norm")


# --------------------------------------------------------------------------------------
# Eigen-solvers on a matvec (pure functions)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EigenResult:
    """Extreme eigenvalues of a symmetric operator found by an iterative solver.

    Attributes:
        lambda_max: Largest (algebraic) eigenvalue estimate.
        lambda_min: Smallest (algebraic) eigenvalue estimate.
        num_matvecs: Products with the operator that were spent.
        converged: Whether the stopping rule was met before ``max_iters``.
        error_estimate: A-posteriori bound on the absolute error of the extreme
            eigenvalue of largest magnitude (Lanczos), or its last relative change
            times its magnitude (power iteration).
        vector_max: Unit Ritz vector of ``lambda_max`` (Lanczos with
            ``return_vectors=True``), else None.
        vector_min: Unit Ritz vector of ``lambda_min``, likewise.
    """

    lambda_max: float
    lambda_min: float
    num_matvecs: int
    converged: bool
    error_estimate: float
    vector_max: Tensor | None = field(default=None, repr=False, compare=False)
    vector_min: Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def spectral_norm(self) -> float:
        """``max(|lambda_max|, |lambda_min|)``."""
        return max(abs(self.lambda_max), abs(self.lambda_min))


def _check_solver_args(v0: Tensor, max_iters: int, tol: float) -> None:
    if v0.ndim != 1 or v0.numel() == 0:
        raise ValueError(f"v0 must be a non-empty 1-D tensor, got shape {tuple(v0.shape)}")
    if not torch.isfinite(v0).all() or float(v0.norm()) == 0.0:
        raise ValueError("v0 must be finite and non-zero; draw it with random_unit_vector()")
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters=}")
    if not (tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a positive finite number, got {tol=}")


_NOT_FINITE = (
    "the Hessian-vector product is not finite (NaN or inf): the loss is not twice "
    "differentiable at these weights or overflows; check the inputs and the model"
)


def _shaped_product(matvec: Matvec, v: Tensor) -> Tensor:
    """``matvec(v)``, checked for its shape (finiteness is checked on the solver's
    scalars, which a non-finite product makes non-finite: one host read per product)."""
    w = matvec(v)
    if w.shape != v.shape:
        raise ValueError(f"matvec returned shape {tuple(w.shape)} for input {tuple(v.shape)}")
    return w


def _host_scalars(*scalars: Tensor) -> list[float]:
    """The 0-d tensors as Python floats, in one device-to-host copy; ValueError if any is
    not finite (a product with a NaN or inf makes its Rayleigh quotient and norm so)."""
    values = torch.stack([t.double() for t in scalars]).tolist()
    if not all(math.isfinite(x) for x in values):
        raise ValueError(_NOT_FINITE)
    return values


def random_unit_vector(
    dim: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """A standard normal vector of length ``dim`` scaled to unit norm.

    Drawn on the CPU from ``generator`` (so the result does not depend on the device) and
    then moved; the global RNG is untouched when a generator is given.
    """
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim=}")
    v = torch.randn(dim, generator=generator, dtype=torch.float64)
    return (v / v.norm()).to(dtype=dtype, device=device)


def power_iteration(
    matvec: Matvec,
    v0: Tensor,
    *,
    max_iters: int = 100,
    tol: float = 1e-4,
) -> tuple[float, Tensor, int, bool]:
    """Power iteration for the eigenvalue of largest magnitude of a symmetric operator.

    Iterates ``v <- A v / ||A v||`` with the Rayleigh quotient ``lambda = v^T A v`` and stops
    when ``|lambda_k - lambda_{k-1}| <= tol * |lambda_k|`` (PyHessian's rule).

    Args:
        matvec: ``v -> A v`` for a symmetric ``A``.
        v0: Start vector (1-D, non-zero).
        max_iters: Maximum number of products.
        tol: Relative tolerance on the change of the Rayleigh quotient.

    Returns:
        ``(eigenvalue, eigenvector, num_matvecs, converged)``; the eigenvalue is signed.

    Raises:
        ValueError: For bad arguments or a non-finite product.

    Example:
        >>> a = torch.diag(torch.tensor([3.0, -5.0, 1.0], dtype=torch.float64))
        >>> lam, _, _, _ = power_iteration(lambda v: a @ v, torch.ones(3, dtype=a.dtype))
        >>> round(lam, 3)
        -5.0
    """
    _check_solver_args(v0, max_iters, tol)
    v = v0 / v0.norm()
    previous = None
    eigenvalue = 0.0
    for k in range(1, max_iters + 1):
        w = _shaped_product(matvec, v)
        norm = w.norm()
        eigenvalue, norm_value = _host_scalars(
            torch.dot(v.double().flatten(), w.double().flatten()), norm
        )
        if norm_value == 0.0:  # v is in the null space: the eigenvalue is 0 exactly
            return 0.0, v, k, True
        if previous is not None and abs(eigenvalue - previous) <= tol * abs(eigenvalue):
            return eigenvalue, w / norm, k, True
        previous = eigenvalue
        v = w / norm
    return eigenvalue, v, max_iters, False


def lanczos(
    matvec: Matvec,
    v0: Tensor,
    *,
    max_iters: int = 100,
    tol: float = 1e-4,
    return_vectors: bool = False,
    target: str = "both",
) -> EigenResult:
    """Lanczos with full reorthogonalisation for both extreme eigenvalues.

    After ``k`` products the Krylov basis ``Q_k`` and tridiagonal ``T_k = Q_k^T A Q_k`` give
    Ritz values ``theta_i`` (eigenvalues of ``T_k``) with residuals ``r_i = beta_k
    |s_{k,i}|`` (``s`` the eigenvectors of ``T_k``). An eigenvalue of ``A`` lies within
    ``min(r_i, r_i^2 / gap_i)`` of ``theta_i``; ``gap_i`` is estimated as the distance to
    the neighbouring Ritz value less that value's own residual (the plain Ritz gap
    overstates the spectral gap while the neighbour is unconverged), and with three Ritz
    values or fewer the bound is ``r_i``. With ``target="both"`` it stops when that bound,
    for both extreme Ritz values, is at most ``tol * max(|theta_max|, |theta_min|)``; so
    ``tol`` is the relative accuracy of both extremes measured against the spectral norm.
    With ``target="norm"`` only the spectral norm must be that accurate: the bound of the
    dominant end, and the other end may be loose as long as ``|theta_other| + bound_other``
    cannot exceed the dominant ``|theta|`` by more than ``tol`` times it (fewer products
    when one end dominates, e.g. ``lambda_max`` of an untrained network).

    Args:
        matvec: ``v -> A v`` for a symmetric ``A``.
        v0: Start vector (1-D, non-zero).
        max_iters: Maximum number of products.
        tol: Relative tolerance on the extreme eigenvalues (see above).
        return_vectors: Also return the unit Ritz vectors ``Q_k s_1`` and ``Q_k s_k`` of
            both extremes (e.g. as start vectors for another operator).
        target: ``"both"`` or ``"norm"``: what ``tol`` applies to (see above).

    Returns:
        An :class:`EigenResult`.

    Raises:
        ValueError: For bad arguments or a non-finite product.

    Example:
        >>> a = torch.diag(torch.tensor([3.0, -5.0, 1.0, 2.0], dtype=torch.float64))
        >>> res = lanczos(lambda v: a @ v, torch.ones(4, dtype=a.dtype))
        >>> round(res.lambda_max, 6), round(res.lambda_min, 6), round(res.spectral_norm, 6)
        (3.0, -5.0, 5.0)
    """
    _check_solver_args(v0, max_iters, tol)
    run = _LanczosRun(v0, max_iters=max_iters, tol=tol, target=target)
    while not run.step(_shaped_product(matvec, run.vector)):
        pass
    return run.result(return_vectors=return_vectors)


class _LanczosRun:
    """One run of :func:`lanczos` as a state machine, so that runs can share products.

    ``vector`` is the next Lanczos vector ``q_k``; ``step(A q_k)`` does one iteration
    (full reorthogonalisation, Ritz values of ``T_k``, the stopping rule of
    :func:`lanczos`) and returns True once the run has stopped; ``result()`` then gives
    its :class:`EigenResult`. :func:`lanczos` and :func:`lanczos_batched` both drive it,
    so a batched run is the same iteration as a single one.
    """

    def __init__(self, v0: Tensor, *, max_iters: int, tol: float, target: str) -> None:
        if target not in TARGETS:
            raise ValueError(f"target={target!r} is not one of {TARGETS}")
        self.dim = v0.numel()
        self.max_iters = min(max_iters, self.dim)
        self.tol, self.target = tol, target
        self.basis = torch.empty(
            min(self.max_iters, 16), self.dim, dtype=v0.dtype, device=v0.device
        )
        self.basis[0] = v0 / v0.norm()
        self.alphas: list[float] = []
        self.betas: list[float] = []
        # Host side (numpy, float64): the tridiagonal T_k, its Ritz values and vectors.
        self.theta = np.zeros(1)
        self.s = np.ones((1, 1))
        self.error = math.inf
        self.k = 0
        self.stopped: tuple[int, bool] | None = None  # (num_matvecs, converged) once done

    @property
    def vector(self) -> Tensor:
        """The vector ``q_k`` whose product the next :meth:`step` expects."""
        return self.basis[self.k]

    def step(self, w: Tensor) -> bool:
        """One Lanczos iteration with ``w = A q_k``; True when the run has stopped.

        The vectors stay on their device; ``alpha_k`` and ``beta_k`` come to the host in
        one copy (the only synchronisation with a GPU per product), and the tridiagonal
        algebra and stopping rule run there in numpy.
        """
        w, alpha_t, beta_t = self.orthogonalise(w)
        return self.finish(w, *_host_scalars(alpha_t, beta_t))

    def orthogonalise(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The device half of :meth:`step`: ``(w_perp, alpha_k, beta_k)``, the scalars as
        0-d tensors (not read yet: a batched run reads all its runs' in one copy)."""
        if self.stopped is not None:
            raise RuntimeError("this Lanczos run has already stopped")
        k, basis = self.k, self.basis
        alpha_t = torch.dot(basis[k].double(), w.double())
        # Full reorthogonalisation, twice ("twice is enough"): keeps Ritz values from
        # ghosting, cheap next to a Hessian-vector product.
        active = basis[: k + 1]
        for _ in range(2):
            w = w - active.T @ (active @ w)
        return w, alpha_t, w.norm()

    def finish(self, w: Tensor, alpha: float, beta: float) -> bool:
        """The host half of :meth:`step`, given ``alpha_k`` and ``beta_k`` as floats."""
        k, basis = self.k, self.basis
        self.alphas.append(alpha)
        t = np.diag(self.alphas)
        if k > 0:
            t += np.diag(self.betas, 1) + np.diag(self.betas, -1)
        theta, s = np.linalg.eigh(t)
        self.theta, self.s = theta, s
        scale = max(abs(float(theta[0])), abs(float(theta[-1])))
        residual = beta * np.abs(s[-1])
        error_min, error_max = _ritz_error(theta, residual, 0), _ritz_error(theta, residual, -1)
        if self.target == "norm":
            top, low = abs(float(theta[-1])), abs(float(theta[0]))
            # Ritz values lie inside the spectrum, so the dominant |theta| is a lower bound
            # of the norm; the other end can only matter if it may overtake it.
            if top >= low:
                self.error = max(error_max, low + error_min - top)
            else:
                self.error = max(error_min, top + error_max - low)
        else:
            self.error = max(error_min, error_max)
        num = k + 1
        breakdown = beta <= 1e-10 * max(scale, 1e-300) or num == self.dim
        tol = self.tol
        if breakdown or (num >= 2 and self.error <= tol * scale) or (scale == 0.0 and beta == 0.0):
            self.stopped = (num, True)
            return True
        if num == self.max_iters:
            self.stopped = (self.max_iters, False)
            return True
        if num >= basis.shape[0]:
            grown = torch.empty(
                min(2 * basis.shape[0], self.max_iters),
                self.dim,
                dtype=basis.dtype,
                device=basis.device,
            )
            grown[:num] = basis[:num]
            self.basis = basis = grown
        basis[num] = w / beta
        self.betas.append(beta)
        self.k = num
        return False

    def result(self, *, return_vectors: bool = False) -> EigenResult:
        """The :class:`EigenResult` of a stopped run."""
        if self.stopped is None:
            raise RuntimeError("this Lanczos run has not stopped yet")
        num, converged = self.stopped
        theta = self.theta
        vectors: tuple[Tensor | None, Tensor | None] = (None, None)
        if return_vectors:
            coeffs = torch.from_numpy(self.s).to(self.basis)
            ends = self.basis[:num].T @ coeffs[:num, [-1, 0]]
            ends = ends / ends.norm(dim=0)
            vectors = (ends[:, 0], ends[:, 1])
        return EigenResult(float(theta[-1]), float(theta[0]), num, converged, self.error, *vectors)


def lanczos_batched(
    matvec: StackedMatvec,
    v0: Tensor,
    *,
    max_iters: int = 100,
    tol: float = 1e-4,
    target: str = "both",
) -> list[EigenResult]:
    """:func:`lanczos` on S symmetric operators ``A_1..A_S`` at once, in lockstep.

    Every operator gets exactly the iteration of :func:`lanczos` (full
    reorthogonalisation, its own tridiagonal ``T_k^(s)``, its own Ritz error bound and
    stopping rule for ``target``), but the products of all runs still going are asked
    for together, ``matvec(Q, index)`` with ``Q[i] = q_k^(index[i])``, so the caller can
    evaluate them as one batched product. A run that has stopped is not asked again:
    ``index`` lists only the active operators, so the caller decides whether finished
    ones cost compute (see :class:`StackedHessianOperator`).

    Args:
        matvec: ``(Q, index) -> R`` with ``R[i] = A_{index[i]} Q[i]``; ``Q`` has shape
            ``(len(index), dim)``, ``index`` is an increasing list of operator numbers.
        v0: Start vectors, shape ``(S, dim)``; row s starts operator s.
        max_iters: Maximum number of products per operator.
        tol: Relative tolerance (as in :func:`lanczos`).
        target: ``"both"`` or ``"norm"`` (as in :func:`lanczos`).

    Returns:
        One :class:`EigenResult` per operator, in order; each equals what
        :func:`lanczos` returns on that operator from that start vector, up to the
        rounding of the batched product.

    Raises:
        ValueError: For bad arguments, a product of the wrong shape or a non-finite one.

    Example:
        >>> a = torch.stack([torch.diag(torch.tensor(d, dtype=torch.float64))
        ...                  for d in ([3.0, -5.0, 1.0], [2.0, 1.0, 0.5])])
        >>> res = lanczos_batched(lambda q, idx: torch.einsum("sij,sj->si", a[idx], q),
        ...                       torch.ones(2, 3, dtype=torch.float64))
        >>> [round(r.spectral_norm, 6) for r in res]
        [5.0, 2.0]
    """
    if v0.ndim != 2 or v0.shape[0] == 0:
        raise ValueError(f"v0 must be a non-empty (S, dim) tensor, got {tuple(v0.shape)}")
    for row in v0:
        _check_solver_args(row, max_iters, tol)
    runs = [_LanczosRun(row, max_iters=max_iters, tol=tol, target=target) for row in v0]
    active = list(range(len(runs)))
    while active:
        block = torch.stack([runs[s].vector for s in active])
        products = matvec(block, active)
        if products.shape != block.shape:
            raise ValueError(
                f"matvec returned shape {tuple(products.shape)} for input {tuple(block.shape)}"
            )
        # One device-to-host copy for the scalars of every active run.
        halves = [runs[s].orthogonalise(w) for s, w in zip(active, products, strict=True)]
        scalars = _host_scalars(*(t for _, alpha, beta in halves for t in (alpha, beta)))
        active = [
            s
            for i, (s, (w, _, _)) in enumerate(zip(active, halves, strict=True))
            if not runs[s].finish(w, scalars[2 * i], scalars[2 * i + 1])
        ]
    return [run.result() for run in runs]


def _ritz_error(theta: np.ndarray, residual: np.ndarray, i: int) -> float:
    """Error bound ``min(r_i, r_i^2 / gap)`` of the ``i``-th (an outermost) Ritz value.

    ``gap = |theta_i - theta_j| - r_j`` for the neighbour ``j``: the Ritz gap shrunk by
    the neighbour's own residual, since ``theta_j`` is only an inner bound of the next
    eigenvalue (``lambda_2 >= theta_2``) and an unconverged neighbour makes the plain
    Ritz gap too large. Without a positive gap the bound is ``r_i``.
    """
    r = float(residual[i])
    if theta.size <= 3:
        # With two Ritz values the "neighbour" is the other end of the spectrum, not the
        # next eigenvalue: r^2 / gap then claims far too much (measured on FC 3x1000 from
        # a multi-fidelity start: bound 4e-4, actual error 1.2e-3). With three, the one
        # interior Ritz value is far from converged after a warm start (LeNet: bounds
        # 6.6e-4, errors 1.2e-3 to 4.3e-3, even with its residual taken off the gap).
        # Only r is safe.
        return r
    j = 1 if i == 0 else -2
    gap = abs(float(theta[i] - theta[j])) - float(residual[j])
    return min(r, r * r / gap) if gap > 0 else r


# --------------------------------------------------------------------------------------
# The loss of a model over batches, and its Hessian-vector products
# --------------------------------------------------------------------------------------


def _batchnorm_modules(model: nn.Module) -> Iterator[nn.modules.batchnorm._BatchNorm]:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            yield module


@contextlib.contextmanager
def training_loss_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in the state in which its training loss is a fixed function of w.

    Train mode (BatchNorm normalises with batch statistics) without updating BatchNorm's
    running statistics, and Dropout off. Everything is restored on exit, including on error.
    """
    modes = [(m, m.training) for m in model.modules()]
    tracking = [(m, m.track_running_stats) for m in _batchnorm_modules(model)]
    try:
        model.train()
        for module in model.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                module.eval()
        for module, _ in tracking:
            # In train mode with track_running_stats False, BatchNorm passes no running
            # buffers to F.batch_norm: batch statistics, and no in-place buffer update.
            module.track_running_stats = False
        yield model
    finally:
        for module, flag in tracking:
            module.track_running_stats = flag
        for module, flag in modes:
            module.training = flag


def materialize_batches(
    batches: Iterable[Batch], device: torch.device | None = None
) -> list[Batch]:
    """Turn an iterable of ``(inputs, targets)`` into a list on ``device``.

    Raises:
        ValueError: If there are no batches, a batch is empty or not a pair, or the
            inputs are not finite.
    """
    out: list[Batch] = []
    for i, batch in enumerate(batches):
        if not isinstance(batch, Sequence) or len(batch) != 2:
            raise ValueError(f"batch {i} must be an (inputs, targets) pair, got {type(batch)}")
        x, y = batch
        if len(x) == 0 or len(x) != len(y):
            raise ValueError(
                f"batch {i} has {len(x)} inputs and {len(y)} targets; batches must be "
                "non-empty with one target per input"
            )
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise ValueError(f"batch {i} has non-finite (NaN or inf) inputs; clean the data")
        if device is not None:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out.append((x, y))
    if not out:
        raise ValueError("batches is empty; pass at least one (inputs, targets) batch")
    return out


def _check_targets(outputs: Tensor, targets: Tensor, batch_index: int) -> None:
    """Class-index targets must lie in ``[0, num_classes)`` (cross-entropy style)."""
    integer = targets.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
    if integer and outputs.ndim >= 2 and targets.ndim == outputs.ndim - 1 and targets.numel():
        num_classes = outputs.shape[1]
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise ValueError(
                f"label {bad} in batch {batch_index} is outside the class range "
                f"[0, {num_classes - 1}] of the model's {num_classes} outputs; "
                "fix the labels or the model's number of outputs"
            )


def _module_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, p.dtype
    raise ValueError("the model has no parameters")


def _available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


class _RewrittenBatches:
    """The batches as the operators evaluate them: ``x - shift``, inside the rewrites.

    Shared by :class:`HessianOperator` and :class:`StackedHessianOperator`, which set
    ``weights``, ``batches``, ``shift``, ``rewrite``, ``params`` and ``network`` (the
    module whose first layer carries the shift hook) and define ``flatten``.
    """

    weights: list[float]
    batches: list[Batch]
    shift: Tensor | None
    rewrite: bool
    network: nn.Module
    params: dict[str, Tensor]
    flatten: Callable[[dict[str, Tensor]], Tensor]

    def _rewritten(self, *, composite: bool = False) -> contextlib.AbstractContextManager:
        """Evaluate ``network`` on the shifted inputs as if on the data (exact rewrites)."""
        return rewritten(self.network, self.shift, composite_batch_norm=composite and self.rewrite)

    def _pairs(self) -> Iterator[tuple[float, Tensor, Tensor]]:
        """``(weight, rewritten inputs, targets)`` of every batch (shifted on the fly)."""
        for w, (x, y) in zip(self.weights, self.batches, strict=True):
            yield w, (x if self.shift is None else x - self.shift), y

    def _forward_products(self, batch_loss: Callable, tangent: dict[str, Tensor]) -> Tensor:
        """``"forward"`` mode: ``sum_b w_b jvp(grad(batch_loss_b), params, tangent)``."""
        out = None
        with self._rewritten():
            for w, x, y in self._pairs():

                def batch_grad(p: dict[str, Tensor], x: Tensor = x, y: Tensor = y) -> dict:
                    return grad(batch_loss)(p, x, y)

                _, hv = jvp(batch_grad, (self.params,), (tangent,))
                hv_flat = self.flatten(hv)
                out = w * hv_flat if out is None else out + w * hv_flat
        assert out is not None
        return out


class HessianOperator(_RewrittenBatches):
    """The Hessian of the size-weighted mean loss of ``model`` over ``batches``.

    A thin stateful wrapper: it holds the detached parameters, the batches and (in
    ``"reverse"`` mode) the reusable gradient graph. Use it inside
    :func:`training_loss_mode` (``hessian_spectral_norm`` does). Vectors are flat, in the
    order of ``model.named_parameters()`` restricted to parameters that require grad.

    Args:
        model: The network; its current weights are the point ``w``.
        loss_fn: ``loss_fn(outputs, targets)`` returning the mean loss of a batch.
        batches: List of ``(inputs, targets)`` pairs on the model's device.
        hvp_mode: ``"forward"``, ``"reverse"`` or ``"auto"`` (see module docstring).
        memory_fraction: In ``"auto"``, the share of free memory the reusable graph may
            use before ``"forward"`` is chosen.
        rewrite: Apply the exact rewrites of :mod:`exactlr.curvature.rewrites` (input shift of the
            first layer, composite BatchNorm in ``"reverse"`` mode): same function,
            less rounding and cheaper products. False: evaluate the model as given.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: list[Batch],
        *,
        hvp_mode: str = "auto",
        memory_fraction: float = 0.25,
        rewrite: bool = True,
    ) -> None:
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"hvp_mode={hvp_mode!r} is not one of {HVP_MODES}")
        self.model = model
        self.loss_fn = loss_fn
        self.batches = batches
        sizes = [len(x) for x, _ in batches]
        total = sum(sizes)
        self.weights = [n / total for n in sizes]
        self.params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("the model has no parameters that require grad")
        self.buffers = dict(model.named_buffers())
        self.shapes = [p.shape for p in self.params.values()]
        self.numels = [p.numel() for p in self.params.values()]
        self.dim = sum(self.numels)
        first = next(iter(self.params.values()))
        self.dtype, self.device = first.dtype, first.device
        self.num_products = 0
        self.hvp_mode = self._choose_mode(memory_fraction) if hvp_mode == "auto" else hvp_mode
        self._reverse_fn: Callable | None = None
        # Exact rewrites (exactlr.curvature.rewrites): the data enter as x - c, the first layer adds
        # A_W c back; in "reverse" mode BatchNorm is built from elementary ops.
        self.rewrite, self.network = rewrite, model
        self.shift = data_shift(model, [x for x, _ in batches]) if rewrite else None

    # -- the loss -----------------------------------------------------------------------
    def _batch_loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        outputs = functional_call(self.model, (params, self.buffers), (x,))
        return self.loss_fn(outputs, y)

    def _total_loss(self, params: dict[str, Tensor]) -> Tensor:
        total = None
        for w, x, y in self._pairs():
            term = w * self._batch_loss(params, x, y)
            total = term if total is None else total + term
        assert total is not None
        return total

    def loss(self) -> float:
        """The full-data loss ``L(w)``; validates targets and finiteness.

        Raises:
            ValueError: For labels outside the model's class range or a non-finite loss.
        """
        total = 0.0
        with torch.no_grad(), self._rewritten():
            for i, (w, x, y) in enumerate(self._pairs()):
                outputs = functional_call(self.model, (self.params, self.buffers), (x,))
                _check_targets(outputs, y, i)
                value = self.loss_fn(outputs, y)
                if value.ndim != 0:
                    raise ValueError(
                        f"loss_fn must return a scalar (mean over the batch), got shape "
                        f"{tuple(value.shape)}; use reduction='mean'"
                    )
                total += w * float(value)
        if not math.isfinite(total):
            raise ValueError(f"the loss at these weights is not finite (loss={total})")
        return total

    # -- vectors --------------------------------------------------------------------------
    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """Split a flat vector into a dict shaped like the parameters."""
        chunks = vector.split(self.numels)
        return {
            name: c.view(shape)
            for name, c, shape in zip(self.params, chunks, self.shapes, strict=True)
        }

    @staticmethod
    def flatten(tensors: dict[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """Concatenate tensors (dict values in order) into one flat vector."""
        values = tensors.values() if isinstance(tensors, dict) else tensors
        return torch.cat([t.reshape(-1) for t in values])

    def gradient(self) -> Tensor:
        """The flat gradient ``grad L(w)`` (one backward pass per batch)."""
        g = None
        with self._rewritten():
            for w, x, y in self._pairs():
                gb = self.flatten(grad(self._batch_loss)(self.params, x, y))
                g = w * gb if g is None else g + w * gb
        assert g is not None
        return g

    # -- Hessian-vector products ------------------------------------------------------------
    def matvec(self, vector: Tensor) -> Tensor:
        """``H v`` for a flat vector ``v`` (one Hessian-vector product)."""
        self.num_products += 1
        tangent = self.unflatten(vector.to(self.dtype))
        if self.hvp_mode == "reverse":
            if self._reverse_fn is None:
                with self._rewritten(composite=True):
                    _, self._reverse_fn = vjp(grad(self._total_loss), self.params)
            return self.flatten(self._reverse_fn(tangent)[0])
        return self._forward_products(self._batch_loss, tangent)

    __call__ = matvec

    def release(self) -> None:
        """Free the reusable graph of ``"reverse"`` mode."""
        self._reverse_fn = None

    def _choose_mode(self, memory_fraction: float) -> str:
        """``"reverse"`` if ~4x the activations of all batches fit the memory budget."""
        x0, _ = self.batches[0]
        sizes: list[int] = []

        def hook(_m: nn.Module, _i: object, out: object) -> None:
            if isinstance(out, Tensor):
                sizes.append(out.numel() * out.element_size())

        # Two samples, not one: BatchNorm1d in train mode rejects a batch of one.
        probe = x0[: min(2, len(x0))]
        handles = [m.register_forward_hook(hook) for m in self.model.modules()]
        try:
            with torch.no_grad():
                functional_call(self.model, (self.params, self.buffers), (probe,))
        finally:
            for h in handles:
                h.remove()
        per_sample = (sum(sizes) + probe.numel() * probe.element_size()) / len(probe)
        total_samples = sum(len(x) for x, _ in self.batches)
        # A double-backward graph saves activations, their gradients and BN/ReLU
        # intermediates: ~4x the forward activations, plus a few copies of the weights.
        param_bytes = self.dim * torch.empty((), dtype=self.dtype).element_size()
        need = 4 * per_sample * total_samples + 4 * param_bytes
        budget = memory_fraction * _available_memory_bytes(self.device)
        return "reverse" if need <= budget else "forward"


class StackedHessianOperator(_RewrittenBatches):
    """The Hessians ``H_1..H_S`` of one loss at S weight samples of one architecture.

    ``H_s`` is the Hessian of :class:`HessianOperator`'s loss at the weights ``w_s`` of
    sample s, ``L(w) = sum_b (n_b / N) loss_fn(model(x_b; w), y_b)``, in training-loss
    mode. The S parameter sets are stacked along a new leading dimension (what
    :func:`torch.func.stack_module_state` does) and one :func:`~torch.func.vmap`-ed
    :func:`~torch.func.functional_call` of a stateless copy of the architecture evaluates
    all S losses at once. The S losses are independent, so the Hessian of
    ``sum_s L(w_s)`` with respect to the stacked weights ``W`` is block-diagonal with
    blocks ``H_s``, and one Hessian-vector product of that sum with the stacked tangent
    ``V = (v_1; ..; v_S)`` is ``(H_1 v_1; ..; H_S v_S)``:

    * ``"forward"``: ``jvp(grad(sum_s L(w_s)), W, V)``, batch by batch;
    * ``"reverse"``: ``vjp(grad(sum_s L(w_s)), W)`` built once and reused.

    BatchNorm: the stateless copy is taken inside :func:`training_loss_mode` (train mode,
    ``track_running_stats=False``: batch statistics per sample, no buffer writes; Dropout
    off), a form vmap handles; the tests check it against :class:`HessianOperator` on
    BatchNorm models to ~1e-15 in float64.

    Vectors are ``(S, dim)`` matrices; row s is a flat vector of sample s in the order of
    :class:`HessianOperator` (trainable parameters in ``named_parameters()`` order).
    Build one with :meth:`from_models`.

    Args:
        base: Stateless template of the architecture in training-loss mode (its own
            tensors are never read; :meth:`from_models` puts it on the meta device).
        params: Stacked trainable parameters, name -> ``(S, *shape)``.
        constants: Stacked buffers and frozen parameters, name -> ``(S, *shape)``.
        loss_fn: ``loss_fn(outputs, targets)`` returning the mean loss of a batch.
        batches: List of ``(inputs, targets)`` pairs on the parameters' device.
        hvp_mode: ``"forward"`` or ``"reverse"``.
        rewrite: As :class:`HessianOperator`'s (the shift hook goes on ``base``).
    """

    def __init__(
        self,
        base: nn.Module,
        params: dict[str, Tensor],
        constants: dict[str, Tensor],
        loss_fn: LossFn,
        batches: list[Batch],
        *,
        hvp_mode: str,
        rewrite: bool = True,
    ) -> None:
        if hvp_mode not in ("forward", "reverse"):
            raise ValueError(f"hvp_mode={hvp_mode!r} must be 'forward' or 'reverse' here")
        if not params:
            raise ValueError("the models have no parameters that require grad")
        self.base, self.params, self.constants = base, params, constants
        self.loss_fn, self.batches, self.hvp_mode = loss_fn, batches, hvp_mode
        total = sum(len(x) for x, _ in batches)
        self.weights = [len(x) / total for x, _ in batches]
        first = next(iter(params.values()))
        self.num_models = first.shape[0]
        self.shapes = [p.shape[1:] for p in params.values()]
        self.numels = [math.prod(s) for s in self.shapes]
        self.dim = sum(self.numels)
        self.dtype, self.device = first.dtype, first.device
        self.num_products = 0  # stacked products (each is num_models Hessian-vector ones)
        self._reverse_fn: Callable | None = None
        self.rewrite, self.network = rewrite, base
        self.shift = data_shift(base, [x for x, _ in batches]) if rewrite else None

    @classmethod
    def from_models(
        cls,
        models: Sequence[nn.Module],
        loss_fn: LossFn,
        batches: list[Batch],
        *,
        hvp_mode: str = "auto",
        memory_fraction: float = 0.25,
        rewrite: bool = True,
    ) -> StackedHessianOperator:
        """Stack S models of one architecture (their current weights are the points).

        The models are not modified. ``"auto"`` picks ``"reverse"`` when S times the
        graph :class:`HessianOperator` estimates for one model fits ``memory_fraction``
        of free memory.

        Raises:
            ValueError: No models, or models that differ in parameter/buffer names,
                shapes, dtypes or which parameters require grad.
        """
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"hvp_mode={hvp_mode!r} is not one of {HVP_MODES}")
        if not models:
            raise ValueError("models is empty; pass at least one model")
        signatures = [_state_signature(m) for m in models]
        if any(sig != signatures[0] for sig in signatures[1:]):
            raise ValueError(
                "the models must share one architecture (same parameter and buffer names, "
                "shapes, dtypes and requires_grad) to be stacked"
            )
        trainable = [n for n, p in models[0].named_parameters() if p.requires_grad]
        named = [{**dict(m.named_parameters()), **dict(m.named_buffers())} for m in models]
        stacked = {name: torch.stack([d[name].detach() for d in named]) for name in named[0]}
        params = {name: stacked.pop(name) for name in trainable}
        with training_loss_mode(models[0]):
            if hvp_mode == "auto":
                hvp_mode = HessianOperator(
                    models[0],
                    loss_fn,
                    batches,
                    memory_fraction=memory_fraction / len(models),
                    rewrite=False,
                ).hvp_mode
            base = copy.deepcopy(models[0])  # keeps the training-loss-mode flags
        return cls(
            base.to("meta"), params, stacked, loss_fn, batches, hvp_mode=hvp_mode, rewrite=rewrite
        )

    def subset(self, index: Sequence[int]) -> StackedHessianOperator:
        """The operator of the samples ``index`` only (a new stack, no graph)."""
        rows = torch.as_tensor(list(index), dtype=torch.long, device=self.device)
        sub = StackedHessianOperator(
            self.base,
            {k: v.index_select(0, rows) for k, v in self.params.items()},
            {k: v.index_select(0, rows) for k, v in self.constants.items()},
            self.loss_fn,
            self.batches,
            hvp_mode=self.hvp_mode,
            rewrite=False,  # the shift is this stack's: no second median
        )
        sub.rewrite, sub.shift = self.rewrite, self.shift
        return sub

    # -- the loss -----------------------------------------------------------------------
    def _sample_batch_loss(
        self, params: dict[str, Tensor], constants: dict[str, Tensor], x: Tensor, y: Tensor
    ) -> Tensor:
        return self.loss_fn(functional_call(self.base, (params, constants), (x,)), y)

    def _stacked_batch_loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """``sum_s loss_fn(model(x; w_s), y)`` for one batch."""
        per_sample = vmap(self._sample_batch_loss, in_dims=(0, 0, None, None))
        return per_sample(params, self.constants, x, y).sum()

    def _stacked_total(self, params: dict[str, Tensor]) -> Tensor:
        """``sum_s L(w_s)``."""
        total = None
        for w, x, y in self._pairs():
            term = w * self._stacked_batch_loss(params, x, y)
            total = term if total is None else total + term
        assert total is not None
        return total

    def losses(self) -> list[float]:
        """``L(w_s)`` for every sample; validates targets and finiteness.

        Raises:
            ValueError: For labels outside the class range, a non-scalar or a non-finite
                loss.
        """
        out = []
        with torch.no_grad(), self._rewritten():
            for s in range(self.num_models):
                params = {k: v[s] for k, v in self.params.items()}
                constants = {k: v[s] for k, v in self.constants.items()}
                total = 0.0
                for i, (w, x, y) in enumerate(self._pairs()):
                    outputs = functional_call(self.base, (params, constants), (x,))
                    _check_targets(outputs, y, i)
                    value = self.loss_fn(outputs, y)
                    if value.ndim != 0:
                        raise ValueError(
                            f"loss_fn must return a scalar (mean over the batch), got shape "
                            f"{tuple(value.shape)}; use reduction='mean'"
                        )
                    total += w * float(value)
                if not math.isfinite(total):
                    raise ValueError(
                        f"the loss at the weights of stacked sample {s} is not finite "
                        f"(loss={total})"
                    )
                out.append(total)
        return out

    # -- vectors --------------------------------------------------------------------------
    def unflatten(self, vectors: Tensor) -> dict[str, Tensor]:
        """Split ``(S, dim)`` rows into a dict of ``(S, *shape)`` tensors."""
        chunks = vectors.split(self.numels, dim=1)
        return {
            name: c.reshape(self.num_models, *shape)
            for name, c, shape in zip(self.params, chunks, self.shapes, strict=True)
        }

    def flatten(self, tensors: dict[str, Tensor]) -> Tensor:
        """Concatenate ``(S, *shape)`` tensors into ``(S, dim)`` rows."""
        return torch.cat([t.reshape(self.num_models, -1) for t in tensors.values()], dim=1)

    # -- Hessian-vector products ------------------------------------------------------------
    def matvec(self, vectors: Tensor) -> Tensor:
        """``(H_1 v_1; ..; H_S v_S)`` for ``(S, dim)`` rows ``v_s`` (one stacked product)."""
        if vectors.shape != (self.num_models, self.dim):
            raise ValueError(
                f"expected vectors of shape {(self.num_models, self.dim)}, "
                f"got {tuple(vectors.shape)}"
            )
        self.num_products += 1
        tangent = self.unflatten(vectors.to(self.dtype))
        if self.hvp_mode == "reverse":
            if self._reverse_fn is None:
                with self._rewritten(composite=True):
                    _, self._reverse_fn = vjp(grad(self._stacked_total), self.params)
            return self.flatten(self._reverse_fn(tangent)[0])
        return self._forward_products(self._stacked_batch_loss, tangent)

    __call__ = matvec

    def release(self) -> None:
        """Free the reusable graph of ``"reverse"`` mode."""
        self._reverse_fn = None


def _state_signature(model: nn.Module) -> list[tuple]:
    """Names, shapes, dtypes and requires_grad of a model's parameters and buffers."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"expected a torch.nn.Module, got {type(model)}")
    params = [(n, p.shape, p.dtype, p.requires_grad) for n, p in model.named_parameters()]
    buffers = [(n, b.shape, b.dtype) for n, b in model.named_buffers()]
    return params + buffers


class _ActiveProducts:
    """The ``matvec(Q, index)`` of :func:`lanczos_batched` on a stacked operator.

    Finished samples stop costing compute in ``"forward"`` mode: each product is taken on
    a stack of the active samples only (re-stacking costs a copy of their weights, no
    graph). In ``"reverse"`` mode re-stacking means rebuilding the gradient graph (about
    a product's cost), so finished samples are masked (a zero row, computed and thrown
    away) until the active ones are at most half the stack, and only then re-stacked:
    at most ``log2(S)`` rebuilds and at most half the work wasted.
    """

    def __init__(self, op: StackedHessianOperator) -> None:
        self.full = op
        self.op = op
        self.members = list(range(op.num_models))
        self.row_products = 0  # Hessian-vector products computed, masked rows included

    def __call__(self, block: Tensor, index: list[int]) -> Tensor:
        if index != self.members:
            shrink = self.op.hvp_mode == "forward" or 2 * len(index) <= len(self.members)
            if shrink:
                self.op.release()
                self.op = self.full.subset(index)
                self.members = list(index)
        self.row_products += len(self.members)
        if index == self.members:
            return self.op.matvec(block)
        position = {s: i for i, s in enumerate(self.members)}
        rows = torch.tensor([position[s] for s in index], device=block.device)
        padded = block.new_zeros(len(self.members), block.shape[1])
        padded[rows] = block
        return self.op.matvec(padded)[rows]

    def release(self) -> None:
        self.op.release()
        self.full.release()


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpectralNormResult:
    """The Hessian spectral norm of a loss at one point of weight space.

    Attributes:
        value: ``max(|lambda_max|, |lambda_min|)``.
        lambda_max: Largest eigenvalue of the Hessian.
        lambda_min: Smallest eigenvalue (negative curvature shows up here).
        num_hvps: Hessian-vector products spent.
        converged: Whether the solver met its tolerance.
        method: ``"lanczos"`` or ``"power"``.
        hvp_mode: ``"forward"`` or ``"reverse"``.
        loss: The full-data loss at these weights.
        error_estimate: The solver's bound on the absolute error of ``value`` for the
            products as computed: rounding inside the products is not in it (see
            :func:`hessian_spectral_norm`, "Precision").
        seconds: Wall time.
        subsample_hvps: Products with the subsample Hessian spent on the start vector
            (``subsample`` set; each costs about ``subsample`` of a full product).
    """

    value: float
    lambda_max: float
    lambda_min: float
    num_hvps: int
    converged: bool
    method: str
    hvp_mode: str
    loss: float
    error_estimate: float
    seconds: float
    subsample_hvps: int = 0


def _check_common(method: str, tol: float, max_iters: int) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    if not (isinstance(tol, int | float) and tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a positive finite number, got {tol=}")
    if not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters must be a positive integer, got {max_iters=}")


@keep_freed_memory()
def hessian_spectral_norm(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    *,
    method: str = "lanczos",
    tol: float = 1e-4,
    max_iters: int = 100,
    generator: torch.Generator | None = None,
    hvp_mode: str = "auto",
    subsample: float | None = None,
    subsample_tol: float = 1e-2,
    target: str = "both",
    rewrite: bool = True,
) -> SpectralNormResult:
    """Spectral norm of the Hessian of the full-data loss at the model's weights.

    ``||H||_2 = max(|lambda_max(H)|, |lambda_min(H)|)`` where
    ``H = d^2/dw^2 sum_b (n_b/N) loss_fn(model(x_b; w), y_b)``.

    Args:
        model: The network (its weights are the point). Not modified: parameters,
            buffers and train/eval mode are as before on return.
        loss_fn: Mean-reduced loss ``loss_fn(outputs, targets)``, e.g.
            ``torch.nn.functional.cross_entropy``.
        batches: Iterable of ``(inputs, targets)``, e.g. a DataLoader or ``[(X, y)]``;
            moved to the model's device.
        method: ``"lanczos"`` (both extremes at once, a-posteriori stop) or ``"power"``
            (power iteration for the dominant eigenvalue, then on ``H - lambda I`` for the
            other end).
        tol: Relative accuracy of the spectral norm (see "Precision" below).
        max_iters: Maximum Hessian-vector products per solver run.
        generator: Source of the random start vector (global RNG untouched if given).
        hvp_mode: ``"auto"``, ``"forward"`` or ``"reverse"``.
        subsample: Multi-fidelity start (Lanczos only): first run Lanczos, to the
            looser ``subsample_tol``, on the Hessian of a random ``subsample`` share of
            every batch (same share of each, so the batch weights stay), then start the
            full-data Lanczos from ``|theta_max| u_max + |theta_min| u_min`` of those
            Ritz pairs and stop it with the full-data error bound as usual. The answer
            and its bound are the full-data ones; the subsample only buys a start vector
            (with BatchNorm its Hessian is of a different function, still a close one).
            None: a random start vector.
        subsample_tol: Relative tolerance of the subsample run.
        target: ``"both"``: ``tol`` bounds both extremes (relative to the norm);
            ``"norm"``: only ``value`` is guaranteed to ``tol`` and the smaller end may be
            less accurate (see :func:`lanczos`). Lanczos only.
        rewrite: Exact rewrites of the loss for the products (see
            :class:`HessianOperator` and :mod:`exactlr.curvature.rewrites`).

    Returns:
        A :class:`SpectralNormResult`.

    Precision: the products are computed in the model's dtype, and the solver's bound
    does not see their rounding. In float32 the first layer's weight derivatives of a
    BatchNorm network are sums over batch x positions that cancel large equal terms when
    the data have a dominant value (MNIST's background): for LeNet (paper preset) over
    5,500 MNIST images a plain float32 product is 3.0e-3 off float64, and float32 Lanczos
    runs from different starts each stopped with a bound below 1e-9 at values 1.4e-3 to
    3.2e-3 from the float64 norm (12.397). With ``rewrite=True`` (the default) the input
    shift of :mod:`exactlr.curvature.rewrites` removes that cancellation: the product is 1.2e-4
    off, and the norm at ``tol=1e-3`` within 1e-3 of float64. For ``tol`` below ~1e-4,
    cast the model and data to float64 (``model.double()``; ~3x the time per product on
    a CPU). The step size needs far less: alpha ~ K^(-1/2) moves by half the relative
    error of K.

    Raises:
        ValueError: Empty batches, labels outside the class range, a non-finite loss or
            product, or a bad argument.

    Example:
        >>> import torch.nn.functional as F
        >>> net = torch.nn.Linear(4, 3)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> res = hessian_spectral_norm(net, F.cross_entropy, [(x, y)])
        >>> res.value == max(abs(res.lambda_max), abs(res.lambda_min))
        True
    """
    _check_common(method, tol, max_iters)
    if subsample is not None and not (
        isinstance(subsample, int | float) and 0 < subsample < 1 and method == "lanczos"
    ):
        raise ValueError(
            f"subsample must be None or in (0, 1) with method='lanczos', got {subsample=}"
        )
    if target not in TARGETS or (target != "both" and method != "lanczos"):
        raise ValueError(f"target={target!r} must be one of {TARGETS} ('norm': Lanczos only)")
    start = time.perf_counter()
    device, _ = _module_device_dtype(model)
    data = materialize_batches(batches, device)
    subsample_hvps = 0
    with training_loss_mode(model):
        op = HessianOperator(model, loss_fn, data, hvp_mode=hvp_mode, rewrite=rewrite)
        loss = op.loss()
        v0 = random_unit_vector(op.dim, generator=generator, dtype=op.dtype, device=op.device)
        if subsample is not None:
            v0, subsample_hvps = _subsample_start(
                op,
                v0,
                subsample,
                tol=max(tol, subsample_tol),
                max_iters=max_iters,
                generator=generator,
                target=target,
            )
        try:
            if method == "lanczos":
                res = lanczos(op, v0, max_iters=max_iters, tol=tol, target=target)
                lam_max, lam_min, converged = res.lambda_max, res.lambda_min, res.converged
                error = res.error_estimate
            else:
                lam, _, _, ok1 = power_iteration(op, v0, max_iters=max_iters, tol=tol)
                # The opposite end of the spectrum is the dominant eigenvalue of H - lam I.
                v1 = random_unit_vector(
                    op.dim, generator=generator, dtype=op.dtype, device=op.device
                )
                mu, _, _, ok2 = power_iteration(
                    lambda v: op(v) - lam * v, v1, max_iters=max_iters, tol=tol
                )
                other = mu + lam
                lam_max, lam_min = max(lam, other), min(lam, other)
                converged = ok1 and ok2
                error = tol * abs(lam)
        finally:
            op.release()
    value = max(abs(lam_max), abs(lam_min))
    return SpectralNormResult(
        value=value,
        lambda_max=lam_max,
        lambda_min=lam_min,
        num_hvps=op.num_products,
        converged=converged,
        method=method,
        hvp_mode=op.hvp_mode,
        loss=loss,
        error_estimate=error,
        seconds=time.perf_counter() - start,
        subsample_hvps=subsample_hvps,
    )


@keep_freed_memory()
def hessian_spectral_norms(
    models: Sequence[nn.Module],
    loss_fn: LossFn,
    batches: Iterable[Batch],
    *,
    tol: float = 1e-4,
    max_iters: int = 100,
    generators: Sequence[torch.Generator | None] | None = None,
    hvp_mode: str = "auto",
    target: str = "both",
    rewrite: bool = True,
) -> list[SpectralNormResult]:
    """:func:`hessian_spectral_norm` (Lanczos) of S models of one architecture at once.

    ``||H_s||_2 = max(|lambda_max(H_s)|, |lambda_min(H_s)|)`` for the Hessian ``H_s`` of the
    full-data loss at the weights of ``models[s]``. The weights are stacked
    (:class:`StackedHessianOperator`) and :func:`lanczos_batched` runs one Lanczos per
    model in lockstep, each with the start vector, stopping rule and product count that
    :func:`hessian_spectral_norm` (``method="lanczos"``, no ``subsample``) would use with
    ``generator=generators[s]``; results agree with it to the solver tolerance (the
    batched product rounds differently). Finished models stop costing products in
    ``"forward"`` mode and are masked until half the stack is done in ``"reverse"``
    mode (see ``_ActiveProducts``).

    Args:
        models: The networks, one architecture (same parameter/buffer names and shapes);
            not modified.
        loss_fn: Mean-reduced loss ``loss_fn(outputs, targets)``.
        batches: Iterable of ``(inputs, targets)``; moved to the first model's device.
        tol: Relative accuracy of each spectral norm.
        max_iters: Maximum Hessian-vector products per model.
        generators: One start-vector generator per model, as ``generator`` of
            :func:`hessian_spectral_norm`; None: all drawn from the global RNG.
        hvp_mode: ``"auto"``, ``"forward"`` or ``"reverse"``; ``"auto"`` budgets memory
            for the whole stack.
        target: ``"both"`` or ``"norm"`` (see :func:`lanczos`).
        rewrite: Exact rewrites of the loss for the products (see
            :class:`HessianOperator`).

    Returns:
        One :class:`SpectralNormResult` per model, in order. ``seconds`` is the wall time
        of the whole call divided by S (the products are shared).

    Raises:
        ValueError: Models of different architectures, empty batches, bad labels, a
            non-finite loss or product, or a bad argument.
    """
    _check_common("lanczos", tol, max_iters)
    if target not in TARGETS:
        raise ValueError(f"target={target!r} is not one of {TARGETS}")
    if generators is not None and len(generators) != len(models):
        raise ValueError(f"got {len(generators)} generators for {len(models)} models")
    start = time.perf_counter()
    if not models:
        raise ValueError("models is empty; pass at least one model")
    device, _ = _module_device_dtype(models[0])
    data = materialize_batches(batches, device)
    op = StackedHessianOperator.from_models(
        models, loss_fn, data, hvp_mode=hvp_mode, rewrite=rewrite
    )
    losses = op.losses()
    gens = list(generators) if generators is not None else [None] * len(models)
    v0 = torch.stack(
        [random_unit_vector(op.dim, generator=g, dtype=op.dtype, device=op.device) for g in gens]
    )
    products = _ActiveProducts(op)
    try:
        results = lanczos_batched(products, v0, max_iters=max_iters, tol=tol, target=target)
    finally:
        products.release()
    seconds = (time.perf_counter() - start) / len(models)
    return [
        SpectralNormResult(
            value=res.spectral_norm,
            lambda_max=res.lambda_max,
            lambda_min=res.lambda_min,
            num_hvps=res.num_matvecs,
            converged=res.converged,
            method="lanczos",
            hvp_mode=op.hvp_mode,
            loss=loss,
            error_estimate=res.error_estimate,
            seconds=seconds,
        )
        for res, loss in zip(results, losses, strict=True)
    ]


def subsample_batches(
    batches: Sequence[Batch], fraction: float, *, generator: torch.Generator | None = None
) -> list[Batch]:
    """A random ``fraction`` of every batch (at least two samples of each).

    Taking the same share of each batch keeps the size weights of the loss, so the
    subsample loss estimates the full one. Indices are drawn on the CPU from ``generator``.
    """
    out: list[Batch] = []
    for x, y in batches:
        n = len(x)
        keep = min(n, max(2, math.ceil(fraction * n)))
        index = torch.randperm(n, generator=generator)[:keep].sort().values.to(x.device)
        out.append((x[index], y[index]))
    return out


def _subsample_start(
    op: HessianOperator,
    v0: Tensor,
    fraction: float,
    *,
    tol: float,
    max_iters: int,
    generator: torch.Generator | None,
    target: str,
) -> tuple[Tensor, int]:
    """Start vector for the full-data Lanczos from the Ritz pairs of a subsample Hessian."""
    # A local generator when none is given: library code leaves the global RNG alone.
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    data = subsample_batches(op.batches, fraction, generator=generator)
    sub = HessianOperator(op.model, op.loss_fn, data, hvp_mode=op.hvp_mode, rewrite=op.rewrite)
    try:
        res = lanczos(sub, v0, max_iters=max_iters, tol=tol, return_vectors=True, target=target)
    finally:
        sub.release()
    assert res.vector_max is not None and res.vector_min is not None
    # Weighting by |theta| favours the dominant end, which the norm needs most; the other
    # end still spans the start so both extremes converge together.
    start = abs(res.lambda_max) * res.vector_max + abs(res.lambda_min) * res.vector_min
    if not torch.isfinite(start).all() or float(start.norm()) == 0.0:
        return v0, sub.num_products
    return start / start.norm(), sub.num_products


def full_loss(model: nn.Module, loss_fn: LossFn, batches: Iterable[Batch]) -> float:
    """The size-weighted mean loss over ``batches`` as training computes it, without grad.

    The model is left unchanged (see :func:`training_loss_mode`).

    Raises:
        ValueError: Empty batches, bad labels, or a non-finite loss.
    """
    device, _ = _module_device_dtype(model)
    data = materialize_batches(batches, device)
    with training_loss_mode(model):
        return HessianOperator(model, loss_fn, data, hvp_mode="forward", rewrite=False).loss()
