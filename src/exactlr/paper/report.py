"""Verdict tables for a figure, read from its result files only.

A figure's runs are listed in its manifest ``out_dir/figures/<name>-<scale>.json``
(written by :func:`exactlr.paper.experiments.run_figure`); each run is one result file
(:mod:`exactlr.paper.results`). :func:`figure_report` turns them into one table per row of the
figure (per variation) and plain verdicts on the paper's claims:

* ``ours_lowest_final_grad_norm``: ours ends with a strictly lower gradient norm (the
  paper's ``grad_norm``, last epoch) than every other method of the row. A diverged run
  counts as an infinite final gradient norm.
* ``factor_to_best_scheduler``: (lowest final gradient norm among the schedulers) /
  (ours' final gradient norm). Above 1: ours is lower by that factor; below 1: the best
  scheduler is lower by 1/factor. None without schedulers, or when it is not finite.
* ``factor_to_best_constant``: the same over the constant LRs 1e-1..1e-5 (ours x2 and
  ours /2 excluded).
* ``tail``: the claim-1 and claim-3 verdicts again by the median of the gradient norm
  over the last 10% of epochs (``tail_median_grad_norm`` of each method;
  :mod:`exactlr.paper.robust`), with ``disagree`` naming those where it and the final
  value differ.
* ``lr_0.1_jerks``: the number of epochs t >= 1 with ``gn[t] / gn[t-1] > 2`` for the
  constant LR 0.1 run (``gn`` = ``grad_norm``, epoch 0 = w0); ``ours_jerks`` is the same
  count for ours. None when the row has no LR 0.1 run.

These verdicts compare the paper's methods only (ours and its variants, the schedulers
at base LR 0.01, the constant LRs). Methods beyond the paper (``--methods``:
parameter-free optimizers, the LR finder, tuned schedulers) are listed beside them and
judged in ``verdicts["beyond"]`` (:func:`beyond_verdicts`): which method reaches the
lowest final gradient norm, the lowest final loss and the best test accuracy, and at
what cost. A tuned scheduler is the best of its base LRs (by final gradient norm); its
runs at the other LRs are its search cost and are listed under ``search_runs``.

Cost (every method entry): ``cost_gradients``, in gradient-equivalents (one = one
gradient of the training loss over the whole training set; a training epoch costs one),
split in ``cost_breakdown`` into training, estimation (ours: K_hat's measured seconds in
gradient-equivalents of the same run's training, so a Hessian-vector product counts at
its measured cost; ``HVP_GRADIENTS`` gradients per product where no time was recorded)
and search (the LR finder's steps, a
tuned scheduler's other runs); and ``cost_seconds``, measured wall time of the same
(training seconds include the per-epoch metrics, which every method pays alike).

Example:
    >>> rep = figure_report("fig1", out_dir="results", scale="cpu")  # doctest: +SKIP
    >>> print(format_markdown(rep))  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from exactlr.paper.markdown import format_markdown
from exactlr.paper.results import load_figure_runs
from exactlr.paper.robust import tail_median, tail_summary, tail_verdicts
from exactlr.paper.schedules import SCHEDULERS, MethodSpec
from exactlr.paper.store import lr_cache_path, read_json

__all__ = [
    "HVP_GRADIENTS",
    "JERK_FACTOR",
    "beyond_verdicts",
    "count_jerks",
    "figure_report",
    "format_markdown",
    "load_figure_runs",
    "row_verdicts",
]

#: A "jerk": the gradient norm grows by more than this factor from one epoch to the next.
JERK_FACTOR = 2.0
#: Nominal cost of one Hessian-vector product in gradients: Pearlmutter's count (one
#: extra forward-and-backward sweep), not a measurement. The measured cost depends on the
#: model and the product mode and is higher with BatchNorm's double backward
#: (``benchmarks/bench_curvature.py`` measures it), so ``cost_seconds`` is the column to
#: trust.
HVP_GRADIENTS = 2.0
#: Roles of the paper's own methods (the paper's verdicts are over these only).
PAPER_ROLES = ("ours", "ours_variant", "scheduler", "constant")


def count_jerks(values: Sequence[float], factor: float = JERK_FACTOR) -> int:
    """Number of t >= 1 with ``values[t] / values[t-1] > factor`` (finite, positive pairs).

    Example:
        >>> count_jerks([1.0, 3.0, 2.0, 5.0, 1.0])
        2
    """
    count = 0
    for prev, cur in itertools.pairwise(values):
        if math.isfinite(prev) and math.isfinite(cur) and prev > 0 and cur / prev > factor:
            count += 1
    return count


def _finite_or_none(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _method_entry(run: dict[str, Any]) -> dict[str, Any]:
    data = run["result"]
    metrics = data["metrics"]
    grad = [float(v) for v in metrics["grad_norm"]]
    finite = [v for v in grad if math.isfinite(v)]
    cfg = data["config"]
    gamma = [float(v) for v in metrics.get("gamma_neg_frac", [])[1:]]
    gamma = [v for v in gamma if math.isfinite(v)]
    sharp = [float(v) for v in metrics.get("sharpness", [])]
    sharp = [v for v in sharp if math.isfinite(v)]
    extra = data.get("extra") or {}
    return {
        "name": run["method"],
        "label": run["label"],
        "legend": run["legend"],
        "role": run["role"],
        "row": run.get("row", ""),
        "series": run.get("series"),
        "run_name": data["name"],
        "lr": float(cfg["method"]["lr"]),
        "epochs": int(cfg["epochs"]),
        "epochs_done": len(grad) - 1,
        "final_grad_norm": grad[-1] if grad else math.nan,
        "tail_median_grad_norm": tail_median(grad),
        "min_grad_norm": min(finite) if finite else math.nan,
        "final_grad_norm_full": float(metrics["grad_norm_full"][-1]) if grad else math.nan,
        "final_loss": float(metrics["train_loss"][-1]) if grad else math.nan,
        "final_test_acc": float(metrics["test_acc"][-1]) if grad else math.nan,
        "diverged_at": data.get("diverged_at"),
        "jerks": count_jerks(grad),
        "gamma_neg_frac": sum(gamma) / len(gamma) if gamma else None,
        "max_sharpness": max(sharp) if sharp else None,
        "scheduler": cfg["method"].get("scheduler"),
        "training_gradients": float(len(grad) - 1),
        "training_seconds": float(data.get("seconds", math.nan)),
        "finder": extra.get("finder"),
        "grad_norm": grad,
    }


def _add_costs(methods: list[dict[str, Any]], estimation: dict[str, float]) -> None:
    """Fills ``cost_breakdown``, ``cost_gradients`` and ``cost_seconds`` in place."""
    for m in methods:
        breakdown = {"training": m["training_gradients"], "estimation": 0.0, "search": 0.0}
        seconds = m["training_seconds"]
        if m["role"] in ("ours", "ours_variant"):
            breakdown["estimation"] = _measured_gradients(m, estimation)
            seconds += estimation.get("seconds", 0.0)
        elif m["role"] == "lr_finder" and m.get("finder"):
            breakdown["search"] = float(m["finder"].get("gradient_equivalents", 0.0))
            seconds += float(m["finder"].get("seconds", 0.0))
        m["cost_breakdown"] = breakdown
        m["cost_gradients"] = sum(breakdown.values())
        m["cost_seconds"] = seconds


def _measured_gradients(method: dict[str, Any], estimation: dict[str, float]) -> float:
    """K_hat's cost in gradient-equivalents at its measured cost: its seconds over the
    seconds of one gradient-equivalent of this run's training (a product costs what it
    cost, not ``HVP_GRADIENTS``); the nominal count where a time is missing."""
    seconds, train_s = estimation.get("seconds", 0.0), method.get("training_seconds", 0.0)
    if seconds > 0 and train_s > 0 and method["training_gradients"] > 0:
        return seconds * method["training_gradients"] / train_s
    return estimation.get("gradients", 0.0)


def _tuned_entries(methods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One "tuned" entry per scheduler run at several base LRs: its best run (by final
    gradient norm), costed with all of its runs."""
    tuned = []
    for name in SCHEDULERS:
        runs = [
            m for m in methods if m["scheduler"] == name and m["role"] in ("scheduler", "tuned")
        ]
        if not any(m["role"] == "tuned" for m in runs) or len(runs) < 2:
            continue
        best = _best(runs)
        assert best is not None
        entry = dict(best)
        label = MethodSpec(name, "scheduler", 0.01, name).label
        entry.update(
            name=f"tuned_{name}",
            role="tuned_best",
            label=f"Tuned {label} (base {best['lr']:g}, best of {len(runs)})",
            legend=f"Tuned {label} (base {best['lr']:g})",
            searched_lrs=sorted(m["lr"] for m in runs),
        )
        others = [m for m in runs if m is not best]
        entry["cost_breakdown"] = {
            "training": best["training_gradients"],
            "estimation": 0.0,
            "search": sum(m["training_gradients"] for m in others),
        }
        entry["cost_gradients"] = sum(entry["cost_breakdown"].values())
        entry["cost_seconds"] = sum(m["training_seconds"] for m in runs)
        tuned.append(entry)
    return tuned


