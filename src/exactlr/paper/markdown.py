"""A figure's report as Markdown: one table per row, then the verdicts in words.

:func:`format_markdown` renders what :func:`exactlr.paper.report.figure_report` returns;
it reads nothing else.
"""

from __future__ import annotations

from typing import Any

__all__ = ["format_markdown"]


def _g(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}"


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _beyond_lines(b: dict[str, Any]) -> list[str]:
    """Plain words for :func:`beyond_verdicts`."""
    lines = [f"Beyond the paper ({b['compared']} methods, costs in gradient-equivalents):"]
    for key, what, fmt in (
        ("lowest_final_grad_norm", "Lowest final gradient norm", _g),
        ("lowest_final_loss", "Lowest final loss", _g),
        ("best_test_acc", "Best test accuracy", _acc),
    ):
        win = b.get(key)
        if win is None:
            lines.append(f"- {what}: none (every run diverged)")
            continue
        lines.append(
            f"- {what}: {win['label']} ({fmt(win['value'])}; cost {_g(win['cost_gradients'])} "
            f"gradients, {_g(win['cost_seconds'])} s)"
        )
    ranks = [b.get(f"ours_rank_{k}") for k in ("grad_norm", "loss", "test_acc")]
    if all(r is not None for r in ranks):
        lines.append(
            f"- Ours ranks {ranks[0]} (gradient norm), {ranks[1]} (loss) and {ranks[2]} "
            f"(test accuracy) of {b['compared']}"
        )
    return lines


def _yes_no(value: bool | None) -> str:
    return "n/a" if value is None else ("yes" if value else "no")


def _factor_line(kind: str, factor: float | None, best: str | None) -> str:
    if best is None:
        return f"- Best {kind}: none in this comparison"
    if factor is None:
        return f"- Best {kind} ({best}) vs ours: not comparable (a run diverged or is not finite)"
    if factor >= 1:
        return f"- Best {kind} ({best}) ends {factor:.3g}x higher than ours (ours lower)"
    return f"- Best {kind} ({best}) ends {1 / factor:.3g}x lower than ours (ours higher)"


_TAIL_WORDS = {
    "ours_lowest": "ours lowest of all",
    "ours_below_best_scheduler": "ours below the best scheduler",
    "ours_below_best_constant": "ours below the best constant LR",
}


def _tail_lines(t: dict[str, Any]) -> list[str]:
    """Plain words for :func:`exactlr.paper.robust.tail_verdicts` / ``tail_summary``."""
    if "rows_disagree" in t:
        if not t["rows_compared"]:
            return []
        rows = ", ".join(f"row {i + 1}" for i in t["rows_disagree"]) or "none"
        return [
            f"- By the median of the last 10% of epochs, ours is lowest in "
            f"{t['rows_ours_lowest']} of {t['rows_compared']} rows; rows where it and the "
            f"final value disagree: {rows}"
        ]
    if not t:
        return []
    judged = {name: t[name] for name in _TAIL_WORDS if t.get(name)}
    if not judged:
        return []
    k = t["tail_epochs"]
    if not t.get("disagree"):
        return [f"- By the median of the last {k} epoch(s): the same verdicts"]
    lines = []
    for name in t["disagree"]:
        v = judged[name]
        lines.append(
            f"- **Final value and median of the last {k} epoch(s) disagree** on "
            f"{_TAIL_WORDS[name]}: {_yes_no(v['final'])} by the final value, "
            f"{_yes_no(v['tail'])} by the median (lowest other: {v['best_tail']})"
        )
    return lines


