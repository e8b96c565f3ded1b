"""``exactlr lr``: the step size for a built-in model or the user's own code.

:func:`add_parser` declares the command's arguments, :func:`run` carries it out.

The model is a built-in name (``fc3x1000``, ``lenet``, ``vgg9``) or a spec of the
user's factory, ``pkg.module:factory`` or ``path/to/file.py:factory``
(:mod:`exactlr.userspec`): ``factory()`` returns a freshly initialised model, so it is
also Algorithm 2's ``make_model`` (one call per weight sample, seeded). The data are a
built-in dataset or ``--data pkg.module:loader``, where ``loader()`` returns the
training batches as ``(inputs, targets)`` pairs (a list or a DataLoader; one epoch).
The loss is cross-entropy, and ``T = epochs x batches per epoch``.

``--k-hat X`` reuses a measured ``K_hat`` (only ``L(w0)`` is measured: one forward pass),
``--check K`` runs the safety check (:mod:`exactlr.check`), ``--plot FILE`` draws the
per-sample norms and their running maximum.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from exactlr.check import CheckReport, check_step_size
from exactlr.cliargs import (
    add_common_data_args,
    batch_size_arg,
    epochs_arg,
    non_negative_int,
    positive_float,
    positive_int,
    screen_arg,
    subsample_arg,
    tol_arg,
)
from exactlr.curvature import SpectralOptions, full_loss, materialize_batches
from exactlr.curvature.distributed import is_rank_zero, shard_batches
from exactlr.data import load_dataset, make_batches
from exactlr.models import build_model
from exactlr.sampleplot import draw_samples
from exactlr.smoothness import SmoothnessEstimate
from exactlr.stepsize import LRSuggestion, exact_step_size, suggest_lr
from exactlr.userspec import load_callable


@dataclass
class _Inputs:
    """What the command measures: the model, its samples, the data, and their names."""

    model: nn.Module
    make_model: Callable[[], nn.Module] | None
    batches: list[Any]
    model_name: str
    data_name: str
    num_train: int | None


def _is_spec(text: str) -> bool:
    return ":" in text or text.endswith(".py")


def _user_model(spec: str, seed: int) -> tuple[nn.Module, Callable[[], nn.Module]]:
    factory = load_callable(spec, what="--model")

    def make() -> nn.Module:
        model = factory()
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"--model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module; "
                "the factory must return a freshly initialised model"
            )
        return model

    # The model to train is the factory's draw under --seed; the global RNG is kept.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
    return model, make


def _user_batches(spec: str) -> list[Any]:
    loader = load_callable(spec, what="--data")
    try:
        produced = loader()
    except TypeError as err:
        raise ValueError(
            f"--data {spec!r}: loader() must take no arguments and return an iterable of "
            f"(inputs, targets) batches ({err})"
        ) from None
    batches = list(produced)
    if not batches:
        raise ValueError(f"--data {spec!r} returned no batches; it must yield at least one")
    return batches


def _inputs(args: argparse.Namespace, device: torch.device) -> _Inputs:
    if args.data is not None:
        given = [f"--{n}" for n in ("dataset", "subset", "batch_size") if getattr(args, n)]
        if given:
            raise ValueError(
                f"--data gives the batches; drop {', '.join(g.replace('_', '-') for g in given)}"
            )
    user_model = _is_spec(args.model)
    if user_model and args.init is not None:
        raise ValueError("--init applies to built-in models; your factory initialises its model")
    dataset = args.dataset or "synthetic"
    num_train = None
    if args.data is not None:
        batches, data_name = _user_batches(args.data), args.data
    else:
        train, _ = load_dataset(
            dataset, subset=args.subset or "mini", data_dir=args.data_dir, seed=args.seed
        )
        batches = make_batches(train.to(device), args.batch_size)
        num_train = len(train)
        data_name = f"{dataset}/{args.subset or 'mini'}"
    if user_model:
        model, make_model = _user_model(args.model, args.seed)
        name = args.model
    else:
        generator = torch.Generator().manual_seed(args.seed)
        init = args.init or "paper"
        model = build_model(args.model, dataset=dataset, init=init, generator=generator)
        make_model, name = None, f"{args.model} ({init} init)"
    return _Inputs(model, make_model, batches, name, data_name, num_train)


def _probe(inputs: _Inputs, device: torch.device) -> None:
    """One loss evaluation on the first batch: a model that does not fit the data is a
    one-line error naming both, not a traceback from deep inside the estimation."""
    batch = materialize_batches(inputs.batches[:1], device)[0]
    try:
        with torch.no_grad():
            F.cross_entropy(inputs.model(batch[0]), batch[1])
    except (RuntimeError, TypeError, IndexError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(
            f"model {inputs.model_name} cannot compute the cross-entropy of the first batch "
            f"of {inputs.data_name} ({type(err).__name__}: {message}); check that the model's "
            "inputs and outputs fit the data"
        ) from err


def _given_k_hat(inputs: _Inputs, args: argparse.Namespace, device: torch.device) -> LRSuggestion:
    """The rule with a K_hat measured before: only L(w0) (and the check) is computed."""
    total_steps = args.epochs * len(inputs.batches)
    data = materialize_batches(inputs.batches, device)
    initial_loss = full_loss(inputs.model, F.cross_entropy, data)
    lr = exact_step_size(initial_loss, args.k_hat, total_steps)
    check = None
    if args.check:
        check = check_step_size(
            inputs.model,
            F.cross_entropy,
            data,
            lr=lr,
            k_hat=args.k_hat,
            steps=args.check,
            initial_loss=initial_loss,
            total_steps=total_steps,
            generator=torch.Generator().manual_seed(args.seed),
        )
    estimate = SmoothnessEstimate(k_hat=args.k_hat, samples=[], records=[], running_max=[])
    return LRSuggestion(lr, args.k_hat, initial_loss, total_steps, estimate, check)


def _check_plot_path(text: str | None, k_hat: float | None) -> None:
    if text is None:
        return
    if k_hat is not None:
        raise ValueError("--plot draws the K_hat samples; with --k-hat there are none to draw")
    path = Path(text)
    if path.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise ValueError(f"--plot {text}: name a .png, .pdf or .svg file")
    if path.is_dir() or not path.parent.is_dir():
        raise ValueError(f"--plot {text}: not a file in an existing folder; choose one")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(
            "--plot needs matplotlib: pip install matplotlib (or exactlr[experiments])"
        ) from None


def plot_samples(suggestion: LRSuggestion, path: str | Path) -> Path:
    """Draws the per-sample Hessian norms and their running maximum (K_hat) to ``path``.

    Args:
        suggestion: A result of :func:`exactlr.suggest_lr`.
        path: The image file; its suffix sets the format.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    est = suggestion.estimate
    index = list(range(1, len(est.samples) + 1))
    fig, ax = plt.subplots(figsize=(5, 3.6))
    try:
        draw_samples(ax, est.samples, [r.certified for r in est.records])
        ax.step(index, est.running_max, where="post", color="black", label="running max")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("weight sample j")
        ax.set_ylabel("Hessian spectral norm")
        ax.set_title(
            f"K_hat = {suggestion.k_hat:.4g}, L(w0) = {suggestion.initial_loss:.4g}, "
            f"T = {suggestion.total_steps}, lr = {suggestion.lr:.3g}",
            fontsize=8,
        )
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return Path(path)


