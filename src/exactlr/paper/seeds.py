"""A figure run with several base seeds, aggregated: do its verdicts survive a reseed?

``exactlr run FIG --seeds 0,1,2`` runs the figure once per base seed; each seed draws its
own data subset and its own w0 (and K_hat samples and batch order; see
:func:`exactlr.paper.planning.resolve_figure`), and has its own manifest
(``figures/<fig>-<scale>-seed<k>.json``; none for seed 0). :func:`seeds_report` reads
the per-seed reports (:func:`exactlr.paper.report.figure_report`) and, row by row, gives
for each method the median and range over the seeds of its final gradient norm and of
its last-10% median (:mod:`exactlr.paper.robust`), on how many seeds it ends lowest
of the row, its rank on each seed, and which verdicts hold on every seed.
:func:`format_seeds_markdown` renders it. Methods beyond the paper (``--methods``) are
left out: the seeds check the paper's own verdicts.

Example:
    >>> parse_seeds("0,1,2")
    (0, 1, 2)
    >>> spread([0.3, 0.1, None])["median"]
    0.3
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from typing import Any

from exactlr.paper.report import PAPER_ROLES, figure_report
from exactlr.paper.store import report_path, write_json_atomic, write_text_atomic

__all__ = [
    "format_seeds_markdown",
    "parse_seeds",
    "seeds_report",
    "spread",
    "write_seeds_report",
]


def parse_seeds(text: str | Sequence[int]) -> tuple[int, ...]:
    """Base seeds from ``"0,1,2"`` (comma-separated integers >= 0, no repeats).

    Raises:
        ValueError: An empty list, a name that is not an integer >= 0, or a repeat.
    """
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    seeds = []
    for part in parts:
        try:
            seed = int(part)
        except (TypeError, ValueError):
            seed = -1
        if seed < 0 or isinstance(part, bool):
            raise ValueError(f"seeds {text!r}: {part!r} is not an integer >= 0; e.g. 0,1,2")
        seeds.append(seed)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {text!r}: give distinct integers >= 0, e.g. 0,1,2")
    return tuple(seeds)


def _rank_value(value: float | None) -> float:
    """A value for ranking: missing or non-finite (a diverged run) ranks last."""
    return math.inf if value is None or not math.isfinite(value) else float(value)


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Median, minimum and maximum of per-seed values; a missing or non-finite value
    (a diverged run) counts as infinite and an infinite statistic is None."""
    ranked = [_rank_value(v) for v in values]

    def finite(x: float) -> float | None:
        return x if math.isfinite(x) else None

    if not ranked:
        return {"values": [], "median": None, "min": None, "max": None}
    return {
        "values": list(values),
        "median": finite(float(statistics.median(ranked))),
        "min": finite(min(ranked)),
        "max": finite(max(ranked)),
    }


def _method_label(entries: Sequence[dict[str, Any] | None]) -> str:
    present = [e for e in entries if e is not None]
    if present and present[0]["role"] == "ours":
        return "Ours (" + "/".join(f"{e['lr']:.3g}" for e in present) + ")"
    return present[0]["label"] if present else "?"


def _ranks(blocks: Sequence[dict[str, Any]], name: str, key: str) -> list[int | None]:
    """Rank (1 = lowest ``key``) of method ``name`` among its row, seed by seed."""
    ranks: list[int | None] = []
    for block in blocks:
        values = {m["name"]: _rank_value(m.get(key)) for m in block["methods"]}
        if name not in values:
            ranks.append(None)
            continue
        ranks.append(1 + sum(v < values[name] for n, v in values.items() if n != name))
    return ranks


def _every(values: Sequence[Any]) -> bool | None:
    known = [v for v in values if v is not None]
    return all(known) if known and len(known) == len(values) else None


