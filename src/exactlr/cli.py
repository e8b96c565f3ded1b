"""The ``exactlr`` command.

Every subcommand is a ``_cmd_<name>(args) -> int`` function registered in
:func:`build_parser` (the ``lr`` arguments are declared in :mod:`exactlr.lr_command`).
Errors the user can fix (bad values, missing data) are reported as one line on stderr
with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from exactlr import lr_command
from exactlr._version import __version__
from exactlr.allocator import keep_freed_memory
from exactlr.cliargs import (  # noqa: F401 - argument types, re-exported
    EXIT_USAGE,
    MAX_EPOCHS,
    MAX_SEED,
    UsageError,
    _Parser,
    add_common_data_args,
    batch_size_arg,
    epochs_arg,
    methods_arg,
    model_arg,
    non_negative_int,
    positive_float,
    positive_int,
    resolve_device,
    seed_arg,
    seeds_arg,
    share_arg,
    speed_arg,
    tol_arg,
)
from exactlr.curvature.distributed import rank_device, torchrun_session
from exactlr.paper import ray_executor
from exactlr.paper.campaign import all_jobs, pick_scale
from exactlr.paper.estimate import device_speed, estimate_jobs, format_estimate
from exactlr.paper.figures import get_figure, list_figures
from exactlr.paper.report import figure_report, format_markdown
from exactlr.paper.runner import run_figure
from exactlr.paper.scales import Scale, parse_scale
from exactlr.paper.seeds import write_seeds_report
from exactlr.paper.stopping import Interrupted, handle_signals
from exactlr.paper.store import (
    check_out_dir,
    manifest_path,
    report_path,
    write_json_atomic,
    write_text_atomic,
)

# --------------------------------------------------------------------------------------
# exactlr lr
# --------------------------------------------------------------------------------------


def _cmd_lr(args: argparse.Namespace) -> int:
    if ":" not in args.model:
        try:
            model_arg(args.model)
        except argparse.ArgumentTypeError as err:
            raise UsageError(f"--model: {err}") from None
    args.data_dir = _data_dir(args.data_dir)
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


def _no_results(
    figure: str, scale: str, out: Path, seed: int = 0, seeds: Sequence[int] = ()
) -> None:
    """Raises `UsageError` when `out` holds no result of `figure` at `scale` (and
    base seed `seed`, one of `seeds`)."""
    if not manifest_path(out, figure, scale, seed).is_file():
        listed = f" --seeds {','.join(map(str, seeds))}" if seeds else ""
        raise UsageError(
            f"no results of {figure} at scale {scale}{f' with seed {seed}' if seed else ''} "
            f"in {out}; run `exactlr run {figure} --scale {scale} --out {out}{listed}` first"
        )


def _check_figure(name: str, scale: str | None = None) -> None:
    """Raises `UsageError` for an unknown figure or scale."""
    try:
        get_figure(name)
        if scale is not None:
            parse_scale(scale)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _ray_runner(args: argparse.Namespace) -> Any:
    """The Ray executor's runner, or a one-line `UsageError` (Ray missing, checkpoints
    asked for, an unreachable cluster)."""
    if args.executor != "ray":
        for flag, value in (("--address", args.address), ("--ray-timeout", args.ray_timeout)):
            if value is not None:
                raise UsageError(f"{flag} is only used with --executor ray")
        return None
    if args.checkpoint_every:
        raise UsageError(
            f"--checkpoint-every {args.checkpoint_every} needs --executor local: Ray runs "
            "train in temporary folders on the workers, so no checkpoint outlives them"
        )
    if not ray_executor.ray_available():
        raise UsageError(
            "--executor ray needs Ray, which is not installed: pip install 'ray>=2.9' "
            "(or exactlr[ray]); or use --executor local"
        )
    timeout = args.ray_timeout if args.ray_timeout is not None else 30.0
    try:
        return ray_executor.ray_runner(args.address, connect_timeout=timeout)
    except ConnectionError as err:
        raise UsageError(f"--address: {err} (--ray-timeout sets the wait)") from None


def _data_dir(text: str | None) -> str | None:
    """``--data-dir``: when given, an existing folder (never silently replaced)."""
    if text is not None and not Path(text).expanduser().is_dir():
        what = "is a file" if Path(text).expanduser().exists() else "does not exist"
        raise UsageError(f"--data-dir {text} {what}; give a folder holding MNIST/ or cifar-10")
    return text


def _num_threads(args: argparse.Namespace, scale: Scale, device: torch.device) -> int | None:
    """``--threads``, else the scale's default on a CPU (one thread at smoke scale)."""
    if args.threads is not None:
        return args.threads
    return scale.num_threads if device.type == "cpu" else None


