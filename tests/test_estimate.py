"""Tests for the time estimate of a plan of figures and `exactlr run all --dry-run`."""

from __future__ import annotations

from pathlib import Path

import pytest

from exactlr.cli import main
from exactlr.paper.campaign import all_jobs
from exactlr.paper.estimate import (
    REFERENCE_COSTS,
    arch_cost,
    calibrate_speed,
    device_speed,
    estimate_jobs,
    khat_seconds,
    probe_reference_seconds,
    training_seconds,
)
from exactlr.paper.figures import figure_names
from exactlr.paper.planning import resolve_figure


def test_cost_model_is_its_formula() -> None:
    plan = next(p for p in resolve_figure("fig6", "paper") if p.method == "ours")
    lenet = REFERENCE_COSTS["lenet"]
    # 100 epochs of 5,500 training images, metrics over them and 1,000 test images, and
    # the metrics at w0.
    assert training_seconds(plan) == pytest.approx(
        (100 * (2 * 5500 + 1000 / 3) + 5500 + 1000 / 3) * lenet.grad_image_s
    )
    assert khat_seconds(plan) == pytest.approx(
        20 * lenet.hvps_per_sample * 5500 * lenet.hvp_image_s
    )
    cpu = next(p for p in resolve_figure("fig6", "cpu") if p.method == "ours")
    assert training_seconds(cpu) == pytest.approx(
        (30 * (2 * 2000 + 1000 / 3) + 2000 + 1000 / 3) * lenet.grad_image_s
    )


def test_fc_nets_are_priced_by_parameters() -> None:
    base = arch_cost("fc3x1000")
    assert base == REFERENCE_COSTS["fc3x1000"]
    big = arch_cost("fc5x3000")
    ratio = (784 * 3000 + 4 * 3000**2 + 3000 * 10) / (784 * 1000 + 2 * 1000**2 + 1000 * 10)
    assert big.grad_image_s == pytest.approx(base.grad_image_s * ratio)
    assert arch_cost("fc1x32").grad_image_s < base.grad_image_s
    with pytest.raises(ValueError, match="no reference cost for model 'resnet'"):
        arch_cost("resnet")


def test_shared_work_is_counted_once_and_speed_divides() -> None:
    est = estimate_jobs([("fig6", 0), ("fig12", 0), ("fig9", 0)], "paper")
    fig6, fig12, fig9 = est.figures
    assert (fig6.runs, fig6.khat) == (8, 1)
    assert fig12.khat == 0  # K_hat of fig6's setting serves every horizon
    assert fig9.runs == 7  # ours is fig6's run
    fast = estimate_jobs([("fig6", 0), ("fig12", 0), ("fig9", 0)], "paper", speed=4.0)
    assert fast.total_seconds == pytest.approx(est.total_seconds / 4)
    per_arch = estimate_jobs([("fig6", 0)], "paper", speed={"lenet": 2.0, "vgg9": 100.0})
    assert per_arch.total_seconds == pytest.approx(fig6.training_s / 2 + fig6.khat_s / 2)
    with pytest.raises(ValueError, match="must be positive"):
        estimate_jobs([("fig6", 0)], "paper", speed=0.0)


def test_device_speed_without_a_gpu_is_one_unless_given() -> None:
    assert device_speed("cpu", None) == (1.0, "the reference machine")
    assert device_speed("cuda", 30.0) == (30.0, "--speed")


def test_calibration_prices_the_probe_with_the_model() -> None:
    assert probe_reference_seconds("lenet") == pytest.approx(
        1024 * REFERENCE_COSTS["lenet"].grad_image_s
    )
    speed = calibrate_speed("cpu", ("lenet",))
    assert set(speed) == {"lenet"} and 0 < speed["lenet"] < float("inf")


def test_dry_run_all_lists_every_figure_and_runs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "paper"
    argv = ["run", "all", "--scale", "paper", "--device", "cuda", "--out", str(out)]
    assert main([*argv, "--dry-run", "--speed", "40"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["figure", "seed", "runs"]
    listed = [(line.split()[0], int(line.split()[1])) for line in lines[1:-1]]
    assert listed == all_jobs()
    assert {f for f, _ in listed} == set(figure_names(include_demo=False))
    total = sum(int(line.split()[2]) for line in lines[1:-1])
    assert lines[-1].startswith(f"total: {total} runs ({total} to do) at scale paper on cuda")
    assert "speed 40" in lines[-1]
    assert not out.exists()  # a dry run writes nothing


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--speed", "0"], "expected 'auto' or a positive number"),
        (["--seeds", "1,1"], "distinct integers"),
        (["--scale", "huge"], "valid scales"),
    ],
)
def test_run_all_bad_input_is_one_line(
    extra: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", "all", "--dry-run", "--out", str(tmp_path), *extra]
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own errors exit from the parser
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_vgg9_figures_fit_an_hour_at_cpu_scale() -> None:
    """The cpu scale's VGG-9 size is chosen so that, by the cost model, fig10 and fig11
    take under an hour each on the reference machine and fig5 about one."""
    fig10 = next(p for p in resolve_figure("fig10", "cpu") if p.method == "ours")
    assert (fig10.config.num_train, fig10.config.batch_size, fig10.num_samples) == (500, 125, 3)
    for name, hours in (("fig10", 1.0), ("fig11", 1.0), ("fig5", 1.25)):
        assert estimate_jobs([(name, 0)], "cpu").total_seconds < hours * 3600, name