def _row(blocks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The aggregate of one row over the seeds (one block per seed), over the paper's
    own methods (those the verdicts compare)."""
    blocks = [
        {**b, "methods": [m for m in b["methods"] if m["role"] in PAPER_ROLES]} for b in blocks
    ]
    names: list[str] = []
    for block in blocks:
        names += [m["name"] for m in block["methods"] if m["name"] not in names]
    methods = []
    for name in names:
        entries = [next((m for m in b["methods"] if m["name"] == name), None) for b in blocks]
        ranks = _ranks(blocks, name, "final_grad_norm")
        present = next(e for e in entries if e is not None)
        methods.append(
            {
                "name": name,
                "role": present["role"],
                "label": _method_label(entries),
                "final_grad_norm": spread([e and e["final_grad_norm"] for e in entries]),
                "tail_median_grad_norm": spread(
                    [e and e.get("tail_median_grad_norm") for e in entries]
                ),
                "ranks": ranks,
                "ranks_tail": _ranks(blocks, name, "tail_median_grad_norm"),
                "first_on": sum(r == 1 for r in ranks),
            }
        )
    verdicts = [b["verdicts"] for b in blocks]
    tails = [v.get("tail") or {} for v in verdicts]

    def tail_flag(t: dict[str, Any], name: str) -> bool | None:
        return t[name]["tail"] if t.get(name) else None

    def below(factor: float | None) -> bool | None:
        return None if factor is None else factor > 1

    sched = [v.get("factor_to_best_scheduler") for v in verdicts]
    const = [v.get("factor_to_best_constant") for v in verdicts]
    lowest = [v.get("ours_lowest_final_grad_norm") for v in verdicts]
    lowest_tail = [tail_flag(t, "ours_lowest") for t in tails]
    return {
        "variation": blocks[0]["variation"],
        "ours_lr": [b.get("ours_lr") for b in blocks],
        "k_hat": [b.get("k_hat") for b in blocks],
        "initial_loss": [b.get("initial_loss") for b in blocks],
        "methods": methods,
        "verdicts": {
            "seeds_compared": sum(v is not None for v in lowest),
            "ours_first": sum(bool(v) for v in lowest),
            "ours_first_tail": sum(bool(v) for v in lowest_tail),
            "factor_to_best_scheduler": sched,
            "factor_to_best_constant": const,
            "best_scheduler": [v.get("best_scheduler") for v in verdicts],
            "best_constant": [v.get("best_constant") for v in verdicts],
            "disagree": [t.get("disagree", []) for t in tails],
            "every_seed": {
                "ours_lowest": _every(lowest),
                "ours_lowest_tail": _every(lowest_tail),
                "ours_below_best_scheduler": _every([below(f) for f in sched]),
                "ours_below_best_constant": _every([below(f) for f in const]),
            },
        },
    }


def seeds_report(
    name: str, *, out_dir: str | os.PathLike[str], scale: str, seeds: Sequence[int]
) -> dict[str, Any]:
    """The verdicts of figure ``name`` over several base seeds.

    Args:
        name: Figure name.
        out_dir: Results root holding the runs of every seed.
        scale: Scale name.
        seeds: Base seeds (each run with ``exactlr run FIG --seeds ...``).

    Returns:
        A JSON-ready dict: ``figure``, ``title``, ``scale``, ``seeds``, ``missing``
        (per seed, runs without results) and ``rows``: per row ``variation``, per-seed
        ``ours_lr`` / ``k_hat`` / ``initial_loss``, ``methods`` (each: ``name``,
        ``role``, ``label``, ``final_grad_norm`` and ``tail_median_grad_norm`` as
        :func:`spread`, ``ranks`` and ``ranks_tail`` per seed, ``first_on`` = seeds on
        which it ends lowest of the row) and ``verdicts`` (``ours_first`` /
        ``ours_first_tail`` of ``seeds_compared``, per-seed factors to the best
        scheduler / constant, ``disagree`` per seed, and ``every_seed``: whether ours is
        lowest, below the best scheduler, below the best constant on every seed; None
        where a seed lacks that comparison).

    Raises:
        FileNotFoundError: A seed has not been run at this scale in ``out_dir``.
        ValueError: Bad seeds, or the seeds' reports have different rows.
    """
    seeds = parse_seeds(seeds)
    reports = [figure_report(name, out_dir=out_dir, scale=scale, seed=s) for s in seeds]
    rows = [r["variations"] for r in reports]
    labels = [[b["variation"] for b in blocks] for blocks in rows]
    if any(lab != labels[0] for lab in labels):
        raise ValueError(f"{name} ({scale}): the seeds {seeds} have different rows {labels}")
    return {
        "figure": name,
        "title": reports[0]["title"],
        "scale": scale,
        "scale_description": reports[0].get("scale_description", ""),
        "seeds": list(seeds),
        "missing": {
            str(s): r["missing"] for s, r in zip(seeds, reports, strict=True) if r["missing"]
        },
        "rows": [_row([blocks[i] for blocks in rows]) for i in range(len(labels[0]))],
    }


# ---------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _range(s: dict[str, Any]) -> str:
    return f"{_g(s['median'])} [{_g(s['min'])}, {_g(s['max'])}]"


def _yes_no(value: bool | None) -> str:
    return "n/a" if value is None else ("yes" if value else "no")


def _factors(factors: Sequence[float | None]) -> str:
    return ", ".join(_g(f) for f in factors)


def _row_lines(row: dict[str, Any], seeds: Sequence[int]) -> list[str]:
    v = row["verdicts"]
    out = [
        "Ours' LR per seed: "
        + ", ".join(_g(x) for x in row["ours_lr"])
        + " (K_hat "
        + ", ".join(_g(x) for x in row["k_hat"])
        + ")",
        "",
        "| Method | final grad norm: median [min, max] | last-10% median: median [min, max] "
        "| lowest on | rank per seed |",
        "|---|---|---|---|---|",
    ]
    n = len(seeds)
    for m in row["methods"]:
        ranks = ", ".join("-" if r is None else str(r) for r in m["ranks"])
        out.append(
            f"| {m['label']} | {_range(m['final_grad_norm'])} "
            f"| {_range(m['tail_median_grad_norm'])} | {m['first_on']} of {n} | {ranks} |"
        )
    every = v["every_seed"]
    out += [
        "",
        f"- Ours ends lowest on {v['ours_first']} of {v['seeds_compared']} seeds "
        f"(by the last-10% median: {v['ours_first_tail']})",
    ]
    if any(f is not None for f in v["factor_to_best_scheduler"]):
        out.append(
            "- Best scheduler / ours final gradient norm per seed (>1: ours lower): "
            f"{_factors(v['factor_to_best_scheduler'])}"
        )
    if any(f is not None for f in v["factor_to_best_constant"]):
        out.append(
            "- Best constant LR / ours final gradient norm per seed (>1: ours lower): "
            f"{_factors(v['factor_to_best_constant'])}"
        )
    out.append(
        f"- Holds on every seed: ours lowest {_yes_no(every['ours_lowest'])} (by the "
        f"last-10% median {_yes_no(every['ours_lowest_tail'])}), ours below the best "
        f"scheduler {_yes_no(every['ours_below_best_scheduler'])}, ours below the best "
        f"constant LR {_yes_no(every['ours_below_best_constant'])}"
    )
    flips = [f"seed {s}: {', '.join(d)}" for s, d in zip(seeds, v["disagree"], strict=True) if d]
    out.append(
        "- Final value and last-10% median disagree: " + ("; ".join(flips) if flips else "never")
    )
    return out


def format_seeds_markdown(report: dict[str, Any]) -> str:
    """:func:`seeds_report` as Markdown: a table per row, then its verdicts in words."""
    seeds = report["seeds"]
    out = [
        f"# {report['figure']} ({report['scale']}), seeds {', '.join(map(str, seeds))}: "
        f"{report['title']}",
        "",
        "Each base seed draws its own training subset and its own w0 (and K_hat samples "
        "and batch order). 'lowest on': seeds on which the method ends with the lowest "
        "final gradient norm of its row; rank 1 = lowest.",
        "",
    ]
    for row in report["rows"]:
        if row["variation"]:
            out += [f"## {row['variation']}", ""]
        out += [*_row_lines(row, seeds), ""]
    for seed, missing in report.get("missing", {}).items():
        out.append(f"Missing runs of seed {seed} (not finished yet): {', '.join(missing)}")
    return "\n".join(out).rstrip("\n") + "\n"


def write_seeds_report(
    name: str, *, out_dir: str | os.PathLike[str], scale: str, seeds: Sequence[int]
) -> tuple[dict[str, Any], str]:
    """:func:`seeds_report` written to ``out_dir/reports/<name>-<scale>-seeds.md`` (and
    ``.json``); returns the report and its Markdown."""
    report = seeds_report(name, out_dir=out_dir, scale=scale, seeds=seeds)
    text = format_seeds_markdown(report)
    path = report_path(out_dir, name, f"{scale}-seeds")
    write_text_atomic(path, text)
    write_json_atomic(path.with_suffix(".json"), report)
    return report, text