def _check_payload(check: CheckReport | None) -> dict[str, Any] | None:
    if check is None:
        return None
    payload = asdict(check)
    payload["step_losses"] = list(check.step_losses)
    payload.update(
        loss_change=check.loss_change,
        stability_threshold=check.stability_threshold,
        passed=check.passed,
    )
    # JSON has no inf/NaN: a diverged check reports them as null.
    return {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in payload.items()
    }


def _print_text(s: LRSuggestion, inputs: _Inputs, args: argparse.Namespace, device: Any) -> None:
    size = f" ({inputs.num_train} samples)" if inputs.num_train is not None else ""
    print(
        f"model {inputs.model_name}, data {inputs.data_name}{size}, "
        f"{len(inputs.batches)} batch(es) per epoch, device {device}"
    )
    est = s.estimate
    if args.k_hat is None:
        started = any(r.subsample_hvps for r in est.records)
        sub = "  HVPs on a subsample" if started else ""
        print(f"  sample  ||H||_2       lambda_max    lambda_min    HVPs  seconds  certified{sub}")
        for r in est.records:
            extra = f"  {r.subsample_hvps:>20}" if started else ""
            print(
                f"  {r.index:>6}  {r.value:<12.6g}  {r.lambda_max:<12.6g}  {r.lambda_min:<12.6g}"
                f"  {r.num_hvps:>4}  {r.seconds:7.2f}  {r.certified:<9}{extra}"
            )
        if any(r.certified == "screened" for r in est.records):
            print(
                "  screened: the subsample's norm, below --screen x K_hat (no full-data "
                "product); ceiling: a lower estimate, below the max before it"
            )
        stop = ", adaptive stop" if est.stopped_early else ""
        print(f"K_hat  = {s.k_hat:.6g}  (max over {len(est.samples)} samples{stop})")
    else:
        print(f"K_hat  = {s.k_hat:.6g}  (given with --k-hat)")
    print(f"L(w0)  = {s.initial_loss:.6g}")
    print(f"T      = {s.total_steps}  ({args.epochs} epochs x {len(inputs.batches)} steps)")
    print(f"lr     = sqrt(2 L(w0) / (K_hat T)) = {s.lr:.6g}")
    if s.check is not None:
        print(s.check.summary())
        print(f"warning: {s.warning}" if s.warning else "check passed")


