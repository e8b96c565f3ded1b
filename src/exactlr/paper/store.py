"""The results folder: its layout, atomic writes and strict JSON.

Everything the harness writes lives under one results folder ``out_dir``:

```
out_dir/runs/<run_name>.json          one result per run (exactlr.paper.results)
out_dir/lr/<key>.json                 alpha_ours cache: K_hat, L(w0), T, lr
out_dir/lr_finder/<key>.json          the LR range test's cache
out_dir/figures/<figure>-<scale>.json a figure's manifest: its runs, rows, scale
out_dir/figures/<figure>-<scale>-seed<k>.json   the same for base seed k != 0
out_dir/checkpoints/<run_name>.pt     a run's checkpoint while it trains
out_dir/reports/<figure>-<scale>.md   the verdict table (and .json; -seed<k> as above)
out_dir/plots/...                     drawings made from the files above
out_dir/aside/...                     files that did not match their plan, kept aside
```

Every file is written to a temporary file of a unique name in the same folder, flushed,
fsync'ed and renamed over the target (``os.replace``), so a reader never sees a partial
file and a process killed mid-write leaves only a hidden ``.*.tmp`` file that readers
ignore. JSON is strict: non-finite floats are written as the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"`` (``allow_nan=False``), and a file holding the bare
literals ``NaN`` / ``Infinity`` is rejected on read.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "check_out_dir",
    "checkpoint_path",
    "confined_path",
    "decode_nonfinite",
    "encode_nonfinite",
    "file_mode",
    "finder_cache_path",
    "load_or_set_aside",
    "loads_strict",
    "lr_cache_path",
    "manifest_path",
    "read_json",
    "report_path",
    "run_path",
    "seed_suffix",
    "set_aside",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}

PathLike = str | os.PathLike[str]
T = TypeVar("T")

log = logging.getLogger("exactlr")


# ------------------------------------------------------------------------------ layout


def run_path(out_dir: PathLike, run_name: str) -> Path:
    """``out_dir/runs/<run_name>.json``: a run's result file."""
    return Path(out_dir) / "runs" / f"{run_name}.json"


def seed_suffix(seed: int) -> str:
    """``""`` for base seed 0 (the figure as first run), else ``"-seed<k>"``."""
    return "" if seed == 0 else f"-seed{seed}"


def manifest_path(out_dir: PathLike, name: str, scale: str, seed: int = 0) -> Path:
    """``out_dir/figures/<name>-<scale>[-seed<k>].json``: the list of a figure's runs
    with base seed ``seed`` (no suffix for seed 0)."""
    return Path(out_dir) / "figures" / f"{name}-{scale}{seed_suffix(seed)}.json"


def lr_cache_path(out_dir: PathLike, filename: str) -> Path:
    """``out_dir/lr/<filename>.json``: an alpha_ours cache entry."""
    return Path(out_dir) / "lr" / f"{filename}.json"


def finder_cache_path(out_dir: PathLike, filename: str) -> Path:
    """``out_dir/lr_finder/<filename>.json``: an LR range test cache entry."""
    return Path(out_dir) / "lr_finder" / f"{filename}.json"


def checkpoint_path(out_dir: PathLike, run_name: str) -> Path:
    """``out_dir/checkpoints/<run_name>.pt``: a run's checkpoint while it trains."""
    return Path(out_dir) / "checkpoints" / f"{run_name}.pt"


def report_path(out_dir: PathLike, name: str, scale: str, seed: int = 0) -> Path:
    """``out_dir/reports/<name>-<scale>[-seed<k>].md``: a figure's verdict table
    (``.json`` beside)."""
    return Path(out_dir) / "reports" / f"{name}-{scale}{seed_suffix(seed)}.md"


def plots_dir(out_dir: PathLike) -> Path:
    """``out_dir/plots``: the drawings."""
    return Path(out_dir) / "plots"


def set_aside(out_dir: PathLike, path: PathLike) -> Path:
    """Moves ``path`` (a file under ``out_dir``) to ``out_dir/aside/<same path>.<n>``.

    A file that does not match its plan is kept there, never deleted, and the plan is
    recomputed. ``n`` is the first number not taken yet.

    Returns:
        The file's new path.
    """
    root, path = Path(out_dir), Path(path)
    relative = path.resolve().relative_to(root.resolve())
    base = root / "aside" / relative
    base.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while base.with_name(f"{base.name}.{n}").exists():
        n += 1
    target = base.with_name(f"{base.name}.{n}")
    os.replace(path, target)
    return target


