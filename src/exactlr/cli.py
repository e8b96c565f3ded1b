"""The ``exactlr`` command.

Every subcommand is a ``_cmd_<name>(args) -> int`` function registered in
:func:`build_parser`. Errors the user can fix (bad values, missing data) are reported
as one line on stderr with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from exactlr import lr_command
from exactlr._version import __version__
from exactlr.allocator import keep_freed_memory
from exactlr.curvature.distributed import rank_device, torchrun_session
from exactlr.paper import ray_executor
from exactlr.paper.figures import get_figure, list_figures
from exactlr.paper.planning import parse_methods
from exactlr.paper.report import figure_report, format_markdown
from exactlr.paper.runner import run_figure
from exactlr.paper.scales import Scale, parse_scale
from exactlr.paper.store import (
    check_out_dir,
    manifest_path,
    report_path,
    write_json_atomic,
    write_text_atomic,
)

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


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def share_arg(text: str) -> float:
    """argparse type: a share of the data, a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a share strictly between 0 and 1, got {text!r}")
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
    return lr_command.run(args, rank_device(resolve_device(args.device)))


# --------------------------------------------------------------------------------------
# exactlr run / plot / report / list / demo
# --------------------------------------------------------------------------------------


def _out_dir(text: str, *, create: bool = False) -> Path:
    """An ``--out`` folder: may not exist yet, must not be an existing file.

    With `create`, the folder is made now and must be writable, so that a bad path fails
    before any training.
    """
    try:
        return check_out_dir(text, create=create)
    except ValueError as err:
        raise UsageError(f"--out: {err}") from None


def _no_results(figure: str, scale: str, out: Path) -> None:
    """Raises `UsageError` when `out` holds no result of `figure` at `scale`."""
    if not manifest_path(out, figure, scale).is_file():
        raise UsageError(
            f"no results of {figure} at scale {scale} in {out}; run `exactlr run {figure} "
            f"--scale {scale} --out {out}` first"
        )


def _check_figure(name: str, scale: str | None = None) -> None:
    """Raises `UsageError` for an unknown figure or scale."""
    try:
        get_figure(name)
        if scale is not None:
            parse_scale(scale)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _ray_runner(address: str | None) -> Any:
    """The Ray executor's runner, or a one-line `UsageError` if Ray is missing."""
    if not ray_executor.ray_available():
        raise UsageError(
            "--executor ray needs Ray, which is not installed: pip install 'ray>=2.9' "
            "(or exactlr[ray]); or use --executor local"
        )
    return ray_executor.ray_runner(address)


def _num_threads(args: argparse.Namespace, scale: Scale, device: torch.device) -> int | None:
    """``--threads``, else the scale's default on a CPU (one thread at smoke scale)."""
    if args.threads is not None:
        return args.threads
    return scale.num_threads if device.type == "cpu" else None


def _cmd_run(args: argparse.Namespace) -> int:
    _check_figure(args.figure, args.scale)
    out = _out_dir(args.out, create=True)
    device = resolve_device(args.device)
    if args.address is not None and args.executor != "ray":
        raise UsageError("--address is only used with --executor ray")
    runner = _ray_runner(args.address) if args.executor == "ray" else None
    start = time.perf_counter()
    try:
        paths = run_figure(
            args.figure,
            scale=args.scale,
            out_dir=out,
            device=device,
            seed=args.seed,
            data_dir=args.data_dir,
            progress=not args.quiet,
            epochs=args.epochs,
            checkpoint_every=args.checkpoint_every,
            runner=runner,
            methods=args.methods,
            curvature_every=args.curvature_every,
            num_threads=_num_threads(args, Scale(args.scale), device),
        )
        if runner is not None:  # run_figure only submitted the runs; collect them here
            runner.wait()
    finally:
        if runner is not None:
            runner.close()
    print(
        f"{args.figure} ({args.scale}): {len(paths)} runs in {out}/runs "
        f"({time.perf_counter() - start:.1f} s); next: exactlr report {args.figure} "
        f"--scale {args.scale} --out {out}"
    )
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    # matplotlib is an optional extra: imported only to plot.
    from exactlr.paper.plotting import plot_figure, plot_sharpness, plot_smoothness

    _check_figure(args.figure, args.scale)
    out = _out_dir(args.out)
    _no_results(args.figure, args.scale, out)
    paths = plot_figure(args.figure, out_dir=out, scale=args.scale)
    with contextlib.suppress(FileNotFoundError):  # runs made elsewhere may lack the cache
        paths += plot_smoothness(args.figure, out_dir=out, scale=args.scale)
    with contextlib.suppress(FileNotFoundError):  # only runs with --curvature-every
        paths += plot_sharpness(args.figure, out_dir=out, scale=args.scale)
    for path in paths:
        print(path)
    return 0


