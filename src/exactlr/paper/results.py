"""Result files: one JSON file per run, written atomically, so sweeps can resume.

Layout: `<out_dir>/runs/<run_name>.json`, with

```
{"schema_version": 1, "name": ..., "config": {...TrainConfig.to_dict()},
 "environment": {...}, "seed": ..., "diverged_at": int | null, "seconds": ...,
 "metrics": {"epoch": [...], "grad_norm": [...], ...one list per EpochMetrics field},
 "extra": {...}}
```

Non-finite floats (a diverged run's NaN / inf) are written as the strings "NaN",
"Infinity" and "-Infinity", so every file is strict JSON (readable by jq, JavaScript,
...); `load_result` turns them back into floats in `metrics`, `seconds` and `extra`.
Files are written atomically (`exactlr.paper.store`), so a run killed mid-write leaves
only a hidden `.*.tmp` file that `load_results` ignores.

A figure's manifest lists its runs; `load_figure_runs` reads it with the result files
it names (paths confined to the results folder).

Example:
    >>> path = result_path("out", cfg)  # doctest: +SKIP
    >>> if not is_finished(path):  # doctest: +SKIP
    ...     save_result(path, train_run(cfg, model, train, test))
"""

from __future__ import annotations

import math
import os
import platform
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exactlr._version import __version__
from exactlr.paper.provenance import provenance_mismatch
from exactlr.paper.runconfig import (
    METRIC_FIELDS,
    OPTIONAL_METRIC_FIELDS,
    REQUIRED_METRIC_FIELDS,
    RunResult,
    TrainConfig,
    validate_config,
)
from exactlr.paper.schedules import MethodSpec
from exactlr.paper.store import (
    confined_path,
    decode_nonfinite,
    encode_nonfinite,
    file_mode,
    manifest_path,
    read_json,
    run_path,
    write_bytes_atomic,
    write_json_atomic,
)

__all__ = [
    "SCHEMA_VERSION",
    "decode_nonfinite",
    "encode_nonfinite",
    "environment_info",
    "file_mode",
    "is_finished",
    "load_figure_runs",
    "load_manifest",
    "load_result",
    "load_results",
    "manifest_path",
    "plan_mismatch",
    "result_path",
    "save_result",
    "write_bytes_atomic",
    "write_json_atomic",
]

SCHEMA_VERSION = 1
REQUIRED_FIELDS: tuple[str, ...] = (
    "schema_version",
    "name",
    "config",
    "environment",
    "seed",
    "diverged_at",
    "seconds",
    "metrics",
)


def result_path(out_dir: Path | str, cfg: TrainConfig) -> Path:
    """`out_dir / "runs" / f"{cfg.run_name()}.json"` (:func:`exactlr.paper.store.run_path`)."""
    return run_path(out_dir, cfg.run_name())


def environment_info(device: torch.device | str | None = "cpu") -> dict[str, Any]:
    """Versions and hardware a result was produced with.

    Returns:
        python, torch, numpy, exactlr versions, platform, device and its name, CPU
        threads, CUDA version (None on CPU-only builds).
    """
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine() or device.type
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "exactlr": __version__,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": device_name,
        "threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
    }


def save_result(
    path: Path | str,
    result: RunResult,
    *,
    extra: dict | None = None,
    provenance: dict[str, Any] | None = None,
) -> None:
    """Saves a run's result (schema in the module docstring) atomically.

    Args:
        path: Target file, usually `result_path(out_dir, result.config)`.
        result: The run.
        extra: Anything else to keep beside it (e.g. how ours_lr was obtained).
        provenance: What produced it (:func:`exactlr.paper.provenance.provenance`).
    """
    record = {
        "schema_version": SCHEMA_VERSION,
        "name": result.config.run_name(),
        "config": result.config.to_dict(),
        "environment": environment_info(result.device),
        "seed": result.config.seed,
        "diverged_at": result.diverged_at,
        "seconds": result.seconds,
        "metrics": result.metrics_dict(),
        "extra": extra or {},
    }
    if result.total_steps is not None:
        record["total_steps"] = result.total_steps
    if provenance is not None:
        record["provenance"] = provenance
    write_json_atomic(path, record)


