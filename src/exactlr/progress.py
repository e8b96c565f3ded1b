"""The optional progress bar (tqdm), shared by the library and the harness.

``progress_bar`` returns a tqdm bar when asked for and tqdm is installed, else a silent
stand-in with the same methods, so callers never branch on either.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["progress_bar"]


class _NoBar:
    """A silent bar: iterates like its iterable; ``update``/``set_postfix*``/``close`` do
    nothing."""

    def __init__(self, iterable: Iterable[Any] | None) -> None:
        self._iterable = iterable if iterable is not None else ()

    def __iter__(self) -> Any:
        return iter(self._iterable)

    def update(self, n: int = 1) -> None:
        """Does nothing."""

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        """Does nothing."""

    def set_postfix_str(self, text: str) -> None:
        """Does nothing."""

    def close(self) -> None:
        """Does nothing."""


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
) -> Any:
    """A tqdm bar over ``iterable`` (or counting to ``total``), or a silent stand-in.

    Args:
        iterable: What to iterate over (None: a manual bar driven by ``update``).
        total: Length of a manual bar.
        desc: Text before the bar.
        unit: Name of one step.
        enabled: False gives the silent stand-in.

    Returns:
        An object with tqdm's ``__iter__``, ``update``, ``set_postfix``,
        ``set_postfix_str`` and ``close``.
    """
    if not enabled:
        return _NoBar(iterable)
    try:
        from tqdm.auto import tqdm  # an optional extra: imported only when asked for
    except ImportError:  # pragma: no cover - tqdm not installed
        return _NoBar(iterable)
    return tqdm(iterable, total=total, desc=desc, unit=unit)
