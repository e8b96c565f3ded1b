"""Benchmark: what the exact rewrites buy a Hessian-vector product, in one run.

For each case (dataset, architecture, number of images; paper preset, seed 0, one full
batch), a float32 ``"reverse"``-mode product with ``rewrite=False`` (the model as given)
and with ``rewrite=True`` (:mod:`exactlr.curvature.rewrites`: median input shift compensated in the
first layer, composite BatchNorm) at the same random vector:

* error: ``||Hv_32 - Hv_64|| / ||Hv_64||`` against the float64 product of a float64
  copy of model and data (``rewrite=False``: the unrewritten function);
* time: seconds per product after the graph is built, median over ``--reps``
  interleaved repetitions of ``--products`` products each, and the ratio.

    python benchmarks/bench_rewrites.py
    python benchmarks/bench_rewrites.py --cases mnist:lenet:5500,cifar10:vgg9:500
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exactlr.curvature import HessianOperator, random_unit_vector, training_loss_mode
from exactlr.data import load_dataset
from exactlr.models import build_model

DEFAULT_CASES = "mnist:lenet:5500,mnist:fc3x1000:5500,cifar10:lenet:5000,cifar10:vgg9:500"


def product(model: nn.Module, x: Tensor, y: Tensor, v: Tensor, rewrite: bool) -> Tensor:
    """One ``"reverse"``-mode product ``H v`` in the model's dtype, returned in float64."""
    with training_loss_mode(model):
        op = HessianOperator(model, F.cross_entropy, [(x, y)], hvp_mode="reverse", rewrite=rewrite)
        return op(v.to(x.dtype)).double()


def seconds_per_product(
    model: nn.Module, x: Tensor, y: Tensor, v: Tensor, rewrite: bool, products: int
) -> float:
    """Mean wall time of ``products`` products after a first one that builds the graph."""
    with training_loss_mode(model):
        op = HessianOperator(model, F.cross_entropy, [(x, y)], hvp_mode="reverse", rewrite=rewrite)
        op(v)
        start = time.perf_counter()
        for _ in range(products):
            op(v)
        return (time.perf_counter() - start) / products


def bench_case(case: str, args: argparse.Namespace) -> str:
    """Errors and times for one ``dataset:arch:n`` case; returns its summary line."""
    dataset, arch, n = case.split(":")
    train, _ = load_dataset(dataset, subset="mini", data_dir=args.data_dir)
    x, y = train.inputs[: int(n)].float().contiguous(), train.targets[: int(n)].contiguous()
    model = build_model(
        arch, dataset=dataset, init="paper", generator=torch.Generator().manual_seed(0)
    )
    dim = sum(p.numel() for p in model.parameters())
    v = random_unit_vector(dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = product(copy.deepcopy(model).double(), x.double(), y, v, rewrite=False)
    errors = {
        rewrite: float((product(model, x, y, v, rewrite) - exact).norm() / exact.norm())
        for rewrite in (False, True)
    }
    times: dict[bool, list[float]] = {False: [], True: []}
    v32 = v.float()
    for rep in range(args.reps):
        for rewrite in (False, True):
            times[rewrite].append(seconds_per_product(model, x, y, v32, rewrite, args.products))
            print(f"  {case} rep {rep} rewrite={rewrite}: {times[rewrite][-1]:.2f} s/product")
    med = {k: statistics.median(t) for k, t in times.items()}
    line = (
        f"{dataset} {arch} ({n} images, {dim:,} parameters): float32 product error "
        f"{errors[False]:.1e} -> {errors[True]:.1e} with rewrites "
        f"({errors[False] / errors[True]:.1f}x smaller); {med[False]:.2f} -> "
        f"{med[True]:.2f} s/product ({med[False] / med[True]:.2f}x faster)"
    )
    print(line)
    return line


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("EXACTLR_DATA", "/work/shared/data"))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--products", type=int, default=2, help="timed products per rep")
    parser.add_argument("--cases", default=DEFAULT_CASES, help="comma list of dataset:arch:n")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    lines = [bench_case(case, args) for case in args.cases.split(",")]
    print("\n".join(["", "summary:", *lines]))


if __name__ == "__main__":
    main()
