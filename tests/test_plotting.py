"""Tests for exactlr.paper.plotting: figures drawn from hand-made result files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from exactlr.paper.plotting import plot_figure, plot_smoothness
from exactlr.paper.results import write_json_atomic
from test_report import COSINE, LR01, OURS, write_manifest, write_run


def test_plot_figure_png_and_pdf(tmp_path: Path) -> None:
    runs = [
        write_run(tmp_path, OURS, [1.0, 0.5, 0.1]),
        write_run(tmp_path, COSINE, [1.0, 0.6, 0.2]),
        write_run(tmp_path, LR01, [1.0, 4.0, math.nan], diverged_at=2, epochs=5),
    ]
    write_manifest(tmp_path, "fig1", runs)
    paths = plot_figure("fig1", out_dir=tmp_path, scale="cpu")
    assert [p.name for p in paths] == ["fig1-cpu.png", "fig1-cpu.pdf"]
    assert all(p.stat().st_size > 5000 for p in paths)


def test_plot_rows_make_a_taller_figure(tmp_path: Path) -> None:
    import matplotlib.image

    one = tmp_path / "one"
    write_manifest(one, "fig1", [write_run(one, OURS, [1.0, 0.5])])
    rows = tmp_path / "rows"
    runs = [write_run(rows, OURS, [1.0, 0.5], row=r) for r in ("T = 20", "T = 50", "T = 150")]
    write_manifest(rows, "fig12", runs, rows=["T = 20", "T = 50", "T = 150"])
    h1 = matplotlib.image.imread(plot_figure("fig1", out_dir=one, scale="cpu")[0]).shape[0]
    h3 = matplotlib.image.imread(plot_figure("fig12", out_dir=rows, scale="cpu")[0]).shape[0]
    assert h3 > 2.5 * h1


def test_plot_smoothness(tmp_path: Path) -> None:
    write_manifest(tmp_path, "fig1", [write_run(tmp_path, OURS, [1.0, 0.5])])
    write_json_atomic(
        tmp_path / "lr" / "key.json",
        {"samples": [3.0, 5.0, 4.0], "running_max": [3.0, 5.0, 5.0], "k_hat": 5.0, "lr": 0.1},
    )
    (path,) = plot_smoothness("fig1", out_dir=tmp_path, scale="cpu")
    assert path.name == "fig1-cpu-smoothness.png" and path.stat().st_size > 5000


def test_plot_without_runs_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no runs of fig4"):
        plot_figure("fig4", out_dir=tmp_path, scale="smoke")