def _write_report(figure: str, scale: str, out: Path) -> tuple[dict, str, Path]:
    report = figure_report(figure, out_dir=out, scale=scale)
    text = format_markdown(report)
    md_path = report_path(out, figure, scale)
    write_text_atomic(md_path, text)
    write_json_atomic(md_path.with_suffix(".json"), report)
    return report, text, md_path


def _cmd_report(args: argparse.Namespace) -> int:
    _check_figure(args.figure, args.scale)
    out = _out_dir(args.out)
    _no_results(args.figure, args.scale, out)
    report, text, _ = _write_report(args.figure, args.scale, out)
    if args.format == "json":
        print(json.dumps(report, indent=2, allow_nan=False))
    else:
        print(text, end="")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    print(list_figures())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from exactlr.paper.plotting import plot_figure, plot_smoothness  # optional extra

    out = _out_dir(args.out, create=True)
    start = time.perf_counter()
    device = resolve_device(args.device)
    run_figure(
        "demo",
        scale="cpu",
        out_dir=out,
        device=device,
        seed=args.seed,
        progress=not args.quiet,
        epochs=args.epochs,
        # The demo's tensors are small: one thread unless asked otherwise (see --threads).
        num_threads=args.threads
        if args.threads is not None
        else 1
        if device.type == "cpu"
        else None,
    )
    plots = plot_figure("demo", out_dir=out, scale="cpu")
    plots += plot_smoothness("demo", out_dir=out, scale="cpu")
    _, text, md_path = _write_report("demo", "cpu", out)
    print(text, end="")
    print(f"\nplots: {', '.join(str(p) for p in plots)}")
    print(f"table: {md_path}   ({time.perf_counter() - start:.1f} s)")
    return 0


# --------------------------------------------------------------------------------------
# Parser and entry point
# --------------------------------------------------------------------------------------


def _add_threads_arg(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"torch CPU threads while the runs train ({default}; small runs are faster "
        "on one thread)",
    )


def _add_lr_command(sub: Any) -> None:
    """``exactlr lr``."""
    lr = sub.add_parser("lr", help="the exact step size for a model and data set")
    lr.add_argument(
        "--model",
        default="fc3x1000",
        help="fc{depth}x{width}, lenet, vgg9, or your factory: pkg.module:factory or "
        "path/to/file.py:factory (factory() returns a freshly initialised model)",
    )
    lr.add_argument("--dataset", default=None, help="synthetic (default), mnist or cifar10")
    lr.add_argument("--subset", default=None, choices=["mini", "full"], help="default: mini")
    lr.add_argument(
        "--init", default=None, choices=["paper", "pytorch"], help="built-in models; default: paper"
    )
    lr.add_argument("--epochs", type=positive_int, default=100)
    lr.add_argument("--batch-size", type=batch_size_arg, default=None, metavar="full|N")
    lr.add_argument("--samples", type=positive_int, default=10, help="weight samples N")
    lr.add_argument("--variant", default="full", choices=["full", "minibatch"])
    lr.add_argument("--method", default="lanczos", choices=["lanczos", "power"])
    lr.add_argument("--tol", type=float, default=1e-4)
    lr.add_argument(
        "--subsample",
        type=share_arg,
        default=None,
        metavar="SHARE",
        help="start each sample's Lanczos on the Hessian of this share of the data (e.g. "
        "0.1), then finish on all of it to --tol: fewer full-data products (with the "
        "minibatch variant: a share of each batch; needs --method lanczos)",
    )
    lr.add_argument(
        "--patience",
        type=positive_int,
        default=None,
        help="adaptive stop after this many samples without growth",
    )
    lr.add_argument(
        "--parallel",
        default="data",
        choices=["data", "samples"],
        help="under torchrun: split the data over the processes, or the weight samples",
    )
    lr.add_argument("--json", action="store_true", help="machine-readable output")
    add_common_data_args(lr)
    lr.add_argument(
        "--data",
        default=None,
        metavar="MODULE:LOADER",
        help="your training batches: pkg.module:loader or path/to/file.py:loader, where "
        "loader() returns (inputs, targets) batches (a list or DataLoader, one epoch); "
        "replaces --dataset/--subset/--batch-size",
    )
    lr.add_argument(
        "--k-hat",
        type=positive_float,
        default=None,
        metavar="X",
        help="reuse a measured K_hat (e.g. for another --epochs): only L(w0) is measured",
    )
    lr.add_argument(
        "--check",
        type=non_negative_int,
        default=0,
        metavar="K",
        help="safety check: K Adam steps (10 or more) at the suggested lr on a copy from w0, "
        "then the loss change and the Hessian norm at the end against K_hat and 2/lr; warns "
        "when the loss rose or the curvature grew beyond K_hat (default 0: off)",
    )
    lr.add_argument(
        "--plot",
        default=None,
        metavar="FILE",
        help="draw the per-sample Hessian norms and their running max (K_hat) to FILE "
        "(.png, .pdf, .svg; needs matplotlib)",
    )
    lr.set_defaults(func=_cmd_lr)


