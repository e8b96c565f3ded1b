"""How a spectral norm is computed: :class:`SpectralOptions`, one typed value.

The solver (Lanczos or power iteration), its tolerance and product budget, the product
mode, the multi-fidelity start, the exact rewrites and the checks, held together so that
callers further up (:mod:`exactlr.smoothness`, :mod:`exactlr.stepsize`, the paper's
scales) pass them on without keyword chains. :meth:`SpectralOptions.validate` names the
first bad option; :func:`~exactlr.curvature.spectral.hessian_spectral_norm` runs them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from exactlr.curvature.solvers import TARGETS

METHODS = ("lanczos", "power")

#: ``subsample="auto"``: the share of the data whose Hessian gives the start vector,
#: :data:`AUTO_SUBSAMPLE_SHARE`, raised so that the subsample holds at least
#: :data:`AUTO_SUBSAMPLE_MIN` examples, and no subsample at all where that share would
#: exceed :data:`AUTO_SUBSAMPLE_MAX` (under 2,000 examples: a product is cheap there and
#: a subsample of a few examples gives a poor start). ``benchmarks/bench_lr_cost.py``
#: (``sub=`` settings) and ``benchmarks/bench_pyhessian.py`` measure the choice.
AUTO_SUBSAMPLE_SHARE = 0.05
AUTO_SUBSAMPLE_MIN = 200
AUTO_SUBSAMPLE_MAX = 0.1


def resolve_subsample(
    subsample: float | str | None, num_examples: int, method: str = "lanczos"
) -> float | None:
    """The subsample share that ``subsample`` means for ``num_examples`` examples.

    A number or None is itself; ``"auto"`` is ``max(AUTO_SUBSAMPLE_SHARE,
    AUTO_SUBSAMPLE_MIN / num_examples)``, or None when that exceeds
    ``AUTO_SUBSAMPLE_MAX`` or ``method`` is not ``"lanczos"`` (power iteration takes no
    start from a subsample).

    Example:
        >>> resolve_subsample("auto", 5500), resolve_subsample("auto", 1000)
        (0.05, None)
    """
    if subsample != "auto":
        return subsample  # type: ignore[return-value]
    if method != "lanczos" or num_examples <= 0:
        return None
    share = max(AUTO_SUBSAMPLE_SHARE, AUTO_SUBSAMPLE_MIN / num_examples)
    return share if share <= AUTO_SUBSAMPLE_MAX else None


@dataclass(frozen=True)
class SpectralOptions:
    """How a spectral norm is computed: solver, tolerance, products, start, rewrites.

    Attributes:
        method: ``"lanczos"`` (both extremes at once, a-posteriori stop) or ``"power"``
            (power iteration for the dominant eigenvalue, then on ``H - lambda I`` for
            the other end).
        tol: Relative accuracy of the spectral norm; None: the caller's default
            (``1e-4`` for :func:`hessian_spectral_norm`,
            :data:`~exactlr.smoothness.LR_TOL` for Algorithm 2 and the step size).
        max_iters: Maximum Hessian-vector products per solver run.
        hvp_mode: ``"auto"``, ``"forward"`` or ``"reverse"`` (see
            :mod:`exactlr.curvature.operators`).
        subsample: Multi-fidelity start (Lanczos only): the share of every batch whose
            Hessian gives the start vector (see :func:`hessian_spectral_norm`);
            ``"auto"`` (the default): a share that depends on the number of examples
            (:func:`resolve_subsample`: 5% of 2,000 examples or more, none below);
            None: a random start vector.
        subsample_tol: Relative tolerance of the subsample run.
        target: ``"both"``: ``tol`` bounds both extremes (relative to the norm);
            ``"norm"``: only the norm (see :func:`~exactlr.curvature.solvers.lanczos`);
            None: the caller's default (``"norm"`` with Lanczos for
            :func:`hessian_spectral_norm` and
            :func:`~exactlr.smoothness.estimate_smoothness`, ``"both"`` with power
            iteration).
        rewrite: Exact rewrites of the loss for the products
            (:mod:`exactlr.curvature.rewrites`).
        stop_below_max: Algorithm 2 only (Lanczos): stop a sample's solver as soon as
            its norm is certified to be at most the running maximum of the samples
            before it (it cannot change K_hat); its record is then a lower estimate
            (``certified="ceiling"``). False: every sample to ``tol``.
        screen: Algorithm 2 only, with ``stop_below_max`` and a subsample start, N fixed
            and one sample at a time (:mod:`exactlr.screening`): every sample's
            subsample norm comes first, the samples are then solved on all the data in
            decreasing order of it, and one whose subsample norm (plus its bound) is
            below ``screen`` times the largest full-data norm so far skips the
            full-data solve (``certified="screened"``; its record is the subsample
            estimate). None: no screen, samples in draw order.
        check_labels: Check the class targets of a cross-entropy ``loss_fn``
            (:mod:`exactlr.curvature.objective`).
        check_determinism: Evaluate the loss and one product twice, on the first
            examples of the first batch, and raise if they differ
            (:meth:`~exactlr.curvature.operators.LossOperator.check_deterministic`).
    """

    method: str = "lanczos"
    tol: float | None = None
    max_iters: int = 100
    hvp_mode: str = "auto"
    subsample: float | str | None = "auto"
    subsample_tol: float = 1e-2
    target: str | None = None
    rewrite: bool = True
    stop_below_max: bool = True
    screen: float | None = 0.5
    check_labels: bool = True
    check_determinism: bool = True

    @classmethod
    def from_keywords(
        cls, base: SpectralOptions | None = None, /, **keywords: Any
    ) -> SpectralOptions:
        """``base`` (default: all defaults) with the options named by ``keywords`` replaced.

        Raises:
            ValueError: A keyword that is not an option, naming it and the valid ones, or
                a ``base`` that is not a :class:`SpectralOptions`.
        """
        if base is None:
            base = cls()
        if not isinstance(base, SpectralOptions):
            raise ValueError(f"options must be a SpectralOptions, got {type(base).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(keywords) - set(names))
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(unknown)} for the spectral norm; "
                f"valid options: {', '.join(names)}"
            )
        return dataclasses.replace(base, **keywords)

    def with_target(self, default: str) -> SpectralOptions:
        """These options with ``target`` set to ``default`` if it is None."""
        return self if self.target is not None else dataclasses.replace(self, target=default)

    def with_tol(self, default: float) -> SpectralOptions:
        """These options with ``tol`` set to ``default`` if it is None."""
        return self if self.tol is not None else dataclasses.replace(self, tol=default)

    def validate(self) -> None:
        """Raise ValueError naming the first bad option and what to do."""
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {METHODS}")
        tol, max_iters, subsample = self.tol, self.max_iters, self.subsample
        if tol is not None and (
            isinstance(tol, bool) or not (isinstance(tol, int | float) and 0 < tol < 1)
        ):
            raise ValueError(f"tol is a relative accuracy strictly between 0 and 1, got {tol=}")
        if not isinstance(max_iters, int) or max_iters < 1:
            raise ValueError(f"max_iters must be a positive integer, got {max_iters=}")
        if subsample not in (None, "auto") and not (
            isinstance(subsample, int | float)
            and not isinstance(subsample, bool)
            and 0 < subsample < 1
            and self.method == "lanczos"
        ):
            raise ValueError(
                "subsample must be None, 'auto' or a share in (0, 1) with method='lanczos', "
                f"got {subsample=}"
            )
        screen = self.screen
        if screen is not None and (
            isinstance(screen, bool) or not (isinstance(screen, int | float) and 0 < screen <= 1)
        ):
            raise ValueError(f"screen must be None or a share in (0, 1], got {screen=}")
        target = self.target
        if target is not None and (
            target not in TARGETS or (target != "both" and self.method != "lanczos")
        ):
            raise ValueError(f"target={target!r} must be one of {TARGETS} ('norm': Lanczos only)")
