"""Extreme eigenvalues of a symmetric operator given only as a matvec (pure functions).

:func:`lanczos` (block Lanczos with full reorthogonalisation, a-posteriori Ritz error
bound), :func:`lanczos_batched` (one Lanczos per operator, in lockstep, sharing products)
and :func:`power_iteration` (residual stop). The vectors stay on their device; each
product brings its column of the projected matrix and one norm to the host in one copy
(the stopping rules need them), and the small dense algebra runs there in numpy. Every
result names what its bound certifies (:class:`EigenResult`).
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

#: The ``ceiling`` stop of :func:`lanczos` also needs the dominant Ritz value within this
#: share of itself: a bound far wider than that comes from a Krylov space that may not
#: have picked up the top of the spectrum yet (the first Ritz values of a Hessian with a
#: few outliers over a flat bulk have residuals far below the largest eigenvalue).
_CEILING_SETTLED = 0.1


@dataclass(frozen=True)
class EigenResult:
    """Extreme eigenvalues of a symmetric operator found by an iterative solver.

    Attributes:
        lambda_max: Largest (algebraic) eigenvalue estimate.
        lambda_min: Smallest (algebraic) eigenvalue estimate.
        num_matvecs: Products with the operator that were spent.
        converged: Whether the stopping rule was met before ``max_iters``: the bound
            ``error_estimate`` of what ``certified`` names is at most ``tol`` times the
            spectral norm.
        error_estimate: A-posteriori bound on the absolute error of the values named by
            ``certified``, as Ritz values: each lies within it of *an* eigenvalue (a
            residual bound cannot see an extreme eigenvalue the Krylov space has not
            found yet; see :func:`lanczos`).
        vector_max: Unit Ritz vector of ``lambda_max`` (Lanczos with
            ``return_vectors=True``), else None.
        vector_min: Unit Ritz vector of ``lambda_min``, likewise.
        certified: What ``error_estimate`` bounds: ``"both"`` (``lambda_max`` and
            ``lambda_min``) or ``"norm"`` (the spectral norm and the end that gives it;
            the other end is an estimate that lies inside the spectrum).
    """

    lambda_max: float
    lambda_min: float
    num_matvecs: int
    converged: bool
    error_estimate: float
    vector_max: Tensor | None = field(default=None, repr=False, compare=False)
    vector_min: Tensor | None = field(default=None, repr=False, compare=False)
    certified: str = "both"

    @property
    def spectral_norm(self) -> float:
        """``max(|lambda_max|, |lambda_min|)``."""
        return max(abs(self.lambda_max), abs(self.lambda_min))


def _check_solver_args(v0: Tensor, max_iters: int, tol: float, *, block: bool = False) -> None:
    if not (v0.ndim == 1 or (block and v0.ndim == 2)) or v0.numel() == 0:
        shape = "a (dim,) or (block, dim)" if block else "a non-empty 1-D"
        raise ValueError(f"v0 must be {shape} tensor, got shape {tuple(v0.shape)}")
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
    """The 0-d or 1-d tensors as Python floats, in one device-to-host copy; ValueError if
    any is not finite (a product with a NaN or inf makes its Rayleigh quotient and norm
    so)."""
    values = torch.cat([t.double().reshape(-1) for t in scalars]).tolist()
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

    Iterates ``v <- A v / ||A v||`` with the Rayleigh quotient ``theta = v^T A v`` and
    stops when the residual ``||A v - theta v||`` is at most ``tol * |theta|``: a
    symmetric ``A`` then has an eigenvalue within ``tol * |theta|`` of ``theta``. (The
    change of ``theta`` between iterations, PyHessian's rule, is no error bound: it is
    small whenever convergence is slow.) :func:`power_iteration_result` gives the same
    run with its residual.

    Args:
        matvec: ``v -> A v`` for a symmetric ``A``.
        v0: Start vector (1-D, non-zero).
        max_iters: Maximum number of products.
        tol: Relative tolerance on the residual (see above).

    Returns:
        ``(eigenvalue, eigenvector, num_matvecs, converged)``; the eigenvalue is signed
        and the vector is the one whose residual was measured.

    Raises:
        ValueError: For bad arguments or a non-finite product.

    Example:
        >>> a = torch.diag(torch.tensor([3.0, -5.0, 1.0], dtype=torch.float64))
        >>> lam, _, _, _ = power_iteration(lambda v: a @ v, torch.ones(3, dtype=a.dtype))
        >>> round(lam, 3)
        -5.0
    """
    res = power_iteration_result(matvec, v0, max_iters=max_iters, tol=tol)
    assert res.vector_max is not None
    return res.lambda_max, res.vector_max, res.num_matvecs, res.converged


