"""The Ray executor writes the same result files as the local one (local Ray, 2 CPUs)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from exactlr.paper.experiments import run_figure
from exactlr.paper.results import is_finished, load_result

ray = pytest.importorskip("ray")

from exactlr.paper.ray_executor import ray_runner  # noqa: E402


def _strip_times(obj: Any) -> Any:
    """Drops wall-clock fields and the load-time ``path``, at any depth."""
    if isinstance(obj, dict):
        return {
            k: _strip_times(v)
            for k, v in obj.items()
            if k not in {"seconds", "time", "environment", "path"} and not k.endswith("seconds")
        }
    if isinstance(obj, list):
        return [_strip_times(v) for v in obj]
    return obj


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6), where
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def local_ray():  # type: ignore[no-untyped-def]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_ray_executor_writes_the_local_result_files(
    tmp_path: Path, local_ray: None, no_data: None
) -> None:
    # No data folder: the smoke scale runs on the synthetic set.
    kwargs: dict[str, Any] = dict(scale="smoke", progress=False)
    local_paths = run_figure("fig1", out_dir=tmp_path / "local", **kwargs)
    runner = ray_runner(None)
    assert not runner.owns_ray  # joined the fixture's Ray, leaves it running
    try:
        ray_paths = run_figure("fig1", out_dir=tmp_path / "ray", runner=runner, **kwargs)
        # run_figure collects the submitted runs before it writes the manifest.
        assert runner.num_pending == 0 and len(ray_paths) == len(local_paths) == 8
    finally:
        runner.close()
    rel = [p.relative_to(tmp_path / "local") for p in local_paths]
    assert [p.relative_to(tmp_path / "ray") for p in ray_paths] == rel
    for local, remote in zip(local_paths, ray_paths, strict=True):
        assert is_finished(remote)
        _assert_same(
            _strip_times(load_result(local)), _strip_times(load_result(remote)), local.name
        )
    # Same set of files (result files, lr cache, manifest), nothing left half-written.
    files = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*"))
    assert sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("*")) == files
    # Resuming with Ray submits nothing.
    runner = ray_runner(None)
    try:
        run_figure("fig1", out_dir=tmp_path / "ray", runner=runner, **kwargs)
        assert runner.num_pending == 0
    finally:
        runner.close()


def test_cli_ray_executor_matches_local(
    tmp_path: Path, local_ray: None, no_data: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from exactlr.cli import main

    common = ["--scale", "smoke", "--quiet"]
    assert main(["run", "fig2", *common, "--out", str(tmp_path / "a")]) == 0
    assert main(["run", "fig2", *common, "--out", str(tmp_path / "b"), "--executor", "ray"]) == 0
    assert "8 runs" in capsys.readouterr().out
    for local in sorted((tmp_path / "a" / "runs").glob("*.json")):
        remote = tmp_path / "b" / "runs" / local.name
        _assert_same(_strip_times(load_result(local)), _strip_times(load_result(remote)))


def test_cli_ray_missing_is_one_line_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import exactlr.paper.ray_executor
    from exactlr.cli import main

    monkeypatch.setattr(exactlr.paper.ray_executor, "ray_available", lambda: False)
    code = main(["run", "fig1", "--scale", "smoke", "--out", str(tmp_path), "--executor", "ray"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "needs Ray" in err
    assert main(["run", "fig1", "--out", str(tmp_path), "--address", "h:6379"]) == 2
    assert "--executor ray" in capsys.readouterr().err