def beyond_verdicts(methods: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Which method wins on each criterion, at what cost (all methods of a row).

    Args:
        methods: Method entries (``final_grad_norm``, ``final_loss``,
            ``final_test_acc``, ``diverged_at``, ``label``, ``role``, ``cost_gradients``,
            ``cost_seconds``).

    Returns:
        For each of ``lowest_final_grad_norm``, ``lowest_final_loss`` and
        ``best_test_acc``: ``{"label", "role", "value", "cost_gradients",
        "cost_seconds"}`` of the winner (a diverged run never wins), plus
        ``ours_rank_grad_norm`` / ``ours_rank_loss`` / ``ours_rank_test_acc`` (1 = best)
        and ``compared`` (the number of methods).
    """

    def value(m: dict[str, Any], key: str) -> float:
        v = m.get(key)
        if m["diverged_at"] is not None or v is None or not math.isfinite(v):
            return math.inf
        return -v if key == "final_test_acc" else v

    out: dict[str, Any] = {"compared": len(methods)}
    ours = next((m for m in methods if m["role"] == "ours"), None)
    for name, key in (
        ("lowest_final_grad_norm", "final_grad_norm"),
        ("lowest_final_loss", "final_loss"),
        ("best_test_acc", "final_test_acc"),
    ):
        ranked = sorted(methods, key=lambda m, key=key: value(m, key))
        top = ranked[0] if ranked and math.isfinite(value(ranked[0], key)) else None
        out[name] = (
            None
            if top is None
            else {
                "label": top["label"],
                "role": top["role"],
                "value": top[key],
                "cost_gradients": top.get("cost_gradients"),
                "cost_seconds": top.get("cost_seconds"),
            }
        )
        rank_key = {"final_grad_norm": "grad_norm", "final_loss": "loss"}.get(key, "test_acc")
        out[f"ours_rank_{rank_key}"] = (
            1 + sum(value(m, key) < value(ours, key) for m in methods if m is not ours)
            if ours is not None
            else None
        )
    return out


def _effective_final(entry: dict[str, Any]) -> float:
    """Final gradient norm for ranking: a diverged or non-finite run ranks last."""
    value = entry["final_grad_norm"]
    if entry["diverged_at"] is not None or not math.isfinite(value):
        return math.inf
    return value


def _best(entries: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    return min(entries, key=_effective_final) if entries else None


def _factor(best: dict[str, Any] | None, ours: dict[str, Any]) -> float | None:
    if best is None:
        return None
    top, bottom = _effective_final(best), _effective_final(ours)
    if not (math.isfinite(top) and math.isfinite(bottom)) or bottom <= 0:
        return None
    return top / bottom


def _is_lr(entry: dict[str, Any], lr: float) -> bool:
    return math.isclose(entry["lr"], lr, rel_tol=1e-9)


def row_verdicts(methods: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The verdicts of one row (see the module docstring for their definitions).

    Args:
        methods: Method entries of one row (``role``, ``final_grad_norm``,
            ``diverged_at``, ``lr``, ``grad_norm`` list, ``label``).

    Returns:
        ``ours_lowest_final_grad_norm`` (bool, or None without exactly one ours and one
        other method), ``lowest_method`` (label), ``factor_to_best_scheduler``,
        ``best_scheduler``, ``factor_to_best_constant``, ``best_constant``,
        ``lr_0.1_jerks``, ``ours_jerks``, ``ours_diverged_at``, ``diverged`` (labels),
        ``diverged_epochs`` (their divergence epochs).
    """
    ours_list = [m for m in methods if m["role"] == "ours"]
    verdicts: dict[str, Any] = {
        "ours_lowest_final_grad_norm": None,
        "lowest_method": None,
        "factor_to_lowest_other": None,
        "factor_to_best_scheduler": None,
        "best_scheduler": None,
        "factor_to_best_constant": None,
        "best_constant": None,
        "lr_0.1_jerks": None,
        "ours_jerks": None,
        "ours_diverged_at": None,
        "diverged": [m["label"] for m in methods if m["diverged_at"] is not None],
        "diverged_epochs": [m["diverged_at"] for m in methods if m["diverged_at"] is not None],
    }
    lowest = _best(methods)
    verdicts["lowest_method"] = lowest["label"] if lowest is not None else None
    if len(ours_list) != 1:
        return verdicts
    ours = ours_list[0]
    others = [m for m in methods if m is not ours]
    verdicts["ours_jerks"] = ours["jerks"]
    verdicts["ours_diverged_at"] = ours["diverged_at"]
    if others:
        best_other = _best(others)
        assert best_other is not None
        verdicts["ours_lowest_final_grad_norm"] = _effective_final(ours) < _effective_final(
            best_other
        )
        verdicts["factor_to_lowest_other"] = _factor(best_other, ours)
        if not verdicts["ours_lowest_final_grad_norm"]:
            verdicts["lowest_method"] = best_other["label"]
    schedulers = [m for m in others if m["role"] == "scheduler"]
    constants = [m for m in others if m["role"] == "constant"]
    best_s, best_c = _best(schedulers), _best(constants)
    verdicts["factor_to_best_scheduler"] = _factor(best_s, ours)
    verdicts["best_scheduler"] = best_s["label"] if best_s is not None else None
    verdicts["factor_to_best_constant"] = _factor(best_c, ours)
    verdicts["best_constant"] = best_c["label"] if best_c is not None else None
    lr01 = [m for m in constants if _is_lr(m, 0.1)]
    if lr01:
        verdicts["lr_0.1_jerks"] = lr01[0]["jerks"]
    return verdicts


def _batch_trend(methods: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]]) -> Any:
    """For rows of ours at several batch sizes: is the final grad norm lower for larger?"""
    sizes = []
    for m in methods:
        run = next(r for r in runs if r["result"]["name"] == m["run_name"])
        batch = run["result"]["config"].get("batch_size")
        sizes.append((batch if batch is not None else math.inf, _effective_final(m)))
    if len(sizes) < 2:
        return None
    sizes.sort()
    finals = [v for _, v in sizes]
    return all(b < a for a, b in itertools.pairwise(finals))