def _add_run_command(sub: Any) -> None:
    """``exactlr run``."""
    scales = "smoke (seconds, plumbing only), cpu (reduced, laptop) or paper (full size)"
    run = sub.add_parser("run", help="run (or resume) the runs of one of the paper's figures")
    run.add_argument("figure", help="fig1 .. fig16, init or demo (see `exactlr list`)")
    run.add_argument("--scale", default="cpu", help=scales)
    run.add_argument("--out", default="results", help="results folder (default: results)")
    run.add_argument("--epochs", type=positive_int, default=None, help=argparse.SUPPRESS)
    run.add_argument(
        "--checkpoint-every",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="checkpoint each run every N epochs under OUT/checkpoints, so a killed run "
        "resumes mid-run (default: 5 at cpu/paper scale, none at smoke; 0: none)",
    )
    run.add_argument(
        "--methods",
        type=methods_arg,
        default=("paper",),
        metavar="SETS",
        help="comma-separated method sets: paper (the figure's own methods), "
        "parameter-free (Prodigy, D-Adaptation Adam, Schedule-Free AdamW; needs "
        "exactlr[beyond]), lr-finder (LR range test, then Adam at its suggestion), tuned "
        "(each scheduler at base LRs 1e-1..1e-4, best kept); default: paper",
    )
    run.add_argument(
        "--curvature-every",
        type=non_negative_int,
        default=0,
        metavar="K",
        help="measure the Hessian spectral norm every K epochs of every run (plotted "
        "against 2/lr; runs are named ...__curvK); default 0: never",
    )
    run.add_argument(
        "--executor",
        default="local",
        choices=["local", "ray"],
        help="local: runs one after another here; ray: independent runs as Ray tasks "
        "(result files written here, so no shared storage is needed)",
    )
    run.add_argument(
        "--address",
        default=None,
        help="with --executor ray: Ray cluster address HOST:PORT or 'auto' "
        "(default: start a local Ray on this machine)",
    )
    add_common_data_args(run)
    _add_threads_arg(run, "default: 1 at smoke scale on a CPU, else torch's default")
    run.set_defaults(func=_cmd_run)


def _add_other_commands(sub: Any) -> None:
    """``exactlr plot``, ``report``, ``list`` and ``demo``."""
    scales = "smoke (seconds, plumbing only), cpu (reduced, laptop) or paper (full size)"
    plot = sub.add_parser("plot", help="draw a figure from its result files")
    plot.add_argument("figure")
    plot.add_argument("--out", default="results", help="results folder (default: results)")
    plot.add_argument("--scale", default="cpu", help=scales)
    plot.set_defaults(func=_cmd_plot)

    report = sub.add_parser("report", help="verdict table of a figure from its result files")
    report.add_argument("figure")
    report.add_argument("--out", default="results", help="results folder (default: results)")
    report.add_argument("--scale", default="cpu", help=scales)
    report.add_argument("--format", default="md", choices=["md", "json"])
    report.set_defaults(func=_cmd_report)

    lister = sub.add_parser("list", help="the figures and scales")
    lister.set_defaults(func=_cmd_list)

    demo = sub.add_parser(
        "demo", help="ours vs schedulers and constant LRs on built-in synthetic data (~1 min)"
    )
    demo.add_argument("--out", default="results/demo", help="results folder")
    demo.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--epochs", type=positive_int, default=None, help=argparse.SUPPRESS)
    _add_threads_arg(demo, "default: 1 on a CPU")
    demo.set_defaults(func=_cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with all subcommands."""
    parser = _Parser(
        prog="exactlr",
        description="A provably motivated constant learning rate for Adam: "
        "alpha = sqrt(2 L(w0) / (K_hat T)).",
    )
    parser.add_argument("--version", action="version", version=f"exactlr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_lr_command(sub)
    _add_run_command(sub)
    _add_other_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``exactlr`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with keep_freed_memory(), torchrun_session(enabled=args.func is _cmd_lr):
            return int(args.func(args) or 0)
    except (
        UsageError,
        ValueError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
    ) as e:
        # One line: multi-line messages (e.g. the list of searched paths) are joined.
        message = " ".join(str(e).split()) or type(e).__name__
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