def _print_estimate(args: argparse.Namespace, jobs: list[tuple[str, int]]) -> None:
    speed, source = device_speed(args.device, args.speed)
    out = Path(args.out)
    est = estimate_jobs(
        jobs,
        args.scale,
        out_dir=out if out.is_dir() else None,
        data_dir=args.data_dir,
        speed=speed,
    )
    print(format_estimate(est, f"{args.device} (speed: {source})"), flush=True)


def _cmd_run(args: argparse.Namespace) -> int:
    _check_figure("fig1" if args.figure == "all" else args.figure, args.scale)
    if args.figure == "all":
        jobs = all_jobs(args.seeds)
    else:
        jobs = [(args.figure, seed) for seed in args.seeds or (args.seed,)]
    if args.dry_run:  # planning a GPU run elsewhere needs no GPU here
        _print_estimate(args, jobs)
        return 0
    data_dir = _data_dir(args.data_dir)
    device = resolve_device(args.device)
    if args.figure == "all":
        _print_estimate(args, jobs)
    out = _out_dir(args.out, create=True)
    start = time.perf_counter()
    count = sum(_run_one(args, figure, seed, out, device, data_dir) for figure, seed in jobs)
    figures = list(dict.fromkeys(f for f, _ in jobs))
    seeds = sorted({s for _, s in jobs})
    print(
        f"{', '.join(figures)} ({args.scale}, seeds {','.join(map(str, seeds))}): {count} "
        f"runs in {out}/runs ({time.perf_counter() - start:.1f} s); next: exactlr report "
        f"FIG --scale {args.scale} --out {out}"
        + (f" --seeds {','.join(map(str, seeds))}" if len(seeds) > 1 else "")
    )
    return 0


def _run_one(
    args: argparse.Namespace,
    figure: str,
    seed: int,
    out: Path,
    device: torch.device,
    data_dir: str | None,
) -> int:
    """Runs (or resumes) one figure at one base seed; returns its number of runs."""
    runner = _ray_runner(args)
    try:
        paths = run_figure(
            figure,
            scale=args.scale,
            out_dir=out,
            device=device,
            seed=seed,
            data_dir=data_dir,
            progress=not args.quiet,
            epochs=args.epochs,
            checkpoint_every=args.checkpoint_every,
            runner=runner,
            methods=args.methods,
            curvature_every=args.curvature_every,
            num_threads=_num_threads(args, Scale(args.scale), device),
        )  # with Ray, run_figure also waits for the runs
    finally:
        if runner is not None:
            runner.close()
    return len(paths)


def _scale_of(args: argparse.Namespace, out: Path) -> str:
    """``--scale``, else the one scale of the figure's results in ``out``."""
    if args.scale is None:
        try:
            args.scale = pick_scale(out, args.figure)
        except ValueError as err:
            raise UsageError(str(err)) from None
    return args.scale


def _cmd_plot(args: argparse.Namespace) -> int:
    # matplotlib is an optional extra: imported only to plot.
    from exactlr.paper.plotting import plot_figure, plot_sharpness, plot_smoothness

    _check_figure(args.figure, args.scale)
    out = _out_dir(args.out)
    _scale_of(args, out)
    _no_results(args.figure, args.scale, out)
    paths = plot_figure(args.figure, out_dir=out, scale=args.scale)
    with contextlib.suppress(FileNotFoundError):  # runs made elsewhere may lack the cache
        paths += plot_smoothness(args.figure, out_dir=out, scale=args.scale)
    with contextlib.suppress(FileNotFoundError):  # only runs with --curvature-every
        paths += plot_sharpness(args.figure, out_dir=out, scale=args.scale)
    for path in paths:
        print(path)
    return 0


def _write_report(figure: str, scale: str, out: Path, seed: int = 0) -> tuple[dict, str, Path]:
    report = figure_report(figure, out_dir=out, scale=scale, seed=seed)
    text = format_markdown(report)
    md_path = report_path(out, figure, scale, seed)
    write_text_atomic(md_path, text)
    write_json_atomic(md_path.with_suffix(".json"), report)
    return report, text, md_path


def _cmd_report(args: argparse.Namespace) -> int:
    _check_figure(args.figure, args.scale)
    out = _out_dir(args.out)
    _scale_of(args, out)
    if args.seeds is not None and args.seeds != (0,):
        for seed in args.seeds:
            _no_results(args.figure, args.scale, out, seed, args.seeds)
            _write_report(args.figure, args.scale, out, seed)
        report, text = write_seeds_report(
            args.figure, out_dir=out, scale=args.scale, seeds=args.seeds
        )
    else:
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


