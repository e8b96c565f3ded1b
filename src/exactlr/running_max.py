"""Algorithm 2's record: each sample, the running maximum and the adaptive stop.

Algorithm 2 (:mod:`exactlr.smoothness`) evaluates weight samples in draw order; this
module keeps what it learns. Each sample becomes a :class:`SampleRecord`; the running
maximum ``max(samples[:j+1])`` (K_hat after j+1 samples) is Theorem 4's sequence; the
adaptive stop ends the loop once that maximum has not grown by more than ``rel_tol``
(relative) over ``patience`` consecutive samples. :class:`SampleTrace` holds that state
and gives the :class:`SmoothnessEstimate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SampleEvaluation",
    "SampleRecord",
    "SampleTrace",
    "SmoothnessEstimate",
    "check_stop_arguments",
]


@dataclass(frozen=True)
class SampleRecord:
    """One weight sample of Algorithm 2.

    Attributes:
        index: Sample number, from 0.
        value: Hessian spectral norm at this sample (max over batches for "minibatch").
        lambda_max: Largest Hessian eigenvalue (at the batch giving ``value``).
        lambda_min: Smallest Hessian eigenvalue (at the batch giving ``value``).
        num_hvps: Hessian-vector products spent on this sample.
        seconds: Wall time of this sample.
        converged: Whether every solver run met its tolerance.
        seed: The seed the sample's weights were drawn with.
        loss: Full-data (or max mini-batch) loss at this sample.
        subsample_hvps: Products with the subsample Hessian of the multi-fidelity start
            (``subsample=``), each on that share of the data; not in ``num_hvps``.
        certified: ``"norm"``: ``value`` is the spectral norm to ``tol``; ``"ceiling"``:
            the solver stopped once the norm was certified to be at most the running
            maximum before this sample (``stop_below_max``), so ``value`` is a lower
            estimate and K_hat is unchanged by it; ``"both"``: both extremes to ``tol``;
            ``"screened"``: no full-data solve, its subsample norm was below
            ``screen`` times a full-data norm of another sample, so ``value`` is that
            subsample estimate (:mod:`exactlr.screening`).
    """

    index: int
    value: float
    lambda_max: float
    lambda_min: float
    num_hvps: int
    seconds: float
    converged: bool
    seed: int
    loss: float
    subsample_hvps: int = 0
    certified: str = "norm"


@dataclass(frozen=True)
class SmoothnessEstimate:
    """Result of Algorithm 2.

    Attributes:
        k_hat: ``max_j ||H(w_j)||_2``.
        samples: Per-sample spectral norms, in draw order.
        records: Per-sample details (:class:`SampleRecord`).
        running_max: ``max(samples[:j+1])`` for each j (Theorem 4's sequence).
        stopped_early: True if the adaptive stop ended the loop before ``num_samples``.
        variant: ``"full"`` or ``"minibatch"``.
        discarded: Samples evaluated in the adaptive stop's last group
            (``sample_batch > 1``) after the stop, and left out of every other field.
    """

    k_hat: float
    samples: list[float]
    records: list[SampleRecord] = field(repr=False)
    running_max: list[float] = field(repr=False)
    stopped_early: bool = False
    variant: str = "full"
    discarded: int = 0

    @property
    def num_hvps(self) -> int:
        """Total Hessian-vector products over all samples."""
        return sum(r.num_hvps for r in self.records)

    @property
    def seconds(self) -> float:
        """Total wall time over all samples."""
        return sum(r.seconds for r in self.records)


@dataclass(frozen=True)
class SampleEvaluation:
    """The spectral norm of one weight sample, as a record needs it."""

    value: float
    lambda_max: float
    lambda_min: float
    num_hvps: int
    converged: bool
    loss: float
    subsample_hvps: int = 0
    certified: str = "norm"


def check_stop_arguments(patience: int | None, rel_tol: float) -> None:
    """Raise ValueError naming a bad ``patience`` or ``rel_tol`` of the adaptive stop."""
    if patience is not None and (not isinstance(patience, int) or patience < 1):
        raise ValueError(f"patience must be None or a positive integer, got {patience=}")
    if not (rel_tol >= 0 and math.isfinite(rel_tol)):
        raise ValueError(f"rel_tol must be a non-negative finite number, got {rel_tol=}")


class SampleTrace:
    """Algorithm 2's running state: the records, the running max and the adaptive stop."""

    def __init__(self, num_samples: int, patience: int | None, rel_tol: float, bar: Any) -> None:
        self.num_samples, self.patience, self.rel_tol = num_samples, patience, rel_tol
        self.bar = bar
        self.records: list[SampleRecord] = []
        self.running: list[float] = []
        self.since_growth = 0
        self.stopped_early = False
        self.discarded = 0

    def extend(
        self,
        first: int,
        seeds: list[int],
        evaluations: list[SampleEvaluation],
        seconds: float | list[float],
    ) -> bool:
        """Record a group's samples in order; True once the adaptive stop has fired.

        ``seconds``: each sample's wall time (one value: the same for all). The group's
        samples after the stopping one are counted in ``discarded``.
        """
        times = seconds if isinstance(seconds, list) else [seconds] * len(seeds)
        for offset, (seed, ev, sec) in enumerate(zip(seeds, evaluations, times, strict=True)):
            index = first + offset
            self.records.append(
                SampleRecord(
                    index=index,
                    value=ev.value,
                    lambda_max=ev.lambda_max,
                    lambda_min=ev.lambda_min,
                    num_hvps=ev.num_hvps,
                    seconds=sec,
                    converged=ev.converged,
                    seed=int(seed),
                    loss=ev.loss,
                    subsample_hvps=ev.subsample_hvps,
                    certified=ev.certified,
                )
            )
            self._update_running(ev.value)
            patience = self.patience
            last = index + 1 == self.num_samples
            if patience is not None and self.since_growth >= patience and not last:
                self.stopped_early = True
                self.discarded = len(seeds) - offset - 1
                return True
        return False

    def _update_running(self, value: float) -> None:
        """Append to the running max and count the samples since it last grew."""
        previous = self.running[-1] if self.running else None
        self.running.append(value if previous is None else max(previous, value))
        if previous is not None and self.running[-1] > previous * (1 + self.rel_tol):
            self.since_growth = 0
        elif previous is not None:
            self.since_growth += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(k_hat=f"{self.running[-1]:.4g}", last=f"{value:.4g}")

    def estimate(self, variant: str) -> SmoothnessEstimate:
        """The :class:`SmoothnessEstimate` of the samples recorded."""
        return SmoothnessEstimate(
            k_hat=self.running[-1],
            samples=[r.value for r in self.records],
            records=self.records,
            running_max=self.running,
            stopped_early=self.stopped_early,
            variant=variant,
            discarded=self.discarded,
        )