def _lr_cache(out_dir: Path, key: str | None) -> dict[str, Any]:
    if not key:
        return {}
    path = lr_cache_path(out_dir, key)
    if not path.is_file():
        return {}
    data = read_json(path, what="LR cache entry")
    entry = {k: data.get(k) for k in ("lr", "k_hat", "initial_loss", "total_steps", "key")}
    records = data.get("records") or []
    hvps = sum(int(r.get("num_hvps", 0)) for r in records)
    # K_hat's Hessian-vector products, plus one loss evaluation per sample and L(w0)
    # (forward passes, about a third of a gradient each).
    entry["estimation_gradients"] = HVP_GRADIENTS * hvps + (len(records) + 1) / 3
    entry["estimation_seconds"] = float(data.get("seconds") or 0.0)
    return entry


def _row_block(
    name: str, row: str, row_runs: list[dict[str, Any]], root: Path, manifest: dict[str, Any]
) -> dict[str, Any]:
    """The report of one row: its methods, verdicts and ours' LR setting."""
    all_methods = [_method_entry(r) for r in row_runs]
    keys = [r.get("lr_key") for r in row_runs if r.get("role") == "ours"]
    cache = _lr_cache(root, keys[0] if keys else None)
    _add_costs(
        all_methods,
        {
            "gradients": cache.get("estimation_gradients", 0.0),
            "seconds": cache.get("estimation_seconds", 0.0),
        },
    )
    paper_methods = [m for m in all_methods if m["role"] in PAPER_ROLES]
    extras = [m for m in all_methods if m["role"] in ("paramfree", "lr_finder")]
    tuned = _tuned_entries(all_methods)
    search_runs = [m for m in all_methods if m["role"] == "tuned"]
    methods = paper_methods + extras + tuned
    verdicts = row_verdicts(paper_methods)
    verdicts["tail"] = tail_verdicts(paper_methods)
    if extras or tuned:
        verdicts["beyond"] = beyond_verdicts(methods)
    series_all_ours = bool(methods) and all(m["role"] == "ours" for m in methods)
    if series_all_ours and len(methods) > 1 and name == "fig5":
        verdicts["larger_batch_lower_final_grad_norm"] = _batch_trend(methods, row_runs)
    paper_lrs = [r.get("paper_ours_lr") for r in row_runs if r.get("paper_ours_lr")]
    for m in all_methods + tuned:
        m.pop("grad_norm", None)  # used by the verdicts; the plots read the files
        m.pop("finder", None)
    return {
        "variation": row,
        "methods": methods,
        "search_runs": search_runs,
        "verdicts": verdicts,
        "ours_lr": cache.get("lr"),
        "paper_ours_lr": paper_lrs[0] if paper_lrs else manifest.get("paper_ours_lr"),
        "k_hat": cache.get("k_hat"),
        "initial_loss": cache.get("initial_loss"),
        "total_steps": cache.get("total_steps"),
    }


