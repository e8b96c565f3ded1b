"""Reliability: checkpoints and mid-run resume, interruption (SIGKILL, SIGINT), CPU
determinism, divergence inside a grid, result-file permissions and validation."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import exactlr.paper.plotting
import exactlr.paper.runner
import exactlr.paper.training
from exactlr.cli import main
from exactlr.data import synthetic_classification
from exactlr.models import build_model
from exactlr.paper import experiments, planning
from exactlr.paper.experiments import checkpoint_path, run_figure
from exactlr.paper.plotting import plot_figure
from exactlr.paper.report import figure_report, format_markdown
from exactlr.paper.results import load_result, load_results, save_result
from exactlr.paper.schedules import MethodSpec
from exactlr.paper.training import EpochMetrics, TrainConfig, train_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data() -> Any:
    return synthetic_classification(num_train=200, num_test=50, seed=0)


def _model(init: str = "paper") -> torch.nn.Module:
    return build_model(
        "fc1x32", dataset="synthetic", init=init, generator=torch.Generator().manual_seed(0)
    )


def _without_seconds(metrics: list[EpochMetrics]) -> list[dict[str, Any]]:
    """Metrics as comparable dicts: seconds dropped, NaN (a metric not measured) as None."""
    rows = [dataclasses.asdict(dataclasses.replace(m, seconds=0.0)) for m in metrics]
    return [
        {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
        for row in rows
    ]


class _Stop(Exception):
    pass


def _stop_after(epoch: int) -> Any:
    def callback(m: EpochMetrics) -> None:
        if m.epoch == epoch:
            raise _Stop

    return callback


# ------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    ("batch_size", "method", "init"),
    [
        (None, MethodSpec("const", "constant", 0.01), "paper"),
        (64, MethodSpec("cosine", "scheduler", 0.01, scheduler="cosine"), "paper"),
        (64, MethodSpec("onecycle", "scheduler", 0.01, scheduler="onecycle"), "pytorch"),
        (None, MethodSpec("step", "scheduler", 0.01, scheduler="step"), "pytorch"),
    ],
)
def test_resume_mid_run_equals_uninterrupted(
    data: Any, tmp_path: Path, batch_size: int | None, method: MethodSpec, init: str
) -> None:
    train, test = data
    cfg = TrainConfig(
        "synthetic", "mini", "fc1x32", method, epochs=7, batch_size=batch_size, init=init
    )
    reference = train_run(cfg, _model(init), train, test)
    ckpt = tmp_path / "ckpt" / "run.pt"
    with pytest.raises(_Stop):  # "killed" after epoch 5: the last checkpoint is epoch 4
        train_run(
            cfg,
            _model(init),
            train,
            test,
            checkpoint_path=ckpt,
            checkpoint_every=2,
            on_epoch=_stop_after(5),
        )
    assert torch.load(ckpt, weights_only=True)["epoch"] == 4
    seen: list[int] = []
    resumed = train_run(
        cfg,
        _model(init),
        train,
        test,
        checkpoint_path=ckpt,
        checkpoint_every=2,
        on_epoch=lambda m: seen.append(m.epoch),
    )
    assert seen == [5, 6, 7]  # trained only after the checkpoint
    assert _without_seconds(resumed.metrics) == _without_seconds(reference.metrics)
    assert resumed.diverged_at is None
    assert resumed.metrics[-1].seconds >= resumed.metrics[4].seconds  # cumulative
    assert [p.name for p in ckpt.parent.iterdir()] == ["run.pt"]  # no temp files


def test_checkpoint_of_another_config_is_ignored(data: Any, tmp_path: Path) -> None:
    train, test = data
    ckpt = tmp_path / "run.pt"
    cfg = TrainConfig("synthetic", "mini", "fc1x32", MethodSpec("c", "constant", 0.01), 4, None)
    with pytest.raises(_Stop):
        train_run(
            cfg,
            _model(),
            train,
            test,
            checkpoint_path=ckpt,
            checkpoint_every=1,
            on_epoch=_stop_after(3),
        )
    other = dataclasses.replace(cfg, method=MethodSpec("c", "constant", 0.02))
    reference = train_run(other, _model(), train, test)
    seen: list[int] = []
    with pytest.warns(UserWarning, match="another config"):
        result = train_run(
            other,
            _model(),
            train,
            test,
            checkpoint_path=ckpt,
            on_epoch=lambda m: seen.append(m.epoch),
        )
    assert seen == [0, 1, 2, 3, 4]
    assert _without_seconds(result.metrics) == _without_seconds(reference.metrics)
    # A corrupt (e.g. hand-truncated) checkpoint: warned about, training starts over.
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="unreadable checkpoint"):
        again = train_run(other, _model(), train, test, checkpoint_path=ckpt)
    assert _without_seconds(again.metrics) == _without_seconds(reference.metrics)
    with pytest.raises(ValueError, match="checkpoint_every=-1"):
        train_run(other, _model(), train, test, checkpoint_path=ckpt, checkpoint_every=-1)


_KILL_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import torch
    torch.set_num_threads(1)
    from exactlr.data import synthetic_classification
    from exactlr.models import build_model
    from exactlr.paper.schedules import MethodSpec
    from exactlr.paper.training import TrainConfig, train_run

    out, ckpt = sys.argv[1], sys.argv[2]
    train, test = synthetic_classification(num_train=200, num_test=50, seed=0)
    model = build_model("fc1x32", dataset="synthetic", generator=torch.Generator().manual_seed(0))
    method = MethodSpec("cosine", "scheduler", 0.01, scheduler="cosine")
    cfg = TrainConfig("synthetic", "mini", "fc1x32", method, epochs=30, batch_size=64)
    epochs = []
    def slow(m):  # slow enough to be killed mid-run
        epochs.append(m.epoch)
        time.sleep(0.1)
    result = train_run(cfg, model, train, test, on_epoch=slow,
                       checkpoint_path=None if ckpt == "-" else ckpt, checkpoint_every=3)
    rows = [{k: v for k, v in vars(m).items() if k != "seconds"} for m in result.metrics]
    with open(out, "w") as f:
        json.dump({"metrics": rows, "trained": epochs}, f)
    """
)