def add_parser(sub: Any, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """Adds ``exactlr lr`` and its arguments to the subcommands ``sub``.

    Args:
        sub: The ``add_subparsers()`` object of the ``exactlr`` parser.
        func: The command's handler, stored as the parsed arguments' ``func``.

    Returns:
        The ``lr`` parser.
    """
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
    lr.add_argument("--epochs", type=epochs_arg, default=100)
    lr.add_argument("--batch-size", type=batch_size_arg, default=None, metavar="full|N")
    lr.add_argument("--samples", type=positive_int, default=10, help="weight samples N")
    lr.add_argument("--variant", default="full", choices=["full", "minibatch"])
    lr.add_argument("--method", default="lanczos", choices=["lanczos", "power"])
    lr.add_argument(
        "--tol",
        type=tol_arg,
        default=None,
        help="relative accuracy in (0, 1) of each sample's spectral norm (default: the "
        "step size's, exactlr.smoothness.LR_TOL; see docs/performance.md)",
    )
    lr.add_argument(
        "--subsample",
        type=subsample_arg,
        default="auto",
        metavar="SHARE",
        help="start each sample's Lanczos on the Hessian of this share of the data (e.g. "
        "0.1), then finish on all of it to --tol: fewer full-data products (with the "
        "minibatch variant: a share of each batch; a share needs --method lanczos). "
        "Default auto: 5%% of 2,000 examples or more (at least 200), none below; none: "
        "a random start",
    )
    lr.add_argument(
        "--screen",
        type=screen_arg,
        default=0.5,
        metavar="SHARE",
        help="with a subsample start and a fixed N: solve every sample on the subsample "
        "first, then on all the data in decreasing order of that norm, skipping the "
        "samples whose subsample norm is below SHARE x the largest full-data norm so far "
        "(their rows say 'screened'). Default 0.5; none: every sample on all the data, in "
        "draw order (see docs/performance.md)",
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
    lr.set_defaults(func=func)
    return lr


def run(args: argparse.Namespace, device: torch.device) -> int:
    """The ``exactlr lr`` command on ``device``; returns the exit status.

    Raises:
        ValueError: Input the user can fix (the CLI prints it as one line, exit 2).
    """

    if args.subsample not in (None, "auto") and args.method != "lanczos":
        raise ValueError(
            f"--subsample {args.subsample:g} needs --method lanczos (got --method "
            f"{args.method}); drop --subsample or use lanczos"
        )
    _check_plot_path(args.plot, args.k_hat)
    inputs = _inputs(args, device)
    inputs.model = inputs.model.to(device)
    _probe(inputs, device)
    if args.k_hat is not None:
        suggestion = _given_k_hat(inputs, args, device)
    else:
        make_model = inputs.make_model
        if make_model is not None:
            factory = make_model

            def make_model() -> nn.Module:
                return factory().to(device)

        # Under torchrun: this process's share of the data (all of it with --parallel samples).
        shard = inputs.batches
        if args.parallel == "data":
            shard = shard_batches(inputs.batches, inputs.model)
        suggestion = suggest_lr(
            inputs.model,
            F.cross_entropy,
            shard,
            total_steps=args.epochs * len(inputs.batches),
            make_model=make_model,
            num_samples=args.samples,
            generator=torch.Generator().manual_seed(args.seed),
            progress=not args.quiet and not args.json,
            check_steps=args.check,
            variant=args.variant,
            patience=args.patience,
            options=SpectralOptions(
                method=args.method, tol=args.tol, subsample=args.subsample, screen=args.screen
            ),
            parallel=args.parallel,
        )
    if args.plot is not None and is_rank_zero():
        plot_samples(suggestion, args.plot)
    if args.json:
        _print_json(suggestion, inputs, args)
    else:
        _print_text(suggestion, inputs, args, device)
        if args.plot is not None:
            print(f"plot   : {args.plot}")
    return 0


def _print_json(s: LRSuggestion, inputs: _Inputs, args: argparse.Namespace) -> None:
    est = s.estimate
    payload = {
        "lr": s.lr,
        "k_hat": s.k_hat,
        "k_hat_given": args.k_hat is not None,
        "initial_loss": s.initial_loss,
        "total_steps": s.total_steps,
        "epochs": args.epochs,
        "batches_per_epoch": len(inputs.batches),
        "model": args.model,
        "dataset": args.data if args.data is not None else (args.dataset or "synthetic"),
        "subset": None if args.data is not None else (args.subset or "mini"),
        "num_train": inputs.num_train,
        "variant": est.variant,
        "stopped_early": est.stopped_early,
        "samples": [r.__dict__ for r in est.records],
        "check": _check_payload(s.check),
        "warning": s.warning,
        "plot": args.plot,
    }
    print(json.dumps(payload, indent=2))