def figure_report(
    name: str, *, out_dir: str | os.PathLike[str], scale: str, seed: int = 0
) -> dict[str, Any]:
    """Per-method numbers and verdicts of a figure, from its result files.

    Args:
        name: Figure name.
        out_dir: Results root given to ``run_figure``.
        scale: Scale name.
        seed: Base seed of the runs (0: the figure as first run).

    Returns:
        A JSON-ready dict: ``figure``, ``title``, ``scale``, ``scale_description``,
        ``methods`` (every method of every row; fields ``name``, ``label``, ``lr``,
        ``final_grad_norm``, ``min_grad_norm``, ``final_grad_norm_full``, ``final_loss``,
        ``final_test_acc``, ``diverged_at``, ``jerks``, ``row``), ``verdicts``,
        ``ours_lr``, ``paper_ours_lr``, ``k_hat`` (of the first row; every row's own are
        in ``variations``), ``variations`` (one block per row: ``variation``,
        ``methods``, ``verdicts``, ``ours_lr``, ``paper_ours_lr``, ``k_hat``,
        ``initial_loss``, ``total_steps``), ``missing`` (runs without results).
        For figures with several rows the top-level ``verdicts`` summarise the rows:
        ours lowest in every row, and the smallest factors over the rows.

    Raises:
        FileNotFoundError: The figure has not been run at this scale in ``out_dir``.
        ValueError: No run of the figure has a result file, or a file is corrupt, does not
            match its manifest entry, or a manifest path leaves ``out_dir``.
    """
    root = Path(out_dir)
    manifest, runs, missing = load_figure_runs(name, out_dir=root, scale=scale, seed=seed)
    if not runs:
        raise ValueError(
            f"no finished runs of {name} at scale {scale} in {root} ({len(missing)} planned, "
            "none with a result file); run the figure first"
        )
    rows = manifest.get("rows") or [""]
    blocks = [
        _row_block(name, row, [r for r in runs if r.get("row", "") == row], root, manifest)
        for row in rows
    ]
    first = blocks[0]
    report: dict[str, Any] = {
        "figure": name,
        "title": manifest.get("title", name),
        "scale": scale,
        "scale_description": manifest.get("scale_description", ""),
        "seed": manifest.get("seed"),
        "methods": [m for b in blocks for m in b["methods"]],
        "verdicts": first["verdicts"] if len(blocks) == 1 else _summarise(blocks),
        "ours_lr": first["ours_lr"],
        "paper_ours_lr": first["paper_ours_lr"],
        "k_hat": first["k_hat"],
        "initial_loss": first["initial_loss"],
        "total_steps": first["total_steps"],
        "variations": blocks,
        "missing": missing,
        "hvp_gradients": HVP_GRADIENTS,
    }
    return _json_ready(report)


