"""The ``exactlr`` command.

Every subcommand is a ``_cmd_<name>(args) -> int`` function registered in
:func:`build_parser`. Errors the user can fix (bad values, missing data) are reported
as one line on stderr with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import torch

EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with the user's input, reported as one line with exit status 2."""


# --------------------------------------------------------------------------------------
# Shared argument helpers
# --------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
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
    """``auto`` -> cuda if available else cpu; validates explicit names."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(
            f"--device {name!r} is not a torch device; use cpu, cuda or auto"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} was asked for but no CUDA GPU is available; use cpu")
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
    parser.add_argument("--seed", type=int, default=0, help="seed for data, weights, solvers")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


# --------------------------------------------------------------------------------------
# exactlr lr
# --------------------------------------------------------------------------------------


def _cmd_lr(args: argparse.Namespace) -> int:
    import torch.nn.functional as F

    from exactlr.data import load_dataset, make_batches
    from exactlr.models import build_model
    from exactlr.stepsize import suggest_lr

    device = resolve_device(args.device)
    train, _ = load_dataset(
        args.dataset, subset=args.subset, data_dir=args.data_dir, seed=args.seed
    )
    batches = make_batches(train.to(device), args.batch_size)
    generator = torch.Generator().manual_seed(args.seed)
    model = build_model(args.model, dataset=args.dataset, init=args.init, generator=generator)
    model = model.to(device)
    total_steps = args.epochs * len(batches)
    suggestion = suggest_lr(
        model,
        F.cross_entropy,
        batches,
        total_steps=total_steps,
        num_samples=args.samples,
        generator=generator,
        progress=not args.quiet and not args.json,
        variant=args.variant,
        method=args.method,
        tol=args.tol,
        patience=args.patience,
    )
    est = suggestion.estimate
    if args.json:
        payload = {
            "lr": suggestion.lr,
            "k_hat": suggestion.k_hat,
            "initial_loss": suggestion.initial_loss,
            "total_steps": suggestion.total_steps,
            "epochs": args.epochs,
            "batches_per_epoch": len(batches),
            "model": args.model,
            "dataset": args.dataset,
            "subset": args.subset,
            "num_train": len(train),
            "variant": est.variant,
            "stopped_early": est.stopped_early,
            "samples": [r.__dict__ for r in est.records],
        }
        print(json.dumps(payload, indent=2))
        return 0
    print(
        f"model {args.model} ({args.init} init), data {args.dataset}/{args.subset} "
        f"({len(train)} samples), {len(batches)} batch(es) per epoch, device {device}"
    )
    print(f"  sample  ||H||_2       lambda_max    lambda_min    HVPs  seconds")
    for r in est.records:
        print(
            f"  {r.index:>6}  {r.value:<12.6g}  {r.lambda_max:<12.6g}  {r.lambda_min:<12.6g}"
            f"  {r.num_hvps:>4}  {r.seconds:7.2f}"
        )
    print(
        f"K_hat  = {suggestion.k_hat:.6g}  (max over {len(est.samples)} samples"
        f"{', adaptive stop' if est.stopped_early else ''})"
    )
    print(f"L(w0)  = {suggestion.initial_loss:.6g}")
    print(f"T      = {suggestion.total_steps}  ({args.epochs} epochs x {len(batches)} steps)")
    print(f"lr     = sqrt(2 L(w0) / (K_hat T)) = {suggestion.lr:.6g}")
    return 0


# --------------------------------------------------------------------------------------
# Parser and entry point
# --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with all subcommands."""
    from exactlr import __version__

    parser = argparse.ArgumentParser(
        prog="exactlr",
        description="A provably motivated constant learning rate for Adam: "
        "alpha = sqrt(2 L(w0) / (K_hat T)).",
    )
    parser.add_argument("--version", action="version", version=f"exactlr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    lr = sub.add_parser("lr", help="the exact step size for a model and data set")
    lr.add_argument("--model", default="fc3x1000", help="fc{depth}x{width}, lenet or vgg9")
    lr.add_argument("--dataset", default="synthetic", help="synthetic, mnist or cifar10")
    lr.add_argument("--subset", default="mini", choices=["mini", "full"])
    lr.add_argument("--init", default="paper", choices=["paper", "pytorch"])
    lr.add_argument("--epochs", type=positive_int, default=100)
    lr.add_argument("--batch-size", type=batch_size_arg, default=None, metavar="full|N")
    lr.add_argument("--samples", type=positive_int, default=10, help="weight samples N")
    lr.add_argument("--variant", default="full", choices=["full", "minibatch"])
    lr.add_argument("--method", default="lanczos", choices=["lanczos", "power"])
    lr.add_argument("--tol", type=float, default=1e-4)
    lr.add_argument(
        "--patience",
        type=positive_int,
        default=None,
        help="adaptive stop after this many samples without growth",
    )
    lr.add_argument("--json", action="store_true", help="machine-readable output")
    add_common_data_args(lr)
    lr.set_defaults(func=_cmd_lr)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``exactlr`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"exactlr: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("exactlr: interrupted; finished results are kept, rerun to resume", file=sys.stderr)
        return 130


def _entry() -> None:  # pragma: no cover
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    _entry()
