"""Result files: round trip, atomic writes, validation, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from exactlr.paper.results import (
    SCHEMA_VERSION,
    environment_info,
    is_finished,
    load_result,
    load_results,
    result_path,
    save_result,
    write_json_atomic,
)
from exactlr.paper.schedules import MethodSpec
from exactlr.paper.training import METRIC_FIELDS, EpochMetrics, RunResult, TrainConfig


def _result(name: str = "ours", diverged: bool = False, seed: int = 0) -> RunResult:
    cfg = TrainConfig(
        "synthetic",
        "mini",
        "fc1x32",
        MethodSpec(name, "ours", 0.045),
        epochs=2,
        batch_size=None,
        seed=seed,
    )
    metrics = [
        EpochMetrics(
            e, 1.0 / (e + 1), 0.5 / (e + 1), 2.3 - e, 0.1 * e, 2.4 - e, 0.1 * e, 0.045, 0.1 * e
        )
        for e in range(3)
    ]
    if diverged:
        metrics[2].train_loss = math.nan
        metrics[2].grad_norm_full = math.inf
        metrics[2].test_loss = -math.inf
    return RunResult(cfg, metrics, 2 if diverged else None, 0.3)


@pytest.mark.parametrize("diverged", [False, True])
def test_round_trip(tmp_path: Path, diverged: bool) -> None:
    result = _result(diverged=diverged)
    path = result_path(tmp_path, result.config)
    assert path == tmp_path / "runs" / "synthetic-mini__fc1x32__ours__seed0__e2.json"
    save_result(path, result, extra={"k_hat": 12.5, "samples": (1.0, float("nan"))})
    # Strict JSON: loads without NaN/Infinity tokens.
    raw = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict {c}"))
    assert raw["schema_version"] == SCHEMA_VERSION
    data = load_result(path)
    assert data["name"] == result.config.run_name()
    assert TrainConfig.from_dict(data["config"]) == result.config
    assert data["seed"] == 0 and data["seconds"] == 0.3
    assert data["diverged_at"] == (2 if diverged else None)
    assert data["extra"]["k_hat"] == 12.5 and math.isnan(data["extra"]["samples"][1])
    columns = result.metrics_dict()
    assert set(data["metrics"]) == set(METRIC_FIELDS)
    for field in METRIC_FIELDS:
        for got, want in zip(data["metrics"][field], columns[field], strict=True):
            assert got == want or (math.isnan(got) and math.isnan(want))
    if diverged:
        assert data["metrics"]["grad_norm_full"][2] == math.inf
        assert data["metrics"]["test_loss"][2] == -math.inf
    for key in (
        "python",
        "torch",
        "numpy",
        "exactlr",
        "platform",
        "device_name",
        "threads",
        "cuda",
    ):
        assert key in data["environment"]


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b.json"
    write_json_atomic(path, {"x": 1})
    write_json_atomic(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["b.json"]


def test_failed_write_keeps_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    write_json_atomic(path, {"x": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"x": object()})  # not serialisable
    assert json.loads(path.read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["b.json"]


def _edit(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_wrong_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    save_result(path, _result())
    _edit(path, schema_version=SCHEMA_VERSION + 1)
    with pytest.raises(ValueError, match=r"r\.json: written by another version"):
        load_result(path)
    assert not is_finished(path)


def test_missing_field(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    save_result(path, _result())
    _edit(path, metrics=None)
    with pytest.raises(ValueError, match=r"r\.json: missing field 'metrics'"):
        load_result(path)


def test_unequal_metrics_and_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    save_result(path, _result())
    data = json.loads(path.read_text())
    data["metrics"]["train_loss"].pop()
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"r\.json: metric lists have unequal lengths"):
        load_result(path)
    save_result(path, _result())
    path.write_text(path.read_text()[:50])
    with pytest.raises(ValueError, match=r"r\.json: not valid JSON"):
        load_result(path)
    assert not is_finished(path)


def test_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    save_result(path, _result())
    _edit(path, config={"dataset": "mnist"})
    with pytest.raises(ValueError, match=r"r\.json: bad field 'config'"):
        load_result(path)


def test_resume_with_is_finished(tmp_path: Path) -> None:
    results = [_result("ours"), _result("ours", seed=1)]
    paths = [result_path(tmp_path, r.config) for r in results]
    assert not any(is_finished(p) for p in paths)
    ran = []
    for sweep in range(2):  # the second sweep finds everything done
        for result, path in zip(results, paths, strict=True):
            if not is_finished(path):
                ran.append((sweep, path.name))
                save_result(path, result)
    assert [s for s, _ in ran] == [0, 0]
    # A stray temp file from a killed writer is neither a result nor an error.
    (paths[0].parent / f".{paths[0].name}.abc.tmp").write_text("{partial")
    loaded = load_results(tmp_path)
    assert [d["seed"] for d in loaded] == [0, 1]
    assert loaded[0]["path"] == str(paths[0])


def test_load_results_strict_and_lenient(tmp_path: Path) -> None:
    save_result(result_path(tmp_path, _result().config), _result())
    bad = tmp_path / "runs" / "zz.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match=r"zz\.json"):
        load_results(tmp_path)
    with pytest.warns(UserWarning, match=r"zz\.json"):
        assert len(load_results(tmp_path, strict=False)) == 1
    assert load_results(tmp_path / "nothing") == []


def test_environment_info_cpu() -> None:
    info = environment_info("cpu")
    assert info["device"] == "cpu" and info["threads"] >= 1
