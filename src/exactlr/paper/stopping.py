"""Stopping cleanly on SIGINT / SIGTERM: at the next epoch's end, after a checkpoint.

The ``exactlr`` command installs :func:`handle_signals`. A signal that arrives while a
run trains with checkpoints (inside :func:`stop_at_epoch_end`) is only noted: the run
finishes its epoch, writes a checkpoint and raises :class:`Interrupted`, so a rerun
resumes from that epoch. Anywhere else, or on a second signal, :class:`Interrupted` is
raised at once (finished result files are kept either way; nothing is half-written,
since every file is written atomically). The library itself installs no handler.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Interrupted", "handle_signals", "raise_if_stop_requested", "stop_at_epoch_end"]


class Interrupted(BaseException):
    """The process was asked to stop by a signal (``signum``); exit status 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


_zone_depth = 0
_requested: int | None = None


@contextlib.contextmanager
def stop_at_epoch_end() -> Iterator[None]:
    """Within this block a first signal is deferred to :func:`stop_requested`."""
    global _zone_depth
    _zone_depth += 1
    try:
        yield
    finally:
        _zone_depth -= 1


def raise_if_stop_requested() -> None:
    """Raises :class:`Interrupted` if a deferred stop was asked for (and clears it)."""
    global _requested
    signum, _requested = _requested, None
    if signum is not None:
        raise Interrupted(signum)


def stop_requested() -> bool:
    """Whether a deferred stop was asked for."""
    return _requested is not None


def _handler(signum: int, frame: Any) -> None:
    global _requested
    if _zone_depth > 0 and _requested is None:
        _requested = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Installs the SIGINT / SIGTERM handlers for the block and restores the old ones."""
    old: dict[int, Callable[..., Any] | int | None] = {}
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be installed in the main thread
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        old[signum] = signal.signal(signum, _handler)
    try:
        yield
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)
