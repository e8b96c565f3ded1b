"""``python -m exactlr`` and the ``exactlr`` command.

The command's start imports torch, which takes seconds; a Ctrl-C (SIGINT) or SIGTERM in
that time ends the command with one line and status 130 / 143 like any later one, not a
traceback. Once :func:`exactlr.cli.main` runs, it handles the signals itself.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence
from typing import Any


class _Terminated(Exception):
    """SIGTERM during start-up."""


def _terminate(signum: int, frame: Any) -> None:
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Starts the ``exactlr`` command; returns its exit status."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        try:
            from exactlr.cli import main as cli_main
        except (KeyboardInterrupt, _Terminated) as err:
            name, status = (
                ("SIGINT", 130) if isinstance(err, KeyboardInterrupt) else ("SIGTERM", 143)
            )
            print(f"exactlr: interrupted ({name}) while starting; nothing was run", file=sys.stderr)
            return status
        return cli_main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