def load_result(path: Path | str) -> dict[str, Any]:
    """Loads and validates a result file.

    Returns:
        The file's dict with non-finite markers decoded to floats, plus `"path"` (str).

    Raises:
        ValueError: Naming the file and the problem: not JSON (e.g. truncated), written
            by another version (`schema_version`), a missing field, a config that does
            not parse, missing metrics or metric lists of unequal length.
        FileNotFoundError: The file does not exist.
    """
    path = Path(path)
    try:
        data = read_json(path, what="result file")
    except ValueError as err:
        raise ValueError(f"{err}; delete it to rerun the run") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"{path}: written by another version (schema_version={version!r}, "
            f"expected {SCHEMA_VERSION})"
        )
    for name in REQUIRED_FIELDS:
        if name not in data:
            raise ValueError(f"{path}: missing field {name!r}")
    try:
        cfg = TrainConfig.from_dict(data["config"])
        validate_config(cfg)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{path}: bad field 'config' ({err!r})") from err
    if data["name"] != cfg.run_name():
        raise ValueError(
            f"{path}: field 'name' = {data['name']!r} is not its config's run name "
            f"{cfg.run_name()!r} (edited?); delete it to rerun the run"
        )
    for name, kind in (("extra", dict), ("provenance", dict), ("environment", dict)):
        if name in data and not isinstance(data[name], kind):
            raise ValueError(f"{path}: field {name!r} must be an object")
    total_steps = data.get("total_steps")
    if total_steps is not None and (
        isinstance(total_steps, bool) or not isinstance(total_steps, int)
    ):
        raise ValueError(f"{path}: field 'total_steps' = {total_steps!r} must be an integer")
    _check_metrics(path, data)
    diverged_at = data["diverged_at"]
    epochs = data["metrics"]["epoch"]
    if diverged_at is not None and (
        isinstance(diverged_at, bool)
        or not isinstance(diverged_at, int)
        or diverged_at != epochs[-1]
    ):
        raise ValueError(
            f"{path}: field 'diverged_at' = {diverged_at!r} must be null or the last epoch "
            f"({epochs[-1]})"
        )
    _check_epochs(path, epochs, diverged_at, cfg.epochs)
    data["path"] = str(path)
    return data


def _check_metrics(path: Path, data: dict[str, Any]) -> None:
    """Metrics: an object of equally long lists of numbers (non-finite markers decoded in
    place), at least one epoch; optional metrics missing in older files become NaN."""
    metrics = data["metrics"]
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: field 'metrics' must be an object of lists")
    for name in REQUIRED_METRIC_FIELDS:
        if name not in metrics:
            raise ValueError(f"{path}: missing metric {name!r} in field 'metrics'")
    for name in METRIC_FIELDS:
        if name in metrics and not isinstance(metrics[name], list):
            raise ValueError(f"{path}: metric {name!r} must be a list")
    lengths = {name: len(values) for name, values in metrics.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{path}: metric lists have unequal lengths {lengths}")
    for name in ("metrics", "seconds", "extra"):
        if name in data:
            data[name] = decode_nonfinite(data[name])
    for name in METRIC_FIELDS:
        for index, value in enumerate(data["metrics"].get(name, [])):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{path}: metric {name!r}[{index}] = {value!r} is not a number")
    if not lengths or not next(iter(lengths.values())):
        raise ValueError(f"{path}: field 'metrics' holds no epochs")
    # Files written before a metric existed: that metric was not measured (NaN).
    for name in OPTIONAL_METRIC_FIELDS:
        if name not in data["metrics"]:
            data["metrics"][name] = [math.nan] * len(data["metrics"]["epoch"])


def _check_epochs(path: Path, epochs: list[Any], diverged_at: int | None, planned: int) -> None:
    """The metrics cover epochs 0..E (or 0..diverged_at), one row each, in order."""
    last = planned if diverged_at is None else diverged_at
    if epochs != list(range(last + 1)):
        raise ValueError(
            f"{path}: metrics hold epochs {epochs[0]}..{epochs[-1]} ({len(epochs)} rows) but "
            f"the run ends at epoch {last} (config epochs={planned}); delete it to rerun"
        )


def plan_mismatch(
    data: dict[str, Any], cfg: TrainConfig, provenance: dict[str, Any], total_steps: int
) -> str | None:
    """Why a loaded result does not belong to a planned run (None if it does).

    The result must have the planned config (method and LR included), the planned T,
    and the planned provenance (the same data and w0, see
    :func:`exactlr.paper.provenance.provenance_mismatch`).
    """
    if data["config"] != cfg.to_dict():
        return "has another config (method, LR, data or schedule) than this plan"
    if data.get("total_steps") != total_steps:
        return f"was trained for T={data.get('total_steps')} steps, the plan has T={total_steps}"
    return provenance_mismatch(data.get("provenance"), provenance)


def is_finished(path: Path | str) -> bool:
    """True when `path` exists and is a valid result file (so the run can be skipped)."""
    try:
        load_result(path)
    except (OSError, ValueError):
        return False
    return True


def load_results(out_dir: Path | str, *, strict: bool = True) -> list[dict[str, Any]]:
    """Loads every result file under `out_dir / "runs"`, sorted by file name.

    Args:
        out_dir: The output folder given to the runs.
        strict: Raise on an invalid file; if False, warn and skip it.

    Raises:
        ValueError: An invalid file (when `strict`).
    """
    folder = Path(out_dir) / "runs"
    results = []
    for path in sorted(folder.glob("*.json")):
        try:
            results.append(load_result(path))
        except ValueError as err:
            if strict:
                raise
            warnings.warn(f"skipping invalid result file: {err}", stacklevel=2)
    return results


def load_manifest(out_dir: Path | str, name: str, scale: str, seed: int = 0) -> dict[str, Any]:
    """A figure's manifest (``out_dir/figures/<name>-<scale>[-seed<k>].json``).

    Raises:
        FileNotFoundError: The figure has not been run at this scale in ``out_dir``.
        ValueError: The manifest is not valid JSON or not an object with a list of runs.
    """
    path = manifest_path(out_dir, name, scale, seed)
    if not path.is_file():
        seeded = f" with seed {seed}" if seed else ""
        raise FileNotFoundError(
            f"no runs of {name} at scale {scale}{seeded} in {out_dir} ({path} is missing)"
        )
    manifest = read_json(path, what="manifest")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("runs", []), list):
        raise ValueError(f"{path}: not a manifest (an object with a list 'runs'); rerun the figure")
    return manifest


