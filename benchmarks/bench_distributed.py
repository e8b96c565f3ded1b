"""Benchmark of data-parallel curvature: 1 process against 2 (gloo, CPU), in one run.

Prints wall times measured side by side (no assertions on time) for one model and data
set, whole batches shared round-robin over the ranks
(:func:`exactlr.curvature.distributed.shard_batches`):

1. ``hessian_spectral_norm`` with a fixed number of Lanczos products (``--products``,
   tolerance too tight to stop earlier): seconds per product for 1 process with 1
   thread, 1 process with 2 threads, and 2 processes with 1 thread each; the 2-process
   results must equal the 1-process one to rounding (printed).
2. The ``all_reduce`` of one product alone (the parameter count of float32 numbers) on
   the 2 processes: the communication part of a product.
3. ``estimate_smoothness`` with ``--samples`` weight samples, split over the 2 ranks
   (``parallel="samples"``) against 1 process.

On a machine with fewer free cores than processes the ranks compete for them: read the
ratios with the machine's load in mind.

Run (from the repository root):

    .venv/bin/python benchmarks/bench_distributed.py                     # fc3x256, mini-MNIST
    .venv/bin/python benchmarks/bench_distributed.py --model lenet --products 10
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from exactlr import estimate_smoothness, hessian_spectral_norm
from exactlr.curvature.distributed import shard_batches
from exactlr.data import load_dataset, make_batches
from exactlr.models import build_model


def _setup(args: argparse.Namespace) -> tuple[torch.nn.Module, list]:
    dataset = "cifar10" if args.model == "vgg9" else "mnist"
    train, _ = load_dataset(dataset, subset="mini", data_dir=args.data_dir, seed=0)
    batches = make_batches(train, args.batch_size)
    model = build_model(args.model, dataset=dataset, generator=torch.Generator().manual_seed(0))
    return model, batches


def _norm_seconds(model: torch.nn.Module, batches: list, args: argparse.Namespace) -> tuple:
    start = time.perf_counter()
    res = hessian_spectral_norm(
        model,
        F.cross_entropy,
        batches,
        tol=1e-12,
        max_iters=args.products,
        generator=torch.Generator().manual_seed(1),
        hvp_mode="reverse",
    )
    return (time.perf_counter() - start) / res.num_hvps, res.value, res.num_hvps


def _smoothness_seconds(model: torch.nn.Module, batches: list, args: argparse.Namespace) -> tuple:
    def make() -> torch.nn.Module:
        dataset = "cifar10" if args.model == "vgg9" else "mnist"
        return build_model(args.model, dataset=dataset)

    start = time.perf_counter()
    est = estimate_smoothness(
        make, F.cross_entropy, batches, num_samples=args.samples, tol=1e-3, parallel="samples"
    )
    return time.perf_counter() - start, est.k_hat


def _worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(minutes=10),
    )
    try:
        model, batches = _setup(args)
        per_product, value, hvps = _norm_seconds(model, shard_batches(batches, model), args)
        dim = sum(p.numel() for p in model.parameters())
        vector = torch.randn(dim)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.products):
            dist.all_reduce(vector)
        reduce_seconds = (time.perf_counter() - start) / args.products
        smooth_seconds, k_hat = _smoothness_seconds(model, batches, args)
        if rank == 0:
            torch.save(
                {
                    "per_product": per_product,
                    "value": value,
                    "hvps": hvps,
                    "reduce": reduce_seconds,
                    "dim": dim,
                    "smooth": smooth_seconds,
                    "k_hat": k_hat,
                },
                out,
            )
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fc3x256")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--products", type=int, default=6)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--data-dir", default=os.environ.get("EXACTLR_DATA"))
    args = parser.parse_args()
    model, batches = _setup(args)
    print(
        f"{args.model}, mini-MNIST/CIFAR ({sum(len(x) for x, _ in batches)} samples, "
        f"{len(batches)} batches of {args.batch_size}), {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    single = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        single[threads] = _norm_seconds(model, batches, args)
    torch.set_num_threads(1)
    smooth_single, k_single = _smoothness_seconds(model, batches, args)
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        out = str(Path(tmp) / "rank0.pt")
        mp.spawn(_worker, args=(port, args, out), nprocs=2, join=True)
        two = torch.load(out)
    one_value = single[1][1]
    print(
        f"spectral norm, {args.products} products: 1 process {one_value!r}, "
        f"2 processes {two['value']!r} (relative difference "
        f"{abs(two['value'] - one_value) / one_value:.1e})"
    )
    print(f"seconds per product: 1 process x 1 thread   {single[1][0]:.3f}")
    print(f"                     1 process x 2 threads  {single[2][0]:.3f}")
    print(
        f"                     2 processes x 1 thread {two['per_product']:.3f}  "
        f"(speed-up {single[1][0] / two['per_product']:.2f}x over 1x1, "
        f"{single[2][0] / two['per_product']:.2f}x over 1x2)"
    )
    print(
        f"all_reduce of one product ({two['dim']} float32): {two['reduce'] * 1e3:.1f} ms "
        f"({two['reduce'] / two['per_product']:.1%} of a 2-process product)"
    )
    print(
        f"estimate_smoothness, {args.samples} samples: 1 process {smooth_single:.1f} s, "
        f"2 processes (parallel='samples') {two['smooth']:.1f} s "
        f"(speed-up {smooth_single / two['smooth']:.2f}x); K_hat {k_single:.6g} vs "
        f"{two['k_hat']:.6g}"
    )
    print(f"load average after: {os.getloadavg()[0]:.1f}", file=sys.stderr)


if __name__ == "__main__":
    main()
