"""Measures the cost model's inputs (exactlr.paper.estimate) for one figure's setting.

Runs the figure's ours run for ``--epochs`` epochs through ``train_run`` (per-epoch
metrics included, as the figures log them) and one K_hat weight sample (Lanczos, the
full-data Hessian, as the harness estimates it), then prints the wall and CPU seconds,
the load average, and the seconds per image in the units of the cost model:
``grad_image_s`` = epoch seconds / (2 n_train + n_test / 3) and ``hvp_image_s`` = sample
seconds / (products x n_train). On a shared machine the wall time depends on the load;
CPU seconds / threads estimates what an unloaded machine would take.

    python benchmarks/time_epoch.py fig10 --scale cpu
    python benchmarks/time_epoch.py fig6 --scale paper --epochs 2 --no-khat
    python benchmarks/time_epoch.py fig10 --scale cpu --no-train --max-iters 3 --images 250
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch
import torch.nn.functional as F

from exactlr.data import make_batches
from exactlr.paper.planning import resolve_figure
from exactlr.paper.runner import _build_w0, _load_data
from exactlr.paper.scales import parse_scale
from exactlr.paper.training import train_run
from exactlr.stepsize import suggest_lr


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _report(what: str, start: tuple[float, float], units: float) -> None:
    wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
    threads = torch.get_num_threads()
    load = os.getloadavg()[0]
    print(
        f"{what}: wall {wall:.1f} s, cpu {cpu:.1f} s ({threads} threads, load {load:.1f}); "
        f"per unit: wall {wall / units:.3g} s, cpu/threads {cpu / threads / units:.3g} s",
        flush=True,
    )


def main() -> None:
    """Parses the arguments and prints the measurements."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("figure")
    parser.add_argument("--scale", default="cpu")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--no-khat", action="store_true")
    parser.add_argument(
        "--max-iters",
        type=int,
        default=None,
        help="cap the K_hat sample's Lanczos products (prices a product without running "
        "the sample to convergence)",
    )
    parser.add_argument("--no-train", action="store_true", help="K_hat sample only")
    parser.add_argument(
        "--images", type=int, default=None, help="cap the training images (per-image costs)"
    )
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    scale = parse_scale(args.scale)
    plan = next(p for p in resolve_figure(args.figure, scale) if p.method == "ours")
    cfg = dataclasses.replace(plan.resolve(0.001), epochs=args.epochs)
    if args.images is not None:
        cfg = dataclasses.replace(cfg, num_train=args.images)
    train, test = _load_data(cfg, args.data_dir, scale)
    n_train, n_test = len(train), len(test)
    print(f"{cfg.model} on {cfg.dataset}/{cfg.subset}: {n_train} train, {n_test} test, "
          f"batch {cfg.batch_size or 'full'}", flush=True)  # fmt: skip
    model = _build_w0(cfg)
    if not args.no_train:
        start = _clock()
        train_run(cfg, model, train, test)
        # Epoch 0's metrics (a gradient and a test pass at w0), then per epoch a training
        # pass and the metrics again.
        _report(
            f"{args.epochs} epoch(s), metrics included (unit: grad-image)",
            start,
            args.epochs * (2 * n_train + n_test / 3) + n_train + n_test / 3,
        )
    if args.no_khat:
        return
    batches = make_batches(train, cfg.batch_size)
    start = _clock()
    suggestion = suggest_lr(
        model,
        F.cross_entropy,
        batches,
        total_steps=cfg.total_steps(n_train),
        num_samples=1,
        generator=torch.Generator().manual_seed(1),
        options=dataclasses.replace(
            scale.spectral_options, max_iters=args.max_iters or scale.spectral_options.max_iters
        ),
    )
    hvps = suggestion.estimate.records[0].num_hvps
    _report(f"one K_hat sample, {hvps} products (unit: hvp-image)", start, hvps * n_train)


if __name__ == "__main__":
    main()