def _label(data: dict[str, Any]) -> str:
    extra = data.get("extra") or {}
    if extra.get("label"):
        return str(extra["label"])
    return MethodSpec.from_dict(data["config"]["method"]).label


def load_figure_runs(
    name: str, *, out_dir: str | os.PathLike[str], scale: str, seed: int = 0
) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    """The manifest of a figure, its loaded runs and the runs still missing.

    Args:
        name: Figure name.
        out_dir: Results root given to ``run_figure``.
        scale: Scale name.
        seed: Base seed of the runs (0: the figure as first run).

    Returns:
        ``(manifest, runs, missing)``: each run is the manifest entry merged with
        ``"result"`` (the :func:`load_result` dict), ``"label"`` and ``"legend"``;
        ``missing`` lists the run names without a finished result file.

    Raises:
        FileNotFoundError: The figure has not been run at this scale in ``out_dir``.
        ValueError: A manifest or result file is corrupt.
    """
    root = Path(out_dir)
    manifest = load_manifest(root, name, scale, seed)
    where = str(manifest_path(root, name, scale, seed))
    runs: list[dict[str, Any]] = []
    missing: list[str] = []
    for entry in manifest.get("runs", []):
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: a run entry is not an object; rerun the figure")
        path = confined_path(root, entry.get("path"), what=where)
        if not path.is_file():
            missing.append(str(entry.get("run_name", path.stem)))
            continue
        data = load_result(path)
        if data["name"] != entry.get("run_name") or path.stem != data["name"]:
            raise ValueError(
                f"{path}: holds run {data['name']!r} but the manifest {where} lists "
                f"{entry.get('run_name')!r} there; delete the file and rerun the figure"
            )
        extra_lr = data.get("extra", {}).get("lr")
        if extra_lr is not None and extra_lr != data["config"]["method"]["lr"]:
            raise ValueError(
                f"{path}: its LR {data['config']['method']['lr']!r} is not the LR it "
                f"records it was run with ({extra_lr!r}; edited?); delete it and rerun"
            )
        label = _label(data)
        series = entry.get("series")
        runs.append(
            {
                **entry,
                "result": data,
                "label": label,
                "legend": f"{series}: {label}" if series else label,
            }
        )
    return manifest, runs, missing
