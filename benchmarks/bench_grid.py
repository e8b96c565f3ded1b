"""train_grid (K runs batched) against K sequential train_run calls.

The fig1-style comparison: 15 methods (ours, ours x 2, ours / 2, 5 constant LRs, 7
schedulers) from one w0, paper preset, float32, mini-MNIST capped to `--num-train` images
(full batch by default, like figs 1/2/6/9). For each model, repetitions are interleaved
(sequential, grid, sequential, grid, ...) and the median time ratio is printed, with the
largest relative difference of the final training losses (a sanity check, float32).
`--compare-vmap` also times the grid with its generic vmap path instead of the folded
layout (see `exactlr.paper.stacked._Stacked`), interleaved with the other two.

"metrics overhead": one grid epoch with metrics (step + full gradient + test pass, as
`train_grid` does it) against one bare training epoch (the same batched steps, no metrics;
full batch: one batched gradient + the K Adam steps).

Never asserts on time. Example:

    .venv/bin/python benchmarks/bench_grid.py --threads 1
    .venv/bin/python benchmarks/bench_grid.py --models lenet --num-train 5500 --epochs 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from exactlr.allocator import keep_freed_memory
from exactlr.data import ArrayDataset, load_dataset, make_batches
from exactlr.models import build_model
from exactlr.paper.grid import _full_pass, _Run, _set_grads, _stack, _Stacked, train_grid
from exactlr.paper.schedules import MethodSpec, method_specs
from exactlr.paper.training import TrainConfig, _optimizer_step, train_run


def fig1_methods(ours_lr: float) -> list[MethodSpec]:
    """schedulers + constants groups, deduplicated by name (15 methods)."""
    seen: dict[str, MethodSpec] = {}
    for spec in method_specs("schedulers", ours_lr) + method_specs("constants", ours_lr):
        seen.setdefault(spec.name, spec)
    return list(seen.values())


def _cap(train: ArrayDataset, n: int) -> ArrayDataset:
    return ArrayDataset(train.inputs[:n], train.targets[:n], train.num_classes, train.name)


@keep_freed_memory()  # as train_grid runs
def metrics_overhead(
    cfgs: list[TrainConfig],
    model: torch.nn.Module,
    train: ArrayDataset,
    test: ArrayDataset,
    reps: int = 5,
) -> tuple[float, float, float]:
    """Seconds of one bare batched epoch, of one epoch with metrics, and their ratio.

    Medians over ``reps`` alternating pairs after two warm-up epochs; the ratio is the
    median of the per-pair ratios.
    """
    device = torch.device("cpu")
    stacked_model = _Stacked(model, device)
    train = _cap(train, cfgs[0].num_train or len(train))
    batch_size = cfgs[0].batch_size or len(train)
    batches = make_batches(train, batch_size)
    test_batches = make_batches(test, batch_size if cfgs[0].batch_size else len(test))
    runs = []
    for cfg in cfgs:
        params = [p.clone().requires_grad_(True) for p in stacked_model.w0]
        runs.append(_Run(cfg, params, torch.optim.Adam(params, lr=cfg.method.lr), None, False))

    def bare_epoch() -> None:
        for x, y in batches:
            stacked = _stack(runs, stacked_model.names, grad=True)
            tensors = list(stacked.values())
            losses, _ = stacked_model(stacked, x, y)
            _set_grads(runs, torch.autograd.grad(losses.sum(), tensors))
            for run in runs:
                _optimizer_step(run.optimizer, run.params)

    def metrics_epoch() -> None:
        if cfgs[0].batch_size is None:  # the step reuses the last full gradient
            for run in runs:
                _optimizer_step(run.optimizer, run.params)
        else:
            bare_epoch()
        totals = _full_pass(stacked_model, runs, batches, with_grad=True)
        tested = _full_pass(stacked_model, runs, test_batches, with_grad=False)
        torch.stack([totals.loss_sum, tested.loss_sum]).tolist()

    bare_epoch()  # warm-up (also creates Adam's state)
    metrics_epoch()  # warm-up (grows the kept heap to its steady size)
    bare, full, tests = [], [], []
    for _ in range(reps):
        t = time.perf_counter()
        bare_epoch()
        bare.append(time.perf_counter() - t)
        t = time.perf_counter()
        metrics_epoch()
        full.append(time.perf_counter() - t)
        t = time.perf_counter()
        _full_pass(stacked_model, runs, test_batches, with_grad=False).loss_sum.tolist()
        tests.append(time.perf_counter() - t)
    ratio = statistics.median(f / b for f, b in zip(full, bare, strict=True))
    test = statistics.median(tests)
    print(
        f"  bare epochs {min(bare):.2f}-{max(bare):.2f} s, metrics epochs "
        f"{min(full):.2f}-{max(full):.2f} s; the test pass alone (the metrics' extra at full "
        f"batch) {test:.2f} s = {test / statistics.median(bare):.2f} of a median bare epoch",
        flush=True,
    )
    return statistics.median(bare), statistics.median(full), ratio


def bench_model(name: str, args: argparse.Namespace, train, test) -> None:
    model = build_model(name, dataset="mnist", generator=torch.Generator().manual_seed(0))
    methods = fig1_methods(args.ours_lr)
    cfgs = [
        TrainConfig(
            "mnist",
            "mini",
            name,
            m,
            epochs=args.epochs,
            batch_size=args.batch_size,
            num_train=args.num_train,
        )
        for m in methods
    ]
    if not args.metrics_only:
        time_grid(name, cfgs, model, train, test, args)
    if args.metrics_reps == 0:
        return
    bare, full, ratio = metrics_overhead(cfgs, model, train, test, args.metrics_reps)
    print(
        f"metrics overhead ({name}): grid epoch with metrics {full:.2f} s  "
        f"bare training epoch {bare:.2f} s  ratio {ratio:.2f} (median of "
        f"{args.metrics_reps} pairs)",
        flush=True,
    )


def time_grid(name: str, cfgs: list[TrainConfig], model, train, test, args) -> None:  # type: ignore[no-untyped-def]
    """Interleaved sequential / grid (/ vmap) timings; prints the summary lines."""
    seq_times, grid_times, ratios, vmap_times = [], [], [], []
    worst = 0.0
    for rep in range(args.reps):
        t = time.perf_counter()
        seq = [train_run(cfg, model, train, test) for cfg in cfgs]
        seq_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        grid = train_grid(cfgs, model, train, test)
        grid_times.append(time.perf_counter() - t)
        ratios.append(seq_times[-1] / grid_times[-1])
        extra = ""
        if args.compare_vmap:
            t = time.perf_counter()
            train_grid(cfgs, model, train, test, fold=False)
            vmap_times.append(time.perf_counter() - t)
            extra = f"  grid (vmap path) {vmap_times[-1]:.1f} s"
        print(
            f"  rep {rep}: sequential {seq_times[-1]:.1f} s  grid {grid_times[-1]:.1f} s  "
            f"ratio {ratios[-1]:.2f}x{extra}",
            flush=True,
        )
        for a, b in zip(seq, grid, strict=True):
            x, y = a.metrics[-1].train_loss, b.metrics[-1].train_loss
            if a.diverged_at is None and b.diverged_at is None:
                worst = max(worst, abs(x - y) / abs(x))
    batch = "full batch" if args.batch_size is None else f"batch {args.batch_size}"
    print(
        f"grid vs sequential ({name}, {len(cfgs)} runs, {args.num_train} images, {batch}, "
        f"{args.epochs} epochs): sequential {statistics.median(seq_times):.1f} s  "
        f"grid {statistics.median(grid_times):.1f} s  ratio {statistics.median(ratios):.2f}x  "
        f"(median of {args.reps}; max rel. diff. of final train loss {worst:.1e})",
        flush=True,
    )
    if vmap_times:
        vmap, folded = statistics.median(vmap_times), statistics.median(grid_times)
        print(
            f"grid, vmap path ({name}): {vmap:.1f} s; folded layout {folded:.1f} s: folded "
            f"{vmap / folded:.2f}x faster; sequential / vmap "
            f"{statistics.median(seq_times) / vmap:.2f}x",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet,fc3x1000", help="comma-separated names")
    parser.add_argument("--num-train", type=int, default=2000, help="training images")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="default: full batch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=2, help="interleaved repetitions")
    parser.add_argument("--ours-lr", type=float, default=0.045)
    parser.add_argument(
        "--compare-vmap", action="store_true", help="also time the grid's vmap path"
    )
    parser.add_argument(
        "--metrics-reps", type=int, default=5, help="metrics overhead pairs (0: skip)"
    )
    parser.add_argument(
        "--metrics-only", action="store_true", help="only the metrics overhead, no timing runs"
    )
    parser.add_argument(
        "--data-dir",
        default=os.environ.get(
            "EXACTLR_DATA", str(Path(__file__).resolve().parents[2] / "shared/data")
        ),
    )
    args = parser.parse_args()
    if args.metrics_reps < 0 or (args.metrics_only and args.metrics_reps == 0):
        parser.error(f"--metrics-reps {args.metrics_reps}: use 0 (skip) or a positive count")
    torch.set_num_threads(args.threads)
    train, test = load_dataset("mnist", subset="mini", data_dir=args.data_dir)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
        f"mini-MNIST train capped to {args.num_train}, test {len(test)}",
        flush=True,
    )
    for name in args.models.split(","):
        bench_model(name.strip(), args, train, test)


if __name__ == "__main__":
    main()
