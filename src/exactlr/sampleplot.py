"""Algorithm 2's samples on a matplotlib axis, for ``exactlr lr --plot`` and the harness.

Screened samples (:mod:`exactlr.screening`) are drawn hollow: their value is the
subsample's norm, not the full-data one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["draw_samples"]


def draw_samples(ax: Any, samples: Sequence[float], certified: Sequence[str | None]) -> None:
    """Plot ``samples`` against 1..N: filled dots, hollow ones where ``certified`` is
    ``"screened"`` (``certified`` may be empty: records not kept)."""
    kinds = list(certified) or [None] * len(samples)
    for screened in (False, True):
        points = [
            (j, v)
            for j, (v, kind) in enumerate(zip(samples, kinds, strict=True), start=1)
            if (kind == "screened") == screened
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            label = "subsample (screened)" if screened else "||H(w_j)||_2"
            ax.plot(xs, ys, "o", mfc="none" if screened else None, color="tab:blue", label=label)
