"""Keep freed memory in the process while exactlr works (glibc's malloc settings).

PyTorch's CPU tensors are allocated with the C library's ``malloc``. glibc serves every
request above its mmap threshold (dynamic, at most 32 MiB) with a fresh ``mmap`` and
returns it to the kernel on ``free``. A full-batch Hessian-vector product or training
step allocates and frees the same large intermediates again and again, so each one is
page-faulted back in, 4 KiB at a time, and zeroed by the kernel, which can be a large
share of a product's wall time (``benchmarks/bench_allocator.py`` counts the page faults
and times products with and without).

:func:`keep_freed_memory` switches glibc to serve large requests from its heap
(``M_MMAP_MAX = 0``) and to keep freed heap memory (``M_TRIM_THRESHOLD`` very large),
so the next product reuses the pages of the last one. On exit it restores mmap use
(``M_MMAP_MAX = 65536``, glibc's default) and calls ``malloc_trim(0)``, which hands the
retained memory back. Any ``mallopt`` call ends glibc's *dynamic* thresholds for the
rest of the process (glibc grows the mmap threshold up to 32 MiB, and the trim threshold
to twice that, as it sees large blocks freed); the exit sets them where that growth ends
in a PyTorch process (``M_MMAP_THRESHOLD = 32 MiB``, ``M_TRIM_THRESHOLD = 64 MiB``).
Results are bitwise the same; only where the bytes live changes. The price is memory:
freed blocks stay in the process while active and a heap cannot always reuse a hole for
a differently sized request, so the peak resident memory can grow
(``benchmarks/bench_allocator.py`` reports the peak resident memory of both).

Who changes it: these settings are process-wide, so the library's functions
(``hessian_spectral_norm``, ``estimate_smoothness``, ``suggest_lr``, the operators) never
apply them on their own; they leave the allocator as they found it. The caller decides:
the ``exactlr`` command enters :func:`keep_freed_memory` around every subcommand (so
the CLI is fast), the benchmarks enter it where they say so, and a user's own script can
wrap its calls in ``with exactlr.keep_freed_memory():`` for the same speed.

It is a no-op (and yields ``False``) when the C library is not glibc, when the user
chose their own malloc settings (any ``MALLOC_*_`` tuning variable, or ``glibc.malloc``
in ``GLIBC_TUNABLES``), or when ``EXACTLR_KEEP_FREED_MEMORY=0``. The settings are
process-wide while active; nested and concurrent uses share one activation.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import platform
import sys
import threading
from collections.abc import Iterator

__all__ = ["ENV_SWITCH", "keep_freed_memory"]

ENV_SWITCH = "EXACTLR_KEEP_FREED_MEMORY"

# mallopt parameter numbers and glibc's defaults (malloc/malloc.h, malloc/malloc.c).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_DEFAULT_MMAP_MAX = 65536
# Where glibc's dynamic thresholds end up (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit, twice it).
_SETTLED_MMAP_THRESHOLD, _SETTLED_TRIM_THRESHOLD = 32 * 1024 * 1024, 64 * 1024 * 1024
_KEEP_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int
_USER_TUNING = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
)

_lock = threading.Lock()
_depth = 0


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc's handle, or ``None`` on any other C library or platform."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    return libc


def _user_tuned() -> bool:
    """Whether the environment already sets glibc's malloc (then we leave it alone)."""
    if any(name in os.environ for name in _USER_TUNING):
        return True
    return "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")


_ON, _OFF = ("", "1", "true", "yes", "on"), ("0", "false", "no", "off")


def _enabled() -> bool:
    """The switch ``EXACTLR_KEEP_FREED_MEMORY`` (default on), unless the user tuned glibc.

    Raises:
        ValueError: For a value that is neither on (1/true/yes/on) nor off (0/false/no/off).
    """
    raw = os.environ.get(ENV_SWITCH, "1")
    switch = raw.strip().lower()
    if switch not in _ON + _OFF:
        raise ValueError(
            f"{ENV_SWITCH}={raw!r} is not a switch: set it to 1 (keep freed memory, the "
            "default) or 0 (glibc's own malloc settings), or unset it"
        )
    return switch in _ON and not _user_tuned()


@contextlib.contextmanager
def keep_freed_memory() -> Iterator[bool]:
    """Keep freed memory in the process for reuse while the block runs.

    Usable as ``with keep_freed_memory():`` or as a decorator. Reentrant: only the
    outermost use changes and restores the settings.

    Yields:
        Whether the settings are active (``False``: not glibc, the user's own malloc
        settings, or ``EXACTLR_KEEP_FREED_MEMORY=0``).

    Raises:
        ValueError: ``EXACTLR_KEEP_FREED_MEMORY`` set to something other than a switch.
    """
    global _depth
    libc = _glibc()
    if not _enabled() or libc is None:
        yield False
        return
    with _lock:
        if _depth == 0:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_TRIM_THRESHOLD)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.mallopt(_M_MMAP_THRESHOLD, _SETTLED_MMAP_THRESHOLD)
                libc.mallopt(_M_TRIM_THRESHOLD, _SETTLED_TRIM_THRESHOLD)
                libc.malloc_trim(0)
