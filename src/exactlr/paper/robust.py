"""A verdict measure less sensitive to the last epoch: the median of the last epochs.

A full-batch run's gradient norm can jump several-fold from one step to the next, so a
verdict read off the last epoch alone can flip on noise. :func:`tail_median` is the
median of a run's gradient norm over its last :data:`TAIL_SHARE` of epochs (at least
one epoch); :func:`tail_verdicts` repeats the claim-1 and claim-3 verdicts of
:func:`exactlr.paper.report.row_verdicts` with it and says which of them the final
value and the tail median disagree on.

Example:
    >>> tail_median([9.0, 5.0, 4.0, 3.0, 2.0, 1.0, 8.0, 7.0, 6.0, 5.0, 0.5])
    0.5
    >>> tail_median([9.0, 5.0, 4.0, 3.0, 2.0, 1.0, 8.0, 7.0, 6.0, 5.0, 0.5], share=0.3)
    5.0
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

__all__ = ["TAIL_SHARE", "tail_epochs", "tail_median", "tail_summary", "tail_verdicts"]

#: Share of a run's epochs whose gradient norms the tail median takes.
TAIL_SHARE = 0.1

#: The verdicts repeated with the tail median: (name, role compared against ours).
_COMPARED = (
    ("ours_lowest", None),
    ("ours_below_best_scheduler", "scheduler"),
    ("ours_below_best_constant", "constant"),
)


def tail_epochs(num_epochs: int, share: float = TAIL_SHARE) -> int:
    """The number of last epochs the tail median takes: ceil(share x epochs), at least 1.

    Example:
        >>> tail_epochs(100), tail_epochs(30), tail_epochs(3)
        (10, 3, 1)
    """
    if not 0 < share <= 1:
        raise ValueError(f"share={share} must be in (0, 1]")
    return max(1, math.ceil(share * num_epochs - 1e-9))


def tail_median(values: Sequence[float], share: float = TAIL_SHARE) -> float:
    """Median of ``values[1:]`` (epochs 1..E; index 0 is w0) over the last
    :func:`tail_epochs` epochs. A NaN counts as infinite (a diverged run ranks last);
    with no trained epoch, the value at w0 (or NaN for an empty list)."""
    if not values:
        return math.nan
    trained = [v if not math.isnan(v) else math.inf for v in values[1:]]
    if not trained:
        return float(values[0])
    return float(statistics.median(trained[-tail_epochs(len(trained), share) :]))


def _tail_value(entry: dict[str, Any]) -> float:
    value = entry.get("tail_median_grad_norm")
    if entry.get("diverged_at") is not None or value is None or not math.isfinite(value):
        return math.inf
    return float(value)


def _final_value(entry: dict[str, Any]) -> float:
    value = entry.get("final_grad_norm")
    if entry.get("diverged_at") is not None or value is None or not math.isfinite(value):
        return math.inf
    return float(value)


def _ours_below(
    ours: dict[str, Any], others: Sequence[dict[str, Any]], value: Any
) -> tuple[bool | None, dict[str, Any] | None]:
    """Whether ours is strictly below every entry of ``others`` by ``value``, and the
    lowest of them (None, None without others)."""
    if not others:
        return None, None
    best = min(others, key=value)
    return value(ours) < value(best), best


def tail_verdicts(methods: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The claim-1 / claim-3 verdicts by the tail median, and where they differ from
    the same verdicts by the final value.

    Args:
        methods: Method entries of one row (``role``, ``label``, ``final_grad_norm``,
            ``tail_median_grad_norm``, ``diverged_at``, ``epochs_done``).

    Returns:
        ``tail_epochs`` (epochs the median takes, from ours' run), and for each of
        ``ours_lowest`` (below every other method), ``ours_below_best_scheduler``,
        ``ours_below_best_constant``: ``{"final": bool, "tail": bool, "best_final":
        label, "best_tail": label}``, or None when the row has no such comparison;
        ``disagree``: the names of the verdicts where final and tail differ. Empty
        (``{}``) without exactly one ours.
    """
    ours_list = [m for m in methods if m["role"] == "ours"]
    if len(ours_list) != 1:
        return {}
    ours = ours_list[0]
    others = [m for m in methods if m is not ours]
    out: dict[str, Any] = {"tail_epochs": tail_epochs(int(ours.get("epochs_done") or 1))}
    disagree = []
    for name, role in _COMPARED:
        group = [m for m in others if role is None or m["role"] == role]
        final, best_final = _ours_below(ours, group, _final_value)
        tail, best_tail = _ours_below(ours, group, _tail_value)
        if final is None or best_final is None or best_tail is None:
            out[name] = None
            continue
        out[name] = {
            "final": final,
            "tail": tail,
            "best_final": best_final["label"],
            "best_tail": best_tail["label"],
        }
        if final != tail:
            disagree.append(name)
    out["disagree"] = disagree
    return out


def tail_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Over a figure's rows (each a :func:`tail_verdicts` result): in how many rows ours
    is lowest by the tail median, and the rows (by index) where some verdict differs
    between the final value and the tail median."""
    judged = [r for r in rows if r.get("ours_lowest")]
    return {
        "rows_ours_lowest": sum(bool(r["ours_lowest"]["tail"]) for r in judged),
        "rows_compared": len(judged),
        "rows_disagree": [i for i, r in enumerate(rows) if r.get("disagree")],
    }