def _add_run_command(sub: Any) -> None:
    """``exactlr run``."""
    scales = "smoke (seconds, plumbing only), cpu (reduced, laptop) or paper (full size)"
    run = sub.add_parser("run", help="run (or resume) the runs of one of the paper's figures")
    run.add_argument(
        "figure",
        help="fig1 .. fig16, init or demo (see `exactlr list`); all: every figure, with "
        "fig1 and fig6 also on seeds 1 and 2 (its time is estimated first)",
    )
    run.add_argument("--scale", default="cpu", help=scales)
    run.add_argument("--out", default="results", help="results folder (default: results)")
    run.add_argument(
        "--seeds",
        type=seeds_arg,
        default=None,
        metavar="LIST",
        help="base seeds, e.g. 0,1,2: the figure once per seed, each drawing its own data "
        "subset and w0 (default: --seed); `exactlr report --seeds` aggregates them",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="list the runs and the estimated time (what OUT already holds counts as "
        "done), run nothing",
    )
    run.add_argument(
        "--speed",
        type=speed_arg,
        default=None,
        metavar="X|auto",
        help="for the estimate: how many times faster this device is than the reference "
        "machine (2 CPU cores); auto: measure it (default on a GPU; else 1)",
    )
    run.add_argument("--epochs", type=epochs_arg, default=None, help=argparse.SUPPRESS)
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
    run.add_argument(
        "--ray-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --address HOST:PORT: seconds to wait for the cluster to answer (default 30)",
    )
    add_common_data_args(run)
    _add_threads_arg(run, "default: 1 at smoke scale on a CPU, else torch's default")
    run.set_defaults(func=_cmd_run)


def _add_other_commands(sub: Any) -> None:
    """``exactlr plot``, ``report``, ``list`` and ``demo``."""
    scales = "smoke (seconds, plumbing only), cpu (reduced, laptop) or paper (full size)"
    scales += "; default: the one scale OUT holds"
    plot = sub.add_parser("plot", help="draw a figure from its result files")
    plot.add_argument("figure")
    plot.add_argument("--out", default="results", help="results folder (default: results)")
    plot.add_argument("--scale", default=None, help=scales)
    plot.set_defaults(func=_cmd_plot)

    report = sub.add_parser("report", help="verdict table of a figure from its result files")
    report.add_argument("figure")
    report.add_argument("--out", default="results", help="results folder (default: results)")
    report.add_argument("--scale", default=None, help=scales)
    report.add_argument("--format", default="md", choices=["md", "json"])
    report.add_argument(
        "--seeds",
        type=seeds_arg,
        default=None,
        metavar="LIST",
        help="base seeds to aggregate, e.g. 0,1,2 (median and range of each method's "
        "final gradient norm, how often ours ends lowest; also written as "
        "reports/FIG-SCALE-seeds.md); default: seed 0 alone",
    )
    report.set_defaults(func=_cmd_report)

    lister = sub.add_parser("list", help="the figures and scales")
    lister.set_defaults(func=_cmd_list)

    demo = sub.add_parser(
        "demo", help="ours vs schedulers and constant LRs on built-in synthetic data (~1 min)"
    )
    demo.add_argument("--out", default="results/demo", help="results folder")
    demo.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    demo.add_argument("--seed", type=seed_arg, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--epochs", type=epochs_arg, default=None, help=argparse.SUPPRESS)
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

    lr_command.add_parser(sub, _cmd_lr)
    _add_run_command(sub)
    _add_other_commands(sub)
    return parser


@contextlib.contextmanager
def _messages() -> Iterator[None]:
    """Prints the library's log lines (``exactlr`` logger, INFO and up) on stdout."""
    logger = logging.getLogger("exactlr")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("exactlr: %(message)s"))
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def _error(message: str) -> int:
    """Prints one line on stderr; returns the usage exit status."""
    print(f"exactlr: error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``exactlr`` command; returns the exit status.

    Every error the user can act on is one line on stderr with exit status 2. SIGINT and
    SIGTERM stop the command (a run with checkpoints first finishes its epoch and writes
    a checkpoint; a second signal stops at once) with status 130 / 143; finished result
    files are kept and a rerun resumes.
    """
    try:
        with handle_signals():
            parser = build_parser()
            args = parser.parse_args(argv)
            lr = args.func is _cmd_lr
            with keep_freed_memory(), _messages(), torchrun_session(enabled=lr):
                return int(args.func(args) or 0)
    except (UsageError, ValueError, OverflowError) as e:
        # One line: multi-line messages (e.g. the list of searched paths) are joined.
        return _error(str(e) or type(e).__name__)
    except OSError as e:  # missing files, a full disk, a file size limit, no connection
        return _error(str(e) or type(e).__name__)
    except MemoryError:
        return _error("not enough memory for this model or data; choose a smaller one")
    except (Interrupted, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        name = signal.Signals(signum).name
        print(
            f"exactlr: interrupted ({name}); finished results and checkpoints are kept, "
            "rerun to resume",
            file=sys.stderr,
        )
        return 128 + signum


def _entry() -> None:  # pragma: no cover
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    _entry()
