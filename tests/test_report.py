"""Tests for exactlr.paper.report: verdicts on hand-made result files with known numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from exactlr.paper.report import count_jerks, figure_report, format_markdown
from exactlr.paper.results import SCHEMA_VERSION, write_json_atomic
from exactlr.paper.schedules import MethodSpec
from exactlr.paper.training import METRIC_FIELDS, TrainConfig

OURS = MethodSpec("ours", "ours", 0.045)
OURS_X2 = MethodSpec("ours_x2", "ours", 0.09)
COSINE = MethodSpec("cosine", "scheduler", 0.01, "cosine")
STEP = MethodSpec("step", "scheduler", 0.01, "step")
LR01 = MethodSpec("const_1e-01", "constant", 0.1)
LR001 = MethodSpec("const_1e-03", "constant", 0.001)


def _role(m: MethodSpec) -> str:
    if m.kind == "ours":
        return "ours" if m.name == "ours" else "ours_variant"
    return m.kind


def write_run(
    out: Path,
    method: MethodSpec,
    grad_norm: list[float],
    *,
    row: str = "",
    diverged_at: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    test_acc: float = 0.9,
) -> dict:
    """Writes one result file by hand; returns its manifest entry."""
    n = len(grad_norm)
    cfg = TrainConfig(
        "mnist", "mini", "fc3x1000", method, epochs or n - 1, batch_size, seed=len(row)
    )
    metrics = {name: [0.0] * n for name in METRIC_FIELDS}
    metrics["epoch"] = list(range(n))
    metrics["grad_norm"] = grad_norm
    metrics["grad_norm_full"] = [g / 2 for g in grad_norm]
    metrics["train_loss"] = [1.0 / (e + 1) for e in range(n)]
    metrics["test_acc"] = [test_acc] * n
    record = {
        "schema_version": SCHEMA_VERSION,
        "name": cfg.run_name(),
        "config": cfg.to_dict(),
        "environment": {},
        "seed": cfg.seed,
        "diverged_at": diverged_at,
        "seconds": 1.0,
        "metrics": metrics,
        "extra": {"label": method.label},
    }
    rel = f"runs/{cfg.run_name()}.json"
    write_json_atomic(out / rel, record)
    return {
        "run_name": cfg.run_name(),
        "path": rel,
        "row": row,
        "series": None,
        "method": method.name,
        "role": _role(method),
        "lr_key": f"key{row}",
        "paper_ours_lr": 0.045,
    }


def write_manifest(out: Path, name: str, runs: list[dict], rows: list[str] | None = None) -> None:
    write_json_atomic(
        out / "figures" / f"{name}-cpu.json",
        {
            "figure": name,
            "title": "hand-made",
            "scale": "cpu",
            "scale_description": "test",
            "rows": rows or [""],
            "runs": runs,
        },
    )
    for row in rows or [""]:
        write_json_atomic(
            out / "lr" / f"key{row}.json",
            {"lr": 0.045, "k_hat": 12.0, "initial_loss": 2.3, "total_steps": 3, "key": row},
        )


def test_count_jerks() -> None:
    assert count_jerks([1.0, 2.0, 4.1, 4.0, 9.0]) == 2  # 4.1/2 > 2 and 9/4 > 2; 2/1 is not
    assert count_jerks([1.0, math.nan, 5.0]) == 0
    assert count_jerks([]) == 0


def test_ours_lowest(tmp_path: Path) -> None:
    runs = [
        write_run(tmp_path, OURS, [1.0, 0.5, 0.1, 0.01]),
        write_run(tmp_path, COSINE, [1.0, 0.6, 0.2, 0.04]),
        write_run(tmp_path, STEP, [1.0, 0.5, 0.3, 0.05]),
    ]
    write_manifest(tmp_path, "fig1", runs)
    rep = figure_report("fig1", out_dir=tmp_path, scale="cpu")
    v = rep["verdicts"]
    assert v["ours_lowest_final_grad_norm"] is True
    assert v["factor_to_best_scheduler"] == pytest.approx(4.0)
    assert v["best_scheduler"] == "Cosine"
    assert v["factor_to_best_constant"] is None and v["lr_0.1_jerks"] is None
    assert rep["ours_lr"] == 0.045 and rep["paper_ours_lr"] == 0.045 and rep["k_hat"] == 12.0
    ours = next(m for m in rep["methods"] if m["name"] == "ours")
    assert ours["final_grad_norm"] == 0.01 and ours["min_grad_norm"] == 0.01
    assert ours["final_grad_norm_full"] == 0.005 and ours["final_loss"] == 0.25
    assert ours["lr"] == 0.045 and ours["diverged_at"] is None
    text = format_markdown(rep)
    assert "Ours has the lowest final gradient norm: yes" in text
    assert "Cosine) ends 4x higher than ours" in text


def test_ours_not_lowest_and_jerks(tmp_path: Path) -> None:
    runs = [
        write_run(tmp_path, OURS, [1.0, 0.5, 0.2, 0.1]),
        write_run(tmp_path, OURS_X2, [1.0, 0.5, 0.2, 0.001]),  # variant: not a constant
        write_run(tmp_path, LR01, [1.0, 3.0, 0.5, 1.5]),  # jerks at epochs 1 and 3
        write_run(tmp_path, LR001, [1.0, 0.9, 0.5, 0.025]),
    ]
    write_manifest(tmp_path, "fig2", runs)
    rep = figure_report("fig2", out_dir=tmp_path, scale="cpu")
    v = rep["verdicts"]
    assert v["ours_lowest_final_grad_norm"] is False
    assert v["lowest_method"] == "Ours x 2 (0.09)"
    assert v["factor_to_best_constant"] == pytest.approx(0.25)  # LR 0.001, not ours x2
    assert v["best_constant"] == "LR 0.001"
    assert v["lr_0.1_jerks"] == 2 and v["ours_jerks"] == 0
    text = format_markdown(rep)
    assert "no — Ours x 2 (0.09) is 100x lower" in text
    assert "LR 0.001) ends 4x lower than ours (ours higher)" in text
    assert "LR 0.1 2, ours 0" in text


def test_diverged_runs_rank_last(tmp_path: Path) -> None:
    runs = [
        write_run(tmp_path, OURS, [1.0, 0.5, 0.2]),
        write_run(tmp_path, LR01, [1.0, 0.01, math.nan], diverged_at=2, epochs=5),
        write_run(tmp_path, COSINE, [1.0, 0.8, 0.4]),
    ]
    write_manifest(tmp_path, "fig1", runs)
    rep = figure_report("fig1", out_dir=tmp_path, scale="cpu")
    v = rep["verdicts"]
    assert v["ours_lowest_final_grad_norm"] is True
    assert v["factor_to_best_constant"] is None  # the only constant diverged
    assert v["diverged"] == ["LR 0.1"]
    lr01 = next(m for m in rep["methods"] if m["name"] == "const_1e-01")
    assert lr01["diverged_at"] == 2 and lr01["final_grad_norm"] is None
    assert lr01["min_grad_norm"] == 0.01 and lr01["epochs_done"] == 2
    json.dumps(rep, allow_nan=False)  # strict JSON
    assert "epoch 2" in format_markdown(rep)


def test_rows_are_blocks_and_summary(tmp_path: Path) -> None:
    runs = [
        write_run(tmp_path, OURS, [1.0, 0.1], row="T = 20"),
        write_run(tmp_path, COSINE, [1.0, 0.2], row="T = 20"),
        write_run(tmp_path, OURS, [1.0, 0.3, 0.3], row="T = 50"),
        write_run(tmp_path, COSINE, [1.0, 0.2, 0.15], row="T = 50"),
    ]
    write_manifest(tmp_path, "fig12", runs, rows=["T = 20", "T = 50"])
    rep = figure_report("fig12", out_dir=tmp_path, scale="cpu")
    assert [b["variation"] for b in rep["variations"]] == ["T = 20", "T = 50"]
    assert [b["verdicts"]["ours_lowest_final_grad_norm"] for b in rep["variations"]] == [
        True,
        False,
    ]
    assert rep["verdicts"]["ours_lowest_final_grad_norm"] is False
    assert rep["verdicts"]["rows_ours_lowest"] == 1
    assert rep["verdicts"]["factor_to_best_scheduler"] == pytest.approx(0.5)
    assert "1 of 2 rows" in format_markdown(rep)


def test_missing_runs_and_missing_figure(tmp_path: Path) -> None:
    runs = [write_run(tmp_path, OURS, [1.0, 0.5])]
    runs.append({**runs[0], "run_name": "gone", "path": "runs/gone.json", "method": "cosine"})
    write_manifest(tmp_path, "fig1", runs)
    rep = figure_report("fig1", out_dir=tmp_path, scale="cpu")
    assert rep["missing"] == ["gone"]
    assert rep["verdicts"]["ours_lowest_final_grad_norm"] is None
    with pytest.raises(FileNotFoundError, match="no runs of fig3"):
        figure_report("fig3", out_dir=tmp_path, scale="cpu")


def test_estimation_cost_counts_products_at_their_measured_cost() -> None:
    from exactlr.paper.report import _measured_gradients

    # 100 training gradient-equivalents took 50 s: K_hat's 10 s are 20 of them,
    # whatever the nominal count of its products (HVP_GRADIENTS per product).
    run = {"training_gradients": 100.0, "training_seconds": 50.0}
    assert _measured_gradients(run, {"seconds": 10.0, "gradients": 999.0}) == 20.0
    # Without a time, the nominal count stands.
    assert _measured_gradients(run, {"seconds": 0.0, "gradients": 7.0}) == 7.0


def test_the_summary_names_the_rows_where_final_and_tail_median_disagree() -> None:
    from exactlr.paper.markdown import _tail_lines

    t = {"rows_compared": 3, "rows_ours_lowest": 1, "rows_disagree": [0, 2]}
    (line,) = _tail_lines(t)
    assert "lowest in 1 of 3 rows" in line and line.endswith("disagree: row 1, row 3")
    (line,) = _tail_lines({**t, "rows_disagree": []})
    assert line.endswith("disagree: none")
