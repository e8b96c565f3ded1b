"""Extreme eigenvalues of a symmetric operator given only as a matvec (pure functions).

:func:`lanczos` (full reorthogonalisation, a-posteriori Ritz error bound),
:func:`lanczos_batched` (one Lanczos per operator, in lockstep, sharing products) and
:func:`power_iteration`. The vectors stay on their device; each product brings two
scalars to the host in one copy (the stopping rules need them), and the small tridiagonal
algebra runs there in numpy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

Matvec = Callable[[Tensor], Tensor]
StackedMatvec = Callable[[Tensor, list[int]], Tensor]

TARGETS = ("both", "norm")


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
        # next eigenvalue, and r^2 / gap claims far too much; with three, the one interior
        # Ritz value is far from converged after a warm start (the multi-fidelity start of
        # hessian_spectral_norm). Only r is safe: benchmarks/bench_pyhessian.py measures
        # the error of such runs against a float64 reference.
        return r
    j = 1 if i == 0 else -2
    gap = abs(float(theta[i] - theta[j])) - float(residual[j])
    return min(r, r * r / gap) if gap > 0 else r
