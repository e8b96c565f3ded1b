"""Independent runs of a figure on Ray: one machine's cores or a cluster.

:func:`ray_runner` returns a :class:`RayRunner`, a drop-in for
:func:`exactlr.paper.runner.execute_run` in ``run_figure(..., runner=...)``. Each call
submits the run as a Ray task and returns at once with the path its result file will
have; :meth:`RayRunner.wait` then collects the tasks as they finish.

The task trains into a private temporary folder on the worker and sends the files it
wrote back to the driver, which writes them under the results folder atomically (temp
file + ``os.replace``, the same as a local run). So workers need no shared filesystem
and the result files are exactly those of the local executor. Every worker must be able
to import ``exactlr`` (install it on every node, or use a Ray ``runtime_env``).

Example:
    >>> from exactlr.paper.runner import run_figure                    # doctest: +SKIP
    >>> runner = ray_runner(None, num_cpus=2)                     # doctest: +SKIP
    >>> try:                                                      # doctest: +SKIP
    ...     run_figure("fig1", scale="smoke", out_dir="results", runner=runner)
    ...     runner.wait()
    ... finally:
    ...     runner.close()
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from exactlr.paper.runner import execute_run
from exactlr.paper.store import confined_path, run_path, write_bytes_atomic

__all__ = ["RayRunner", "ray_available", "ray_runner"]


def ray_available() -> bool:
    """Whether ``import ray`` works here."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def _run_in_tmp(
    plan: Any, kwargs: Mapping[str, Any], ours: Any, w0_state: Any, train: Any, test: Any
) -> dict[str, bytes]:
    """Runs ``execute_run`` into a temporary folder; returns ``{relative path: bytes}``.

    The large inputs are positional so that Ray resolves their object references.
    """
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="exactlr-ray-") as tmp:
        execute_run(
            plan, ours=ours, w0_state=w0_state, train=train, test=test, out_dir=tmp, **kwargs
        )
        for path in Path(tmp).rglob("*"):
            if path.is_file() and not path.name.startswith("."):
                files[path.relative_to(tmp).as_posix()] = path.read_bytes()
    return files


class RayRunner:
    """Submits runs as Ray tasks; the driver writes their files (see module docstring).

    Args:
        num_cpus_per_run: CPUs Ray reserves for each run (its torch threads follow).
        owns_ray: Whether :meth:`close` shuts Ray down (it was started by us).
    """

    #: Runs train in temporary folders on the workers: no checkpoint outlives them, so
    #: ``run_figure`` refuses an explicit ``checkpoint_every > 0`` with this executor.
    supports_checkpoints = False

    def __init__(self, *, num_cpus_per_run: float = 1, owns_ray: bool = False) -> None:
        import ray

        self._ray = ray
        self._task = ray.remote(num_cpus=num_cpus_per_run)(_run_in_tmp)
        self._pending: dict[Any, Path] = {}
        self._refs: dict[int, tuple[Any, Any]] = {}
        self.owns_ray = owns_ray

    @property
    def num_pending(self) -> int:
        """Submitted runs not yet collected."""
        return len(self._pending)

    def _put(self, obj: Any) -> Any:
        """One object-store copy per distinct object (data and w0 are shared by runs)."""
        key = id(obj)
        if key not in self._refs:
            self._refs[key] = (obj, self._ray.put(obj))
        return self._refs[key][1]

    def __call__(
        self,
        plan: Any,
        *,
        ours: Mapping[str, Any],
        w0_state: Mapping[str, Any],
        train: Any,
        test: Any,
        out_dir: str | os.PathLike[str],
        **kwargs: Any,
    ) -> Path:
        """Submits one run (``execute_run``'s signature); returns its result path."""
        if "device" in kwargs:
            kwargs["device"] = str(kwargs["device"])
        if kwargs.get("checkpoint_every"):
            raise ValueError("the Ray executor cannot keep checkpoints (checkpoint_every=0)")
        ref = self._task.remote(
            plan,
            kwargs,
            self._put(ours),
            self._put(w0_state),
            self._put(train),
            self._put(test),
        )
        self._pending[ref] = Path(out_dir)
        return run_path(out_dir, plan.run_name)

    def wait(self) -> int:
        """Waits for every submitted run, writing its files as it finishes.

        Returns:
            The number of runs collected.

        Raises:
            Whatever a run raised (runs finished before it are written, so rerunning
            resumes).
        """
        done = 0
        while self._pending:
            ready, _ = self._ray.wait(list(self._pending), num_returns=1)
            out = self._pending.pop(ready[0])
            files = self._ray.get(ready[0])
            for rel, data in sorted(files.items()):
                # A worker's paths must stay inside the results folder.
                write_bytes_atomic(confined_path(out, rel, what="a Ray worker's file"), data)
            done += 1
        self._refs.clear()
        return done

    def close(self) -> None:
        """Cancels unfinished runs and shuts Ray down if this runner started it."""
        for ref in list(self._pending):
            self._ray.cancel(ref, force=True)
        self._pending.clear()
        self._refs.clear()
        if self.owns_ray and self._ray.is_initialized():
            self._ray.shutdown()


def _check_reachable(address: str, timeout: float) -> None:
    """Raises ``ConnectionError`` unless ``HOST:PORT`` accepts a TCP connection within
    ``timeout`` seconds (``ray.init`` itself retries an unreachable address for long)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" or a "ray://" URL: left to Ray
    host = host.removeprefix("ray://")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise ConnectionError(
            f"Ray cluster at {address} is not reachable within {timeout:g} s ({err}); "
            "check the address, or run without one for a local Ray"
        ) from None


def ray_runner(
    address: str | None = None,
    num_cpus: int | None = None,
    *,
    num_cpus_per_run: float = 1,
    connect_timeout: float = 30.0,
) -> RayRunner:
    """A :class:`RayRunner` on a local Ray (``address=None``) or a cluster.

    Connects to an already initialised Ray if there is one; otherwise calls
    ``ray.init(address=address)`` (a local instance with ``num_cpus`` CPUs when
    ``address`` is None, the cluster at ``HOST:PORT`` or ``"auto"`` otherwise), which the
    runner's :meth:`~RayRunner.close` shuts down again.

    Args:
        address: Ray cluster address, or None for a local Ray on this machine.
        num_cpus: CPUs of the local Ray (default: all); ignored for a cluster.
        num_cpus_per_run: CPUs reserved per run.
        connect_timeout: Seconds to wait for a cluster at ``HOST:PORT`` to answer.

    Returns:
        The runner.

    Raises:
        ImportError: Ray is not installed (``pip install "ray>=2.9"``).
        ConnectionError: The cluster at ``address`` does not answer in time.
        ValueError: ``connect_timeout`` is not positive.
    """
    if not connect_timeout > 0:
        raise ValueError(f"connect_timeout={connect_timeout} must be positive (seconds)")
    try:
        import ray
    except ImportError as err:
        raise ImportError(
            "the ray executor needs Ray: pip install 'ray>=2.9' (or the exactlr 'ray' extra)"
        ) from err
    owns = False
    if not ray.is_initialized():
        if address is None:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        else:
            _check_reachable(address, connect_timeout)
            ray.init(address=address, log_to_driver=False)
        owns = True
    return RayRunner(num_cpus_per_run=num_cpus_per_run, owns_ray=owns)
