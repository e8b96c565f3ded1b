"""Benchmark: what keeping freed memory (exactlr.allocator) buys, side by side in one run.

Every measurement runs in a fresh Python process (glibc's malloc state cannot be reset
inside one), repetitions interleaved, in three allocator states:

* ``default``: glibc as a fresh process has it (dynamic mmap/trim thresholds; freed
  large blocks are unmapped and page-faulted in again). exactlr never calls ``mallopt``
  here (``EXACTLR_KEEP_FREED_MEMORY=0``).
* ``after``: glibc as :func:`exactlr.allocator.keep_freed_memory` leaves it on exit (mmap
  on again, thresholds fixed at 32 MiB / 64 MiB: see :mod:`exactlr.allocator`); this is
  what other code in the same process gets afterwards.
* ``kept``: inside :func:`exactlr.allocator.keep_freed_memory` (what the ``exactlr``
  command runs under).

Workloads (paper preset, seed 0, mini-MNIST, float32):

* ``hvp``: ``--products`` ``"reverse"``-mode Hessian-vector products of the full-batch
  loss, after the graph is built and one product (the inner loop of every curvature
  routine); seconds and minor page faults per product.
* ``train``: one ``train_run`` (full batch, ``--epochs`` epochs, Adam at 1e-3, per-epoch
  metrics as the figures log them); also the resident memory after each epoch (kept
  memory must level off, not grow with the epochs). Every measurement also reports the
  process's peak resident memory (``ru_maxrss``; the process is fresh, so it is this
  workload's), the price of keeping freed blocks.

Prints the medians and the ratios ``default / kept`` and ``after / kept``. Results are
bitwise the same in every state (tests/test_allocator.py); only time changes.

    python benchmarks/bench_allocator.py
    python benchmarks/bench_allocator.py --models lenet --workloads hvp --reps 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

STATES = ("default", "after", "kept")


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _rss_mib() -> float:
    """Resident memory of this process now (Linux), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    import torch
    import torch.nn.functional as F

    from exactlr.allocator import ENV_SWITCH, keep_freed_memory
    from exactlr.curvature import HessianOperator, random_unit_vector, training_loss_mode
    from exactlr.data import load_dataset
    from exactlr.models import build_model
    from exactlr.paper.schedules import MethodSpec
    from exactlr.paper.training import TrainConfig, train_run

    torch.set_num_threads(args.threads)
    if args.state == "after":
        with keep_freed_memory():  # leaves glibc as its exit leaves it
            pass
    if args.state != "kept":
        os.environ[ENV_SWITCH] = "0"
    train, test = load_dataset("mnist", subset="mini", data_dir=args.data_dir)
    x, y = train.inputs.float().contiguous(), train.targets.contiguous()
    model = build_model(
        args.model, dataset="mnist", init="paper", generator=torch.Generator().manual_seed(0)
    )
    rss: list[float] = []
    context = keep_freed_memory() if args.state == "kept" else contextlib.nullcontext()
    with context:
        if args.workload == "hvp":
            dim = sum(p.numel() for p in model.parameters())
            v = random_unit_vector(dim, generator=torch.Generator().manual_seed(1))
            with training_loss_mode(model):
                op = HessianOperator(model, F.cross_entropy, [(x, y)], hvp_mode="reverse")
                op(v)
                faults, start = _faults(), time.perf_counter()
                for _ in range(args.products):
                    op(v)
                seconds = (time.perf_counter() - start) / args.products
                faults = (_faults() - faults) / args.products
        else:
            method = MethodSpec("const_1e-03", "constant", 1e-3)
            cfg = TrainConfig("mnist", "mini", args.model, method, args.epochs, None)
            faults, start = _faults(), time.perf_counter()
            train_run(cfg, model, train, test, on_epoch=lambda _m: rss.append(_rss_mib()))
            seconds, faults = time.perf_counter() - start, _faults() - faults
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"seconds": seconds, "faults": faults, "rss": rss, "peak": peak}))


def measure(args: argparse.Namespace, workload: str, model: str, state: str) -> dict:
    """Runs one measurement in a fresh process and returns its JSON result."""
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        f"--workload={workload}",
        f"--model={model}",
        f"--state={state}",
        f"--threads={args.threads}",
        f"--products={args.products}",
        f"--epochs={args.epochs}",
        f"--data-dir={args.data_dir}",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench(args: argparse.Namespace, workload: str, model: str) -> None:
    """Interleaved repetitions in the three states; prints the summary line."""
    unit = "s/product" if workload == "hvp" else "s"
    label = (
        f"hvp {model} (5500 images)"
        if workload == "hvp"
        else f"train_run {model} ({args.epochs} full-batch epochs)"
    )
    results: dict[str, list[dict]] = {s: [] for s in STATES}
    for rep in range(args.reps):
        for state in STATES:
            r = measure(args, workload, model, state)
            results[state].append(r)
            rss = f", RSS after epochs 0.. {' '.join(f'{m:.0f}' for m in r['rss'])} MiB"
            print(
                f"  {label} rep {rep} {state}: {r['seconds']:.2f} {unit}, "
                f"{r['faults']:,.0f} faults, peak RSS {r['peak']:.0f} MiB"
                f"{rss if r['rss'] else ''}"
            )
    sec = {s: statistics.median(r["seconds"] for r in results[s]) for s in STATES}
    flt = {s: statistics.median(r["faults"] for r in results[s]) for s in STATES}
    peak = {s: max(r["peak"] for r in results[s]) for s in STATES}
    print(
        f"{label}: default {sec['default']:.2f} {unit} ({flt['default']:,.0f} minor faults), "
        f"after {sec['after']:.2f} ({flt['after']:,.0f}), kept {sec['kept']:.2f} "
        f"({flt['kept']:,.0f}): kept {sec['default'] / sec['kept']:.2f}x faster than default, "
        f"{sec['after'] / sec['kept']:.2f}x than after; largest peak RSS default "
        f"{peak['default']:.0f} MiB, kept {peak['kept']:.0f} MiB"
    )


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("EXACTLR_DATA", "/work/shared/data"))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--models", default="lenet,fc3x1000", help="comma list")
    parser.add_argument("--workloads", default="hvp,train", help="comma list: hvp, train")
    parser.add_argument("--products", type=int, default=3, help="hvp: products timed per rep")
    parser.add_argument("--epochs", type=int, default=5, help="train: full-batch epochs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--state", choices=STATES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    import torch

    print(
        f"torch {torch.__version__}, {args.threads} threads, float32, mini-MNIST full batch "
        f"of 5500; every measurement in a fresh process; reps {args.reps} interleaved"
    )
    for model in args.models.split(","):
        for workload in args.workloads.split(","):
            if workload not in ("hvp", "train"):
                parser.error(f"unknown workload {workload!r}")
            bench(args, workload, model)


if __name__ == "__main__":
    main()
