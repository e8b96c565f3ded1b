"""Figures like the paper's, drawn from result files only (matplotlib, Agg backend).

:func:`plot_figure` draws one row of three panels per row of the figure (per variation):
gradient norm (log y), training loss (log y) and test accuracy against the epoch, one
line per method with its legend label (e.g. "Ours (0.045)", the measured LR). A diverged
run is drawn up to its last finite epoch and ends in an "x"; its legend entry says
"(diverged at epoch k)". :func:`plot_smoothness` draws Algorithm 2's K_hat samples and
their running maximum (Theorem 4) from the LR cache.

Example:
    >>> paths = plot_figure("fig1", out_dir="results", scale="cpu")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from exactlr.paper.results import load_figure_runs, load_manifest
from exactlr.paper.store import atomic_target, lr_cache_path, plots_dir, read_json
from exactlr.sampleplot import draw_samples

__all__ = ["PANELS", "plot_figure", "plot_sharpness", "plot_smoothness"]

#: (metric field, y-axis label, log scale) of the three panels.
PANELS: tuple[tuple[str, str, bool], ...] = (
    ("grad_norm", "Gradient norm", True),
    ("train_loss", "Training loss", True),
    ("test_acc", "Test accuracy", False),
)

_OURS_STYLE = {"color": "black", "linewidth": 2.2, "zorder": 5}


def _series(values: list[float], epochs: list[int], log: bool) -> tuple[list[int], list[float]]:
    """The finite (and, on a log axis, positive) points."""
    xs, ys = [], []
    for x, y in zip(epochs, values, strict=True):
        if y is None or not math.isfinite(y) or (log and y <= 0):
            continue
        xs.append(x)
        ys.append(y)
    return xs, ys


def _style(run: dict[str, Any], index: int) -> dict[str, Any]:
    if run.get("role") == "ours" and not run.get("series"):
        return dict(_OURS_STYLE)
    # Ten colours; past ten runs the colours repeat with another line style, so that no
    # two lines look alike (tab20's even colours are tab10's, so it would not do).
    style: dict[str, Any] = {
        "color": plt.get_cmap("tab10")(index % 10),
        "linewidth": 1.3,
        "linestyle": ("-", "-.", ":")[(index // 10) % 3],
    }
    if run.get("role") == "ours_variant":
        style["linestyle"] = "--"
    return style


def _final_grad(run: dict[str, Any]) -> float:
    """Final gradient norm for ranking; a diverged or non-finite run ranks last."""
    values = run["result"]["metrics"]["grad_norm"]
    last = float(values[-1]) if values else math.inf
    if run["result"].get("diverged_at") is not None or not math.isfinite(last):
        return math.inf
    return last


def _plotted_runs(row_runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs drawn: every run but the tuning grid, of which only the best tuned
    scheduler (lowest final gradient norm over all schedulers and base LRs) is drawn."""
    shown = [r for r in row_runs if r.get("role") != "tuned"]
    grid = [r for r in row_runs if r.get("role") in ("tuned", "scheduler")]
    if any(r.get("role") == "tuned" for r in grid):
        best = min(grid, key=_final_grad)
        if best.get("role") == "tuned":
            shown.append({**best, "legend": f"Tuned: {best['legend']}"})
    return shown