def power_iteration_result(
    matvec: Matvec,
    v0: Tensor,
    *,
    max_iters: int = 100,
    tol: float = 1e-4,
    scale: float | None = None,
) -> EigenResult:
    """:func:`power_iteration` as an :class:`EigenResult` with its residual bound.

    ``lambda_max`` and ``lambda_min`` are both the one eigenvalue found, ``vector_max``
    its vector, ``error_estimate`` the last residual ``||A v - theta v||`` (an
    eigenvalue lies within it of ``theta``). With ``scale`` the stop is
    ``residual <= tol * scale`` instead of ``tol * |theta|`` (a tolerance relative to
    another quantity, e.g. the spectral norm when ``A`` is a shifted Hessian).
    """
    _check_solver_args(v0, max_iters, tol)
    v = v0 / v0.norm()
    theta, residual = 0.0, math.inf
    for k in range(1, max_iters + 1):
        w = _shaped_product(matvec, v)
        theta_t = torch.dot(v.double(), w.double())
        norm = w.norm()
        r_t = (w.double() - theta_t * v.double()).norm()
        theta, norm_value, residual = _host_scalars(theta_t, norm, r_t)
        if norm_value == 0.0:  # v is in the null space: the eigenvalue is 0 exactly
            return EigenResult(0.0, 0.0, k, True, 0.0, v, v)
        if residual <= tol * (abs(theta) if scale is None else scale):
            return EigenResult(theta, theta, k, True, residual, v, v)
        if k == max_iters:
            break
        v = w / norm
    return EigenResult(theta, theta, max_iters, False, residual, v, v)


