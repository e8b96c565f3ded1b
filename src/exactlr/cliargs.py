"""The ``exactlr`` command's argument types and shared options.

Each type turns one command-line value into a checked Python value or raises
``argparse.ArgumentTypeError`` (one line, exit status 2, via :class:`_Parser`); bounds
that no real run reaches (``MAX_EPOCHS``, ``MAX_SEED``, model sizes) make a typo fail at
once instead of deep inside torch.
"""

from __future__ import annotations

import argparse
import math
import re
from typing import NoReturn

import torch

from exactlr.paper.planning import parse_methods
from exactlr.paper.seeds import parse_seeds

EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with the user's input, reported as one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors are one line (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        """Prints `exactlr <command>: error: <message>` and where to get help; exits 2."""
        text = " ".join(message.split())
        self.exit(EXIT_USAGE, f"{self.prog}: error: {text} (see `{self.prog} --help`)\n")


# --------------------------------------------------------------------------------------
# Shared argument helpers
# --------------------------------------------------------------------------------------


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def methods_arg(text: str) -> tuple[str, ...]:
    """argparse type: comma-separated method sets (``paper,parameter-free,...``)."""
    try:
        return parse_methods(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--methods {text!r}: {err}") from None


#: Largest --epochs (a bound that no run reaches, so a typo fails at once).
MAX_EPOCHS = 1_000_000
#: Seeds are in [0, 2**32): seed-derived seeds (seed + 1, ...) stay in torch's range.
MAX_SEED = 2**32 - 1


def epochs_arg(text: str) -> int:
    """argparse type: a number of epochs, 1 .. ``MAX_EPOCHS``."""
    value = positive_int(text) if len(text) < 20 else MAX_EPOCHS + 1
    if value > MAX_EPOCHS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_EPOCHS} epochs, got {text[:20]!r}")
    return value


def seed_arg(text: str) -> int:
    """argparse type: a seed in [0, 2**32)."""
    value = _int_at_least(text, 0, "a seed >= 0") if len(text) < 30 else MAX_SEED + 1
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**32), got {text[:30]!r}")
    return value


def _open_unit(text: str, what: str) -> float:
    """A number strictly between 0 and 1, else an ``ArgumentTypeError`` naming ``what``."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected {what} strictly between 0 and 1, got {text!r}")
    return value


def tol_arg(text: str) -> float:
    """argparse type: a relative tolerance strictly between 0 and 1."""
    return _open_unit(text, "a relative tolerance")


def model_arg(text: str) -> str:
    """argparse type: a model name; ``fc{depth}x{width}`` within 1,000 x 100,000."""
    match = re.fullmatch(r"fc(\d+)x(\d+)", text)
    if match and not (1 <= int(match[1]) <= 1_000 and 1 <= int(match[2]) <= 100_000):
        raise argparse.ArgumentTypeError(
            f"model {text!r}: depth must be in 1..1000 and width in 1..100000"
        )
    return text


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def seeds_arg(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated base seeds (``0,1,2``)."""
    try:
        return parse_seeds(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def speed_arg(text: str) -> float | str:
    """argparse type: ``auto`` (calibrate on the device) or a positive number."""
    if text == "auto":
        return text
    try:
        return positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected 'auto' or a positive number, got {text!r}"
        ) from None


def share_arg(text: str) -> float:
    """argparse type: a share of the data, a number strictly between 0 and 1."""
    return _open_unit(text, "a share")


def subsample_arg(text: str) -> float | str | None:
    """argparse type: ``auto``, ``none`` (a random start) or a share in (0, 1)."""
    if text.lower() in ("auto", "none"):
        return "auto" if text.lower() == "auto" else None
    try:
        return _open_unit(text, "a share")
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected 'auto', 'none' or a share strictly between 0 and 1, got {text!r}"
        ) from None


def screen_arg(text: str) -> float | None:
    """argparse type: ``none`` (no screen) or a share in (0, 1]."""
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"expected 'none' or a number in (0, 1], got {text!r}"
        ) from None
    return value


def batch_size_arg(text: str) -> int | None:
    """argparse type: ``full`` (one batch: None) or a positive integer."""
    if text.lower() == "full":
        return None
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"batch size must be 'full' or a positive integer, got {text!r}"
        ) from None


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; validates explicit names (cpu, cuda[:N],
    mps where available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(
            f"--device {name!r} is not a torch device; use cpu, cuda or auto"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name} was asked for but no CUDA GPU is available; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {name}: there are {torch.cuda.device_count()} CUDA GPU(s); "
                "use cuda:0 or cuda"
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {name} was asked for but MPS is not available; use cpu")
    elif device.type != "cpu":
        raise UsageError(f"--device {name!r} cannot train; use cpu, cuda, cuda:N, mps or auto")
    return device


def add_common_data_args(parser: argparse.ArgumentParser) -> None:
    """``--data-dir``, ``--device``, ``--seed``, ``--quiet``."""
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder holding MNIST/raw/ or cifar-10-batches-py/ (default: $EXACTLR_DATA, "
        "./data, ~/.cache/exactlr/data)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument(
        "--seed", type=seed_arg, default=0, help="seed for data, weights, solvers (0 .. 2**32-1)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