def _best_scheduler(row_runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    runs = [r for r in row_runs if r.get("role") in ("scheduler", "tuned")]
    return min(runs, key=_final_grad) if runs else None


def plot_figure(
    name: str,
    *,
    out_dir: str | os.PathLike[str],
    scale: str,
    formats: tuple[str, ...] = ("png", "pdf"),
) -> list[Path]:
    """Draws a figure from its result files into ``out_dir/plots/<name>-<scale>.<fmt>``.

    Args:
        name: Figure name.
        out_dir: Results root given to ``run_figure``.
        scale: Scale name.
        formats: File formats to write.

    Returns:
        The written files.

    Raises:
        FileNotFoundError: The figure has not been run at this scale in ``out_dir``.
        ValueError: No run of the figure has a result yet.
    """
    root = Path(out_dir)
    manifest, runs, missing = load_figure_runs(name, out_dir=root, scale=scale)
    if not runs:
        raise ValueError(f"no finished runs of {name} at scale {scale} in {root} to plot")
    rows = manifest.get("rows") or [""]
    fig, axes = plt.subplots(len(rows), len(PANELS), figsize=(15, 3.9 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        row_runs = _plotted_runs([run for run in runs if run.get("row", "") == row])
        for c, (field, ylabel, log) in enumerate(PANELS):
            ax = axes[r][c]
            others = 0
            for run in row_runs:
                metrics = run["result"]["metrics"]
                xs, ys = _series(metrics[field], metrics["epoch"], log)
                if not xs:
                    continue
                is_ours = run.get("role") == "ours" and not run.get("series")
                style = _style(run, 0 if is_ours else others)
                others += 0 if is_ours else 1
                diverged_at = run["result"].get("diverged_at")
                label = run["legend"]
                if diverged_at is not None:
                    label += f" (diverged at epoch {diverged_at})"
                (line,) = ax.plot(xs, ys, label=label, **style)
                if diverged_at is not None:
                    ax.plot(xs[-1:], ys[-1:], marker="x", markersize=9, color=line.get_color())
            if log:
                ax.set_yscale("log")
            ax.set_xlabel("Epochs")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="major", alpha=0.3)
            if c == 0 and row:
                ax.set_title(row, loc="left", fontsize=10)
        handles, labels = axes[r][0].get_legend_handles_labels()
        if handles:
            axes[r][-1].legend(
                handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5)
            )
    title = f"{name} ({scale}): {manifest.get('title', '')}"
    if missing:
        title += f"  [{len(missing)} run(s) missing]"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save_figure(fig, plots_dir(root), f"{name}-{scale}", formats)


def plot_sharpness(
    name: str, *, out_dir: str | os.PathLike[str], scale: str, formats: tuple[str, ...] = ("png",)
) -> list[Path]:
    """Draws the Hessian spectral norm along the trajectory against 2 / lr.

    For ours and the best scheduler of each row (lowest final gradient norm), the
    measured ``sharpness`` (runs made with ``--curvature-every K``) and the classical
    stability threshold 2 / lr_t of gradient descent, one panel per row.

    The arguments are :func:`plot_figure`'s.

    Returns:
        The written files (``out_dir/plots/<name>-<scale>-sharpness.<fmt>``).

    Raises:
        FileNotFoundError: The figure has not been run, or no run measured sharpness.
    """
    root = Path(out_dir)
    manifest, runs, _ = load_figure_runs(name, out_dir=root, scale=scale)

    def measured(run: dict[str, Any]) -> bool:
        return any(math.isfinite(v) for v in run["result"]["metrics"].get("sharpness", []))

    runs = [r for r in runs if measured(r)]
    if not runs:
        raise FileNotFoundError(
            f"no run of {name} at scale {scale} in {root} measured the curvature; rerun "
            "with curvature_every > 0"
        )
    rows = [
        row for row in (manifest.get("rows") or [""]) if any(r.get("row", "") == row for r in runs)
    ]
    fig, axes = plt.subplots(1, len(rows), figsize=(6 * len(rows), 4), squeeze=False)
    for ax, row in zip(axes[0], rows, strict=True):
        row_runs = [r for r in runs if r.get("row", "") == row]
        chosen = [r for r in row_runs if r.get("role") == "ours" and not r.get("series")]
        best = _best_scheduler(row_runs)
        if best is not None:
            chosen.append(best)
        for index, run in enumerate(chosen):
            metrics = run["result"]["metrics"]
            color = "black" if run.get("role") == "ours" else plt.get_cmap("tab10")(index)
            xs, ys = _series(metrics["sharpness"], metrics["epoch"], True)
            ax.plot(xs, ys, "o-", color=color, label=f"{run['legend']}: ||H||_2")
            lrs = [2.0 / v if v and v > 0 else math.nan for v in metrics["lr"]]
            xs, ys = _series(lrs, metrics["epoch"], True)
            ax.plot(xs, ys, "--", color=color, label=f"{run['legend']}: 2 / lr")
        ax.set_yscale("log")
        ax.set_xlabel("Epochs")
        ax.set_ylabel("Hessian spectral norm")
        ax.set_title(row or f"{name} ({scale})", fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save_figure(fig, plots_dir(root), f"{name}-{scale}-sharpness", formats)


def plot_smoothness(
    name: str, *, out_dir: str | os.PathLike[str], scale: str, formats: tuple[str, ...] = ("png",)
) -> list[Path]:
    """Draws K_hat's samples and running maximum vs sample index, one panel per setting.

    Reads the LR cache entries (``out_dir/lr/<key>.json``) the figure's runs depend on.

    The arguments are :func:`plot_figure`'s.

    Returns:
        The written files (``out_dir/plots/<name>-<scale>-smoothness.<fmt>``).

    Raises:
        FileNotFoundError: The figure has not been run, or no LR cache entry exists.
    """
    root = Path(out_dir)
    manifest = load_manifest(root, name, scale)
    keys: list[str] = []
    for entry in manifest.get("runs", []):
        key = entry.get("lr_key") if isinstance(entry, dict) else None
        if isinstance(key, str) and key not in keys and lr_cache_path(root, key).is_file():
            keys.append(key)
    if not keys:
        raise FileNotFoundError(
            f"no K_hat estimates of {name} at scale {scale} in {lr_cache_path(root, '').parent}"
        )
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        data = read_json(lr_cache_path(root, key), what="LR cache entry")
        samples, running = data["samples"], data["running_max"]
        index = list(range(1, len(samples) + 1))
        draw_samples(ax, samples, [r.get("certified") for r in data.get("records", [])])
        ax.step(index, running, where="post", color="black", label="running max (K_hat)")
        ax.set_xlabel("Sample j")
        ax.set_ylabel("Hessian spectral norm")
        ax.set_title(f"{key}\nK_hat = {data['k_hat']:.4g}, lr = {data['lr']:.3g}", fontsize=7)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save_figure(fig, plots_dir(root), f"{name}-{scale}-smoothness", formats)


def _save_figure(fig: Any, folder: Path, stem: str, formats: tuple[str, ...]) -> list[Path]:
    """Save ``fig`` as ``folder/stem.<fmt>`` for each format (atomically), then close it."""
    paths = []
    try:
        for fmt in formats:
            path = folder / f"{stem}.{fmt}"
            with atomic_target(path) as tmp:
                fig.savefig(tmp, dpi=120, bbox_inches="tight", format=fmt)
            paths.append(path)
    finally:
        plt.close(fig)
    return paths