def load_or_set_aside(
    path: PathLike,
    out_dir: PathLike,
    load: Callable[[Path], T],
    problem: Callable[[T], str | None],
    *,
    what: str,
    redo: str,
) -> T | None:
    """The file at ``path`` as ``load`` reads it, if ``problem`` finds nothing wrong.

    A missing file gives None. A file that ``load`` rejects (``ValueError``: truncated,
    not strict JSON, another schema) or of which ``problem`` returns a description (another
    setting, data or w0) is named in one warning, ``"<what> <path> <problem>; <redo> (the
    old file is now <aside>)"``, moved aside with :func:`set_aside` and gives None, so the
    caller recomputes it.

    Args:
        path: The cached file, under ``out_dir``.
        out_dir: The results root (``aside/`` is made there).
        load: Reads and checks the file's form; raises ``ValueError`` naming the problem.
        problem: What makes the loaded value wrong for the caller's plan, or None.
        what: The kind of file, for the warning (``"result"``, ``"LR cache entry"``).
        redo: What the caller does instead, for the warning (``"rerunning it"``).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = load(path)
    except ValueError as err:
        found: str | None = f"is unreadable ({err})"
    else:
        found = problem(data)
        if found is None:
            return data
    aside = set_aside(out_dir, path)
    log.warning("%s %s %s; %s (the old file is now %s)", what, path, found, redo, aside)
    return None


def confined_path(out_dir: PathLike, relative: Any, *, what: str) -> Path:
    """``out_dir / relative`` for a path read from a file, refused if it leaves ``out_dir``.

    Args:
        out_dir: The results folder.
        relative: The path as stored (must be a relative string without ``..``).
        what: Where the path was read from, for the message.

    Raises:
        ValueError: Not a string, absolute, or resolving outside ``out_dir``.
    """
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"{what}: path {relative!r} is not a relative file name")
    root = Path(out_dir).resolve()
    target = (root / relative).resolve()
    if Path(relative).is_absolute() or not target.is_relative_to(root):
        raise ValueError(
            f"{what}: path {relative!r} points outside the results folder {out_dir}; "
            "delete the file to rerun"
        )
    return Path(out_dir) / relative


def check_out_dir(out_dir: PathLike, *, create: bool) -> Path:
    """Checks a results folder: it may not exist yet but must not be a file.

    With ``create``, the folder is made now and must be writable, so that a bad path
    fails before any training.

    Raises:
        ValueError: The path (or a parent) is a file, or it cannot be created or written.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"results folder {out} is an existing file; choose a folder")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(
            f"results folder {out} cannot be created: it is under {parent}, which is a file"
        )
    if create:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(
                f"results folder {out} cannot be created ({err.strerror or err}); "
                "choose a writable folder"
            ) from err
        if not os.access(out, os.W_OK | os.X_OK):
            raise ValueError(f"results folder {out} is not writable; choose a writable folder")
    return out


# ------------------------------------------------------------------------------ JSON


def encode_nonfinite(obj: Any) -> Any:
    """Copy of ``obj`` with NaN / inf floats as "NaN" / "Infinity" / "-Infinity", tuples as
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
    """Inverse of :func:`encode_nonfinite` for the non-finite markers (recursively)."""
    if isinstance(obj, dict):
        return {k: decode_nonfinite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_nonfinite(v) for v in obj]
    if isinstance(obj, str) and obj in _NONFINITE:
        return _NONFINITE[obj]
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f'non-standard JSON literal {name} (strict JSON writes it as "{name}")')


def loads_strict(text: str) -> Any:
    """``json.loads`` that rejects the non-standard literals ``NaN``, ``Infinity``.

    Raises:
        ValueError: Invalid JSON (``json.JSONDecodeError`` is a ``ValueError``) or a bare
            non-finite literal.
    """
    return json.loads(text, parse_constant=_reject_constant)


def read_json(path: PathLike, *, what: str = "file") -> Any:
    """Reads a strict JSON file.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Naming the file: unreadable, not valid strict JSON.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read the {what} ({err})") from err
    try:
        return loads_strict(text)
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


# ------------------------------------------------------------------------------ writes


@functools.cache
def _umask() -> int:
    # os.umask can only be read by setting it; done once, before any worker threads.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of a new file: 0o666 less the process umask (0o644 under umask 022).

    ``tempfile.mkstemp`` creates 0o600 files; written files are chmod-ed to this mode so
    they get the permissions a plain ``open(path, "w")`` would give.
    """
    return 0o666 & ~_umask()


def _fsync_dir(folder: Path) -> None:
    """Makes a rename in ``folder`` durable where the OS allows opening a directory."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def atomic_target(path: PathLike) -> Iterator[Path]:
    """Yields a unique temporary path beside ``path``; renamed over it on success.

    The body writes the temporary file by name (``torch.save``, ``Figure.savefig``); it
    is fsync'ed, given :func:`file_mode` and renamed with ``os.replace``. On any error the
    temporary file is removed and ``path`` is left as it was. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (see :func:`atomic_target`)."""
    with atomic_target(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_target`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: PathLike, obj: Any) -> None:
    """Writes ``obj`` as strict JSON to ``path`` atomically.

    Non-finite floats are encoded with :func:`encode_nonfinite`; ``allow_nan=False``
    guarantees no bare ``NaN`` literal reaches the file.
    """
    text = json.dumps(encode_nonfinite(obj), indent=1, allow_nan=False, sort_keys=False)
    write_bytes_atomic(path, (text + "\n").encode("utf-8"))