def _summarise(blocks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    def values(key: str) -> list[Any]:
        return [b["verdicts"].get(key) for b in blocks if b["verdicts"].get(key) is not None]

    lowest = values("ours_lowest_final_grad_norm")
    sched, const = values("factor_to_best_scheduler"), values("factor_to_best_constant")
    jerks, ours_jerks = values("lr_0.1_jerks"), values("ours_jerks")
    summary: dict[str, Any] = {
        "ours_lowest_final_grad_norm": all(lowest) if lowest else None,
        "rows_ours_lowest": sum(bool(v) for v in lowest),
        "rows_compared": len(lowest),
        "factor_to_best_scheduler": min(sched) if sched else None,
        "factor_to_best_constant": min(const) if const else None,
        "lr_0.1_jerks": sum(jerks) if jerks else None,
        "ours_jerks": sum(ours_jerks) if ours_jerks else None,
        "diverged": [d for b in blocks for d in b["verdicts"].get("diverged", [])],
        "diverged_epochs": [d for b in blocks for d in b["verdicts"].get("diverged_epochs", [])],
    }
    summary["tail"] = tail_summary([b["verdicts"].get("tail") or {} for b in blocks])
    trend = values("larger_batch_lower_final_grad_norm")
    if trend:
        summary["larger_batch_lower_final_grad_norm"] = all(trend)
    return summary


def _json_ready(obj: Any) -> Any:
    """Non-finite floats -> None, so ``json.dumps`` writes strict JSON."""
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ---------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------