def lanczos(
    matvec: Matvec,
    v0: Tensor,
    *,
    max_iters: int = 100,
    tol: float = 1e-4,
    return_vectors: bool = False,
    target: str = "both",
    ceiling: float | None = None,
    ceiling_after: int = 3,
) -> EigenResult:
    """(Block) Lanczos with full reorthogonalisation for both extreme eigenvalues.

    After ``k`` products the orthonormal Krylov basis ``Q_k`` and ``H_k = Q_k^T A Q_k``
    (tridiagonal for one start vector) give Ritz values ``theta_i`` with residuals
    ``r_i = ||A Q_k s_i - theta_i Q_k s_i||`` (``s`` the eigenvectors of ``H_k``; see
    ``_LanczosRun``). An eigenvalue of ``A`` lies within ``min(r_i, r_i^2 / gap_i)`` of
    ``theta_i``; ``gap_i`` is estimated as the distance to the neighbouring Ritz value
    less that value's own residual (the plain Ritz gap overstates the spectral gap while
    the neighbour is unconverged), and with three Ritz values or fewer the bound is
    ``r_i``. With ``target="both"`` it stops when that bound, for both extreme Ritz
    values, is at most ``tol * max(|theta_max|, |theta_min|)``; so ``tol`` is the
    relative accuracy of both extremes measured against the spectral norm. With
    ``target="norm"`` only the spectral norm must be that accurate: the bound of the
    dominant end, and the other end may be loose as long as ``|theta_other| +
    bound_other`` cannot exceed the dominant ``|theta|`` by more than ``tol`` times it.

    What the bound certifies: that each extreme Ritz value is within it of *an*
    eigenvalue, and (Ritz values lie inside the spectrum) that ``lambda_max >=
    theta_max`` and ``lambda_min <= theta_min``. It cannot see an extreme eigenvalue the
    Krylov space has not picked up yet: when the start vector has a small component
    along its eigenvector and a near neighbour converges first, the run stops at the
    neighbour with a small bound. That is a matter of chance over the random start; a
    block of ``b`` start vectors (``v0`` of shape ``(b, dim)``) makes it far less likely
    (the block must miss the eigenvector in every start vector, and a cluster of up to
    ``b`` eigenvalues converges at the rate of the gap behind it), at the price of a
    Krylov degree that grows ``b`` times slower per product.
    ``tests/test_solvers_reference.py`` counts the misses against dense eigenvalues.

    Args:
        matvec: ``v -> A v`` for a symmetric ``A``.
        v0: Start vector (1-D, non-zero) or a block of start vectors ``(b, dim)`` of
            full rank.
        max_iters: Maximum number of products.
        tol: Relative tolerance on the extreme eigenvalues (see above).
        return_vectors: Also return the unit Ritz vectors of both extremes (e.g. as
            start vectors for another operator).
        target: ``"both"`` or ``"norm"``: what ``tol`` applies to (see above).
        ceiling: Also stop, with ``certified="ceiling"``, as soon as the spectral norm
            is certified to be at most ``ceiling`` (the dominant ``|theta|`` plus its
            bound, the other end included as for ``"norm"``), after ``ceiling_after``
            products at least and with that bound within a tenth of the norm: a caller
            that needs only the largest norm over several operators (Algorithm 2's
            running maximum) does not need the smaller ones to ``tol``. None: no such
            stop.
        ceiling_after: The fewest products before the ``ceiling`` stop: 3 from a random
            start, whose first Ritz values may not have picked up the top of the
            spectrum yet; 2 from a start that already carries it (the multi-fidelity
            start of :mod:`exactlr.curvature.multifidelity`).

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
    _check_solver_args(v0, max_iters, tol, block=True)
    run = _LanczosRun(
        v0, max_iters=max_iters, tol=tol, target=target, ceiling=ceiling, after=ceiling_after
    )
    while not run.step(_shaped_product(matvec, run.vector)):
        pass
    return run.result(return_vectors=return_vectors)


class _LanczosRun:
    """One run of :func:`lanczos` as a state machine, so that runs can share products.

    Block Lanczos with full reorthogonalisation, written as Rayleigh-Ritz on a growing
    orthonormal basis ``Q``: it starts from ``b`` orthonormalised start vectors (the
    block), and the product ``A q_j`` of every basis vector, orthogonalised against the
    basis, adds one new basis vector. So ``A Q_k`` lies in ``span(Q_{k+b})`` and
    ``Q_{k+b}^T A Q_k = H`` (lower part computed, upper by symmetry) holds exactly up to
    rounding: the Ritz pairs ``(theta_i, Q_k s_i)`` come from the eigenvectors of the
    leading ``k x k`` block ``H_k``, and the residual ``||A Q_k s_i - theta_i Q_k s_i||``
    is ``r_i = ||E s_i||`` with ``E`` the ``b`` rows of ``H`` below ``H_k``. With
    ``b = 1`` this is plain Lanczos (``H_k`` tridiagonal, ``r_i = beta_k |s_{k,i}|``).

    ``vector`` is the next basis vector ``q_k``; ``step(A q_k)`` does one iteration and
    returns True once the run has stopped; ``result()`` then gives its
    :class:`EigenResult`. :func:`lanczos` and :func:`lanczos_batched` both drive it, so a
    batched run is the same iteration as a single one.
    """

    def __init__(
        self,
        v0: Tensor,
        *,
        max_iters: int,
        tol: float,
        target: str,
        ceiling: float | None = None,
        after: int = 3,
    ) -> None:
        if target not in TARGETS:
            raise ValueError(f"target={target!r} is not one of {TARGETS}")
        self.ceiling, self.ceiling_after = ceiling, after
        self.certified = "both" if target == "both" else "norm"
        block = v0.reshape(-1, v0.shape[-1])
        self.dim = block.shape[1]
        self.max_iters = min(max_iters, self.dim)
        self.tol, self.target = tol, target
        self.capacity = min(self.max_iters + block.shape[0], self.dim)
        self.basis = torch.empty(
            min(self.capacity, 16 + block.shape[0]), self.dim, dtype=v0.dtype, device=v0.device
        )
        q, _ = torch.linalg.qr(block.double().T)
        self.size = min(block.shape[0], self.dim)  # basis vectors so far
        self.basis[: self.size] = q.T[: self.size].to(v0.dtype)
        # Host side (numpy, float64): the lower part of H = Q^T A Q, Ritz values/vectors.
        self.h = np.zeros((self.capacity, self.capacity))
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
        """One iteration with ``w = A q_k``; True when the run has stopped.

        The vectors stay on their device; the new column of ``H`` comes to the host in
        one copy (the only synchronisation with a GPU per product), and the small dense
        algebra and stopping rule run there in numpy.
        """
        w, column = self.orthogonalise(w)
        return self.finish(w, _host_scalars(column))

    def orthogonalise(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """The device half of :meth:`step`: ``(w_perp, column)``; ``column`` holds
        ``q_k^T A q_k`` (in float64), ``q_i^T A q_k`` for the basis vectors after ``q_k``
        and ``||w_perp||``, not read yet (a batched run reads all its runs' in one copy)."""
        if self.stopped is not None:
            raise RuntimeError("this Lanczos run has already stopped")
        k, active = self.k, self.basis[: self.size]
        alpha = torch.dot(active[k].double(), w.double())
        # Full reorthogonalisation, twice ("twice is enough"): keeps Ritz values from
        # ghosting, cheap next to a Hessian-vector product.
        coeffs = active @ w
        w = w - active.T @ coeffs
        w = w - active.T @ (active @ w)
        below = coeffs[k + 1 :].double()
        return w, torch.cat([alpha.view(1), below, w.norm().double().view(1)])

    def finish(self, w: Tensor, column: list[float]) -> bool:
        """The host half of :meth:`step`, given the column of :meth:`orthogonalise`."""
        k, n = self.k, self.size
        beta = column[-1]
        self.h[k:n, k] = column[:-1]
        num = k + 1
        lower = np.tril(self.h[:num, :num])
        self.theta, self.s = np.linalg.eigh(lower + np.tril(lower, -1).T)
        scale = max(abs(float(self.theta[0])), abs(float(self.theta[-1])))
        grows = beta > 1e-10 * max(scale, 1e-300) and n < self.dim
        self.error = self._bound(num, beta if grows else 0.0)
        invariant = num == n and not grows  # Q_k spans an invariant subspace: exact
        if invariant or (num >= 2 and self.error <= self.tol * scale) or scale == beta == 0.0:
            self.stopped = (num, True)
            return True
        if (
            self.ceiling is not None
            and num >= self.ceiling_after
            and self.norm_upper <= self.ceiling
            and self.norm_error <= _CEILING_SETTLED * scale
        ):
            self.stopped, self.certified = (num, True), "ceiling"
            return True
        if num == self.max_iters:
            self.stopped = (self.max_iters, False)
            return True
        if grows:
            self._append(w / beta, beta)
        self.k = num
        return False

    def _append(self, q: Tensor, beta: float) -> None:
        """Add ``q`` to the basis (growing its storage) with ``H[n, k] = beta``."""
        n = self.size
        if n >= self.basis.shape[0]:
            grown = torch.empty(
                min(2 * self.basis.shape[0], self.capacity),
                self.dim,
                dtype=self.basis.dtype,
                device=self.basis.device,
            )
            grown[:n] = self.basis[:n]
            self.basis = grown
        self.basis[n] = q
        self.h[n, self.k] = beta
        self.size = n + 1

    def _bound(self, num: int, beta: float) -> float:
        """The error bound of the Ritz values of ``H_num`` that ``target`` asks for.

        ``beta``: the norm of the new residual direction of ``A q_k`` (0 if none). Also
        sets ``norm_upper``, the dominant ``|theta|`` plus its ``"norm"`` bound.
        """
        theta, s = self.theta, self.s
        rows = np.vstack([self.h[num : self.size, :num], np.zeros((1, num))])
        rows[-1, num - 1] = beta
        residual = np.linalg.norm(rows @ s, axis=0)
        error_min, error_max = _ritz_error(theta, residual, 0), _ritz_error(theta, residual, -1)
        top, low = abs(float(theta[-1])), abs(float(theta[0]))
        # Ritz values lie inside the spectrum, so the dominant |theta| is a lower bound of
        # the norm; the other end can only matter if it may overtake it.
        if top >= low:
            norm_error = max(error_max, low + error_min - top)
        else:
            norm_error = max(error_min, top + error_max - low)
        self.norm_upper, self.norm_error = max(top, low) + norm_error, norm_error
        return max(error_min, error_max) if self.target == "both" else norm_error

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
        return EigenResult(
            float(theta[-1]),
            float(theta[0]),
            num,
            converged,
            self.error,
            *vectors,
            certified=self.certified,
        )


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
    if v0.ndim not in (2, 3) or v0.shape[0] == 0:
        raise ValueError(
            f"v0 must be a non-empty (S, dim) or (S, block, dim) tensor, got {tuple(v0.shape)}"
        )
    for row in v0:
        _check_solver_args(row, max_iters, tol, block=True)
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
        scalars = _host_scalars(*(column for _, column in halves))
        still, offset = [], 0
        for s, (w, column) in zip(active, halves, strict=True):
            if not runs[s].finish(w, scalars[offset : offset + column.numel()]):
                still.append(s)
            offset += column.numel()
        active = still
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