def _python(script: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen([sys.executable, str(script), *args], env=env, stderr=subprocess.PIPE)


def test_sigkill_mid_run_then_resume_gives_the_same_metrics(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(_KILL_SCRIPT)
    ckpt = tmp_path / "ckpt.pt"
    killed = _python(script, str(tmp_path / "killed.json"), str(ckpt))
    deadline = time.monotonic() + 120
    while not ckpt.exists():
        assert killed.poll() is None, killed.stderr.read() if killed.stderr else ""
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed.json").exists()  # it really died mid-run
    saved_epoch = torch.load(ckpt, weights_only=True)["epoch"]
    assert 3 <= saved_epoch < 30
    resumed = _python(script, str(tmp_path / "resumed.json"), str(ckpt))
    reference = _python(script, str(tmp_path / "reference.json"), "-")
    for proc in (resumed, reference):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
    got = json.loads((tmp_path / "resumed.json").read_text())
    want = json.loads((tmp_path / "reference.json").read_text())
    assert got["trained"][0] > saved_epoch - 1 > 0  # resumed, not restarted
    assert len(got["metrics"]) == len(want["metrics"]) == 31
    assert got["metrics"] == want["metrics"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_execute_run_checkpoints_and_removes_them(tmp_path: Path, no_data: None) -> None:
    written: list[int] = []
    real = experiments.execute_run

    def spy(plan: Any, **kwargs: Any) -> Path:
        written.append(kwargs["checkpoint_every"])
        return real(plan, **kwargs)

    run_figure(
        "fig1",
        scale="smoke",
        out_dir=tmp_path,
        progress=False,
        checkpoint_every=1,
        runner=spy,
    )
    assert written == [1] * 8
    assert list((tmp_path / "checkpoints").glob("*")) == []  # deleted after each save
    assert experiments.default_checkpoint_every("cpu") == 5
    assert experiments.default_checkpoint_every("paper") == 5
    assert experiments.default_checkpoint_every("smoke") == 0


def test_run_figure_resumes_from_a_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_data: None
) -> None:
    kwargs: dict[str, Any] = dict(scale="smoke", out_dir=tmp_path / "a", progress=False, epochs=6)
    run_figure("fig1", **kwargs, checkpoint_every=0)
    plain = {r["name"]: r for r in load_results(tmp_path / "a")}
    # The second run is "killed" after epoch 5 (checkpoints at 2 and 4), then rerun.
    kwargs["out_dir"] = tmp_path / "b"
    real_train = exactlr.paper.training.train_run
    calls: list[str] = []

    def interrupted(cfg: TrainConfig, *args: Any, **kw: Any) -> Any:
        calls.append(cfg.run_name())
        if len(calls) == 2:
            kw["on_epoch"] = _stop_after(5)
        return real_train(cfg, *args, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(exactlr.paper.runner, "train_run", interrupted)
        with pytest.raises(_Stop):
            run_figure("fig1", **kwargs, checkpoint_every=2)
    ckpts = list((tmp_path / "b" / "checkpoints").glob("*.pt"))
    assert ckpts == [checkpoint_path(tmp_path / "b", calls[1])]
    assert torch.load(ckpts[0], weights_only=True)["epoch"] == 4
    run_figure("fig1", **kwargs, checkpoint_every=2)
    assert list((tmp_path / "b" / "checkpoints").glob("*")) == []
    resumed = {r["name"]: r for r in load_results(tmp_path / "b")}
    assert resumed.keys() == plain.keys()
    for name, run in plain.items():
        for field, values in run["metrics"].items():
            if field != "seconds":
                assert resumed[name]["metrics"][field] == values, (name, field)


# ------------------------------------------------------------------------- SIGINT


def test_sigint_keeps_finished_runs_and_rerun_resumes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONUNBUFFERED": "1"}
    argv = [
        sys.executable,
        "-m",
        "exactlr.cli",
        "run",
        "fig2",
        "--scale",
        "smoke",
        "--out",
        str(out),
        "--quiet",
        "--epochs",
        "150",
    ]
    env.pop("EXACTLR_DATA", None)  # no data folder: the synthetic set
    proc = subprocess.Popen(
        argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    runs = out / "runs"
    deadline = time.monotonic() + 180
    while not (runs.is_dir() and any(runs.glob("*.json"))):
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.monotonic() < deadline, "no result file after 180 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0] and "rerun" in lines[0]
    finished = sorted(runs.glob("*.json"))
    assert 1 <= len(finished) < 8
    for path in finished:
        load_result(path)  # complete, valid
    assert [p for p in out.rglob("*") if p.name.endswith(".tmp")] == []
    mtimes = {p.name: p.stat().st_mtime_ns for p in finished}
    rerun = subprocess.run(argv, env=env, capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()
    after = sorted(runs.glob("*.json"))
    assert len(after) == 8
    assert {p.name: p.stat().st_mtime_ns for p in after if p.name in mtimes} == mtimes
    assert [p for p in out.rglob("*") if p.name.endswith(".tmp")] == []


# ------------------------------------------------------------------------- determinism


def test_same_command_same_seed_identical_metrics(tmp_path: Path, no_data: None) -> None:
    for name in ("a", "b"):
        argv = [
            "run",
            "fig1",
            "--scale",
            "smoke",
            "--out",
            str(tmp_path / name),
            "--quiet",
            "--seed",
            "3",
        ]
        assert main(argv) == 0
    first = {r["name"]: r for r in load_results(tmp_path / "a")}
    second = {r["name"]: r for r in load_results(tmp_path / "b")}
    assert len(first) == 8 and first.keys() == second.keys()
    for name, run in first.items():
        other = second[name]
        for field, values in run["metrics"].items():
            if field != "seconds":
                assert other["metrics"][field] == values, (name, field)
        assert run["extra"]["w0_sha256"] == other["extra"]["w0_sha256"]
        assert run["extra"]["ours"]["lr"] == other["extra"]["ours"]["lr"]
        assert run["seed"] == run["config"]["seed"] == 3
        env = run["environment"]
        assert env["torch"] == torch.__version__ and env["exactlr"]
        assert {"python", "numpy", "device", "threads"} <= env.keys()


# ------------------------------------------------------------------------- divergence


def test_lr_too_large_for_float32_is_divergence_not_a_crash(data: Any) -> None:
    train, test = data
    # Adam's first step size lr / (1 - 0.9) = 1e39 does not fit in float32.
    cfg = TrainConfig("synthetic", "mini", "fc1x32", MethodSpec("c", "constant", 1e38), 5, 64)
    result = train_run(cfg, _model(), train, test)
    assert result.diverged_at == 1 and len(result.metrics) == 2
    assert result.metrics[0].is_finite() and not result.metrics[1].is_finite()


def test_diverging_method_in_a_grid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_data: None
) -> None:
    real = planning._method_by_name

    def huge(group: str, name: str, ours_lr: float, finder_lr: float | None = None) -> MethodSpec:
        method = real(group, name, ours_lr, finder_lr)
        if name == "const_1e-01":  # a huge constant LR overflows the weights
            return dataclasses.replace(method, lr=1e38)
        return method

    monkeypatch.setattr(planning, "_method_by_name", huge)
    paths = run_figure("fig2", scale="smoke", out_dir=tmp_path, progress=False, epochs=4)
    assert len(paths) == 8 and all(p.is_file() for p in paths)
    results = {r["extra"]["method"]: r for r in load_results(tmp_path)}
    bad = results["const_1e-01"]
    k = bad["diverged_at"]
    assert k is not None and 1 <= k <= 4
    assert len(bad["metrics"]["epoch"]) == k + 1  # stopped at epoch k
    assert all(r["diverged_at"] is None for m, r in results.items() if m != "const_1e-01")
    assert all(len(r["metrics"]["epoch"]) == 5 for m, r in results.items() if m != "const_1e-01")
    text = format_markdown(figure_report("fig2", out_dir=tmp_path, scale="smoke"))
    assert f"- Diverged: LR 1e+38 diverged at epoch {k}" in text
    assert f"| diverged at epoch {k} |" in text

    figures: list[Any] = []
    monkeypatch.setattr(exactlr.paper.plotting.plt, "close", figures.append)
    plot_figure("fig2", out_dir=tmp_path, scale="smoke", formats=("png",))
    (fig,) = figures
    grad_ax = fig.axes[0]
    markers = [line for line in grad_ax.get_lines() if line.get_marker() == "x"]
    assert len(markers) == 1
    labels = [line.get_label() for line in grad_ax.get_lines()]
    assert any(f"(diverged at epoch {k})" in label for label in labels)
    # The curve ends at the last finite epoch, where the marker sits.
    (curve,) = [ln for ln in grad_ax.get_lines() if "diverged" in str(ln.get_label())]
    assert list(markers[0].get_xdata()) == [list(curve.get_xdata())[-1]]
    assert max(curve.get_xdata()) <= k


# ------------------------------------------------------------------------- result files


def _tiny_result(data: Any) -> Any:
    train, test = data
    cfg = TrainConfig("synthetic", "mini", "fc1x32", MethodSpec("c", "constant", 0.01), 2, None)
    return train_run(cfg, _model(), train, test)


def test_result_file_mode_follows_umask(data: Any, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = tmp_path / "r.json"
        save_result(path, _tiny_result(data))
        assert path.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.update(schema_version=0), "schema_version=0"),
        (lambda d: d.pop("seed"), "missing field 'seed'"),
        (lambda d: d["metrics"]["grad_norm"].__setitem__(1, "big"), r"'grad_norm'\[1\]"),
        (lambda d: d.update(metrics={k: [] for k in d["metrics"]}), "no epochs"),
        (lambda d: d.update(diverged_at=7), "diverged_at"),
        (lambda d: d["config"].update(epochs=0), "epochs=0"),
        (lambda d: d["config"].pop("model"), "bad field 'config'"),
        (lambda d: d.update(environment="cpu"), "environment"),
    ],
)
def test_hand_edited_result_files_are_rejected(
    data: Any, tmp_path: Path, edit: Any, match: str
) -> None:
    path = tmp_path / "r.json"
    save_result(path, _tiny_result(data))
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=match):
        load_result(path)
