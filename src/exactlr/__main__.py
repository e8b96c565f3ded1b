"""``python -m exactlr``: the same as the ``exactlr`` command."""

from exactlr.cli import main

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