def _verdict_lines(v: dict[str, Any]) -> list[str]:
    lines = []
    lowest = v.get("ours_lowest_final_grad_norm")
    if "rows_compared" in v:
        if v["rows_compared"]:
            lines.append(
                f"- Ours has the lowest final gradient norm in every row: {_yes_no(lowest)} "
                f"({v['rows_ours_lowest']} of {v['rows_compared']} rows)"
            )
        if v.get("factor_to_best_scheduler") is not None:
            lines.append(
                f"- Worst row, best scheduler / ours final gradient norm: "
                f"{v['factor_to_best_scheduler']:.3g} (>1: ours lower)"
            )
        if v.get("factor_to_best_constant") is not None:
            lines.append(
                f"- Worst row, best constant LR / ours final gradient norm: "
                f"{v['factor_to_best_constant']:.3g} (>1: ours lower)"
            )
    else:
        if lowest is not None:
            factor = v.get("factor_to_lowest_other")
            if lowest:
                extra = f" (next: {_g(factor)}x higher)" if factor is not None else ""
                lines.append(f"- Ours has the lowest final gradient norm: yes{extra}")
            else:
                how = f" is {_g(1 / factor)}x lower" if factor else " is lower"
                lines.append(
                    f"- Ours has the lowest final gradient norm: no — {v['lowest_method']}{how}"
                )
        if v.get("best_scheduler") is not None:
            lines.append(
                _factor_line("scheduler", v["factor_to_best_scheduler"], v["best_scheduler"])
            )
        if v.get("best_constant") is not None:
            lines.append(
                _factor_line("constant LR", v["factor_to_best_constant"], v["best_constant"])
            )
    if v.get("lr_0.1_jerks") is not None:
        lines.append(
            f"- Epochs where the gradient norm more than doubles: LR 0.1 {v['lr_0.1_jerks']}, "
            f"ours {v.get('ours_jerks')}"
        )
    if "larger_batch_lower_final_grad_norm" in v:
        lines.append(
            "- Larger batches end with lower gradient norms: "
            f"{_yes_no(v['larger_batch_lower_final_grad_norm'])}"
        )
    lines += _tail_lines(v.get("tail") or {})
    diverged = v.get("diverged") or []
    epochs = v.get("diverged_epochs") or []
    if len(epochs) == len(diverged):
        diverged = [
            f"{label} diverged at epoch {k}" for label, k in zip(diverged, epochs, strict=True)
        ]
    lines.append(f"- Diverged: {', '.join(diverged) if diverged else 'none'}")
    if v.get("beyond"):
        lines += ["", *_beyond_lines(v["beyond"])]
    return lines


def format_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: one table per row, then the verdicts in plain words."""
    out = [f"# {report['figure']} ({report['scale']}): {report['title']}", ""]
    if report.get("scale_description"):
        out += [f"Scale `{report['scale']}`: {report['scale_description']}.", ""]
    header = (
        "| Method | LR | final grad norm | last-10% median | min grad norm "
        "| final full grad norm "
        "| final loss | test acc | diverged | cost (grads) | cost (s) | Gamma<0 |"
    )
    rule = "|---|---|---|---|---|---|---|---|---|---|---|---|"
    for block in report["variations"]:
        if block["variation"]:
            out += [f"## {block['variation']}", ""]
        ours_lr, paper = block.get("ours_lr"), block.get("paper_ours_lr")
        if ours_lr is not None:
            out.append(
                f"Ours: lr = sqrt(2 L(w0) / (K_hat T)) = {_g(ours_lr)} "
                f"(paper's legend: {_g(paper, 2) if paper else 'none'}); "
                f"K_hat = {_g(block.get('k_hat'), 4)}, L(w0) = {_g(block.get('initial_loss'), 4)}"
                f", T = {block.get('total_steps')}"
            )
            out.append("")
        out += [header, rule]
        for m in block["methods"]:
            div = "-" if m["diverged_at"] is None else f"diverged at epoch {m['diverged_at']}"
            out.append(
                f"| {m['legend']} | {_g(m['lr'])} | {_g(m['final_grad_norm'])} "
                f"| {_g(m.get('tail_median_grad_norm'))} | {_g(m['min_grad_norm'])} "
                f"| {_g(m['final_grad_norm_full'])} "
                f"| {_g(m['final_loss'])} | {_acc(m['final_test_acc'])} | {div} "
                f"| {_g(m.get('cost_gradients'))} | {_g(m.get('cost_seconds'))} "
                f"| {_pct(m.get('gamma_neg_frac'))} |"
            )
        out.append("")
        if len(report["variations"]) > 1:
            out += _verdict_lines(block["verdicts"])
            out.append("")
    out += ["## Verdicts" if len(report["variations"]) == 1 else "## Summary", ""]
    out += _verdict_lines(report["verdicts"])
    if report.get("missing"):
        out += ["", f"Missing runs (not finished yet): {', '.join(report['missing'])}"]
    out.append("")
    hvp = report.get("hvp_gradients", 2.0)
    out.append(
        "Gradient norms are the paper's (sqrt of the mean squared mini-batch gradient norm "
        "over the epoch); 'last-10% median': their median over the last 10% of epochs; "
        "'full' is the exact full-data gradient norm at the epoch's end. "
        "Cost: gradient-equivalents (one = a gradient over the whole training set; an "
        "epoch costs one; K_hat counts at its measured seconds over the seconds of one "
        f"epoch of the same run, or {hvp:g} per Hessian-vector product where no time was "
        "recorded) spent on training, estimating K_hat (ours) and searching (LR finder, "
        "tuning), and the measured seconds of the same (they carry the machine's load "
        "when each ran). Gamma<0: mean fraction of coordinates where the "
        "paper's Gamma_t = sqrt(v_t)/alpha_t - sqrt(v_t-1)/alpha_t-1 is negative (Adam "
        "runs only)."
    )
    return "\n".join(out) + "\n"
