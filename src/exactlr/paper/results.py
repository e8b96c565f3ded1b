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

A file is written to a temporary file in the same folder, flushed, fsync'ed and renamed
over the target (`os.replace`), so a reader never sees a partial file and a run killed
mid-write leaves only a hidden `.*.tmp` file that `load_results` ignores.

Example:
    >>> path = result_path("out", cfg)  # doctest: +SKIP
    >>> if not is_finished(path):  # doctest: +SKIP
    ...     save_result(path, train_run(cfg, model, train, test))
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exactlr.paper.training import (
    METRIC_FIELDS,
    OPTIONAL_METRIC_FIELDS,
    REQUIRED_METRIC_FIELDS,
    RunResult,
    TrainConfig,
    validate_config,
)

__all__ = [
    "SCHEMA_VERSION",
    "decode_nonfinite",
    "encode_nonfinite",
    "environment_info",
    "file_mode",
    "is_finished",
    "load_result",
    "load_results",
    "result_path",
    "save_result",
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
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def result_path(out_dir: Path | str, cfg: TrainConfig) -> Path:
    """`out_dir / "runs" / f"{cfg.run_name()}.json"`."""
    return Path(out_dir) / "runs" / f"{cfg.run_name()}.json"


def environment_info(device: torch.device | str | None = "cpu") -> dict[str, Any]:
    """Versions and hardware a result was produced with.

    Returns:
        python, torch, numpy, exactlr versions, platform, device and its name, CPU
        threads, CUDA version (None on CPU-only builds).
    """
    from exactlr import __version__

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


def encode_nonfinite(obj: Any) -> Any:
    """Copy of `obj` with NaN / inf floats as "NaN" / "Infinity" / "-Infinity", tuples as
    lists, numpy scalars and arrays as Python values and Paths as strings."""
    if isinstance(obj, dict):
        return {str(k): encode_nonfinite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode_nonfinite(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return encode_nonfinite(obj.tolist())
    if isinstance(obj, np.generic):
        return encode_nonfinite(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    return obj


def decode_nonfinite(obj: Any) -> Any:
    """Inverse of `encode_nonfinite` for the non-finite markers (recursively)."""
    if isinstance(obj, dict):
        return {k: decode_nonfinite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_nonfinite(v) for v in obj]
    if isinstance(obj, str) and obj in _NONFINITE:
        return _NONFINITE[obj]
    return obj


@functools.cache
def _umask() -> int:
    # os.umask can only be read by setting it; done once, before any worker threads.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of a new result file: 0o666 less the process umask (0o644 under umask 022).

    `tempfile.mkstemp` creates 0o600 files; result files are chmod-ed to this mode so they
    get the permissions a plain `open(path, "w")` would give.
    """
    return 0o666 & ~_umask()


def write_json_atomic(path: Path | str, obj: Any) -> None:
    """Writes `obj` as strict JSON to `path` atomically (temp file, fsync, `os.replace`).

    Non-finite floats are encoded with `encode_nonfinite`. Parent folders are created.
    The file gets mode `file_mode()` (0o644 under the usual umask). On any error the
    temporary file is removed and the target is left as it was.
    """
    text = json.dumps(encode_nonfinite(obj), indent=1, allow_nan=False, sort_keys=False)
    write_bytes_atomic(path, (text + "\n").encode("utf-8"))


def write_bytes_atomic(path: Path | str, data: bytes) -> None:
    """Writes `data` to `path` atomically (temp file, fsync, `os.replace`, mode
    `file_mode()`); on any error the temporary file is removed and the target is left as
    it was. Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # POSIX only
            os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Make the rename itself durable where the OS allows opening a directory.
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def save_result(path: Path | str, result: RunResult, *, extra: dict | None = None) -> None:
    """Saves a run's result (schema in the module docstring) atomically.

    Args:
        path: Target file, usually `result_path(out_dir, result.config)`.
        result: The run.
        extra: Anything else to keep beside it (e.g. how ours_lr was obtained).
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
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); delete it to rerun the run") from err
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
        validate_config(TrainConfig.from_dict(data["config"]))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{path}: bad field 'config' ({err!r})") from err
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
    if not isinstance(data["environment"], dict):
        raise ValueError(f"{path}: field 'environment' must be an object")
    data["path"] = str(path)
    return data


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
