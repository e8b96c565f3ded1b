"""Tests for the `exactlr` command: run, report, plot, list, demo and its errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from exactlr.cli import main


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "fig1" in out and "fig16" in out and "init" in out and "paper:" in out


def _lr_json(capsys: pytest.CaptureFixture[str], *extra: str) -> dict:
    args = ["lr", "--model", "fc1x32", "--samples", "3", "--epochs", "5", "--json", *extra]
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


def test_lr_json_is_the_formula_of_its_own_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    out = _lr_json(capsys)
    assert out["k_hat"] == max(s["value"] for s in out["samples"])
    assert out["total_steps"] == out["epochs"] * out["batches_per_epoch"] == 5
    want = math.sqrt(2 * out["initial_loss"] / (out["k_hat"] * out["total_steps"]))
    assert out["lr"] == pytest.approx(want, rel=1e-12)


def test_lr_subsample_start_gives_the_same_lr_to_the_tolerance(
    capsys: pytest.CaptureFixture[str],
) -> None:
    plain = _lr_json(capsys, "--tol", "1e-4", "--subsample", "none")
    fast = _lr_json(capsys, "--tol", "1e-4", "--subsample", "0.2")
    # Each K_hat sample is certified to --tol 1e-4 of its norm either way; the lr moves
    # by half the relative change of K_hat.
    assert fast["k_hat"] == pytest.approx(plain["k_hat"], rel=2e-4)
    assert fast["lr"] == pytest.approx(plain["lr"], rel=1e-4)
    assert fast["initial_loss"] == plain["initial_loss"]
    # The subsample products are reported beside the full-data ones.
    assert all(r["subsample_hvps"] > 0 for r in fast["samples"])
    assert all(r["subsample_hvps"] == 0 for r in plain["samples"])
    assert sum(r["num_hvps"] for r in fast["samples"]) < sum(
        r["num_hvps"] for r in plain["samples"]
    )


def test_lr_screen_keeps_k_hat_and_marks_the_samples_it_skipped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ("--tol", "1e-4", "--subsample", "0.2", "--samples", "6")
    every = _lr_json(capsys, *args, "--screen", "none")
    screened = _lr_json(capsys, *args, "--screen", "1")
    assert screened["k_hat"] == pytest.approx(every["k_hat"], rel=2e-4)
    kinds = [r["certified"] for r in screened["samples"]]
    assert "screened" in kinds and "screened" not in [r["certified"] for r in every["samples"]]
    skipped = [r for r in screened["samples"] if r["certified"] == "screened"]
    assert all(r["num_hvps"] == 0 and r["value"] < screened["k_hat"] for r in skipped)


def test_run_report_plot_fig1_smoke(
    tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "res")
    args = ["--scale", "smoke", "--out", out]
    assert main(["run", "fig1", *args, "--data-dir", str(shared_data), "--quiet"]) == 0
    assert len(list((tmp_path / "res" / "runs").glob("*.json"))) == 8
    capsys.readouterr()
    assert main(["report", "fig1", *args, "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["figure"] == "fig1" and report["scale"] == "smoke"
    assert len(report["methods"]) == 8
    for key in ("name", "label", "lr", "final_grad_norm", "min_grad_norm", "final_loss"):
        assert key in report["methods"][0]
    for key in ("ours_lowest_final_grad_norm", "factor_to_best_scheduler", "lr_0.1_jerks"):
        assert key in report["verdicts"]
    assert report["paper_ours_lr"] == 0.045 and report["ours_lr"] > 0
    assert (tmp_path / "res" / "reports" / "fig1-smoke.md").is_file()
    assert main(["report", "fig1", *args]) == 0
    assert "| Ours (" in capsys.readouterr().out
    assert main(["plot", "fig1", *args]) == 0
    assert (tmp_path / "res" / "plots" / "fig1-smoke.png").is_file()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["run", "fig99", "--scale", "smoke"], "valid figures: fig1"),
        (["run", "fig1", "--scale", "huge"], "valid scales: smoke, cpu, paper"),
        (["report", "fig42"], "valid figures"),
        (["plot", "fig2", "--scale", "smoke", "--out", "{tmp}/none"], "exactlr run fig2"),
    ],
)
def test_errors_are_one_line(
    argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert main(["run", "fig1", "--scale", "smoke", "--out", str(target)]) == 2
    assert "is an existing file" in capsys.readouterr().err
    assert main(["demo", "--out", str(target)]) == 2


def test_demo_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet", "--epochs", "3"]) == 0
    text = capsys.readouterr().out
    assert "| Ours (" in text and "Cosine" in text and "LR 0.1" in text
    assert "Ours has the lowest final gradient norm" in text
    assert (out / "plots" / "demo-cpu.png").is_file()
    assert (out / "reports" / "demo-cpu.md").is_file()
    assert len(list((out / "runs").glob("*.json"))) == 15
