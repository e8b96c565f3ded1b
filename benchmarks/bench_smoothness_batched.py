"""Benchmark of Algorithm 2 (K_hat) with stacked weight samples: sequential vs batched.

``estimate_smoothness`` for N = 10 and N = 100 weight samples, one sample at a time
(``sample_batch=1``) against groups of G samples evaluated together
(``sample_batch=G``: stacked weights, one vmapped Hessian-vector product per Lanczos
step). Both runs use the same seeds and start vectors, so their K_hat agree to the solver
tolerance. For the largest N the adaptive stop (``patience``, ``rel_tol``) is run too,
sequential and batched, and reported beside the fixed-N result: samples used, K_hat
against the fixed-N K_hat, wall time. The runs for one N are made one after the other in
one process (side by side), alternating sequential and batched ``--reps`` times (medians
reported). Besides wall time the process CPU time is printed: on a machine shared with
other jobs it is the steadier measure of the work done (with one thread).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_smoothness_batched.py
    .venv/bin/python benchmarks/bench_smoothness_batched.py --model lenet --images 500
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from exactlr.allocator import keep_freed_memory
from exactlr.data import load_dataset
from exactlr.models import build_model, count_parameters
from exactlr.smoothness import SmoothnessEstimate, estimate_smoothness


def run(
    args: argparse.Namespace,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    num: int,
    sample_batch: int,
    patience: int | None,
) -> tuple[float, float, SmoothnessEstimate]:
    """One timed ``estimate_smoothness`` call (same seeds for every call).

    Returns:
        ``(wall seconds, process CPU seconds, estimate)``.
    """

    def make_model() -> torch.nn.Module:
        return build_model(args.model, dataset=args.dataset, init=args.init)

    start, cpu = time.perf_counter(), time.process_time()
    with keep_freed_memory():  # as under the exactlr command
        est = estimate_smoothness(
            make_model,
            F.cross_entropy,
            data,
            num_samples=num,
            generator=torch.Generator().manual_seed(args.seed),
            patience=patience,
            rel_tol=args.rel_tol,
            tol=args.tol,
            hvp_mode=args.hvp_mode,
            sample_batch=sample_batch,
        )
    return time.perf_counter() - start, time.process_time() - cpu, est


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("EXACTLR_DATA", "/work/shared/data"))
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="fc1x100", help="any build_model name")
    parser.add_argument("--init", default="paper", help="paper (BatchNorm) or pytorch")
    parser.add_argument("--images", type=int, default=1000, help="training images (1 batch)")
    parser.add_argument("--ns", default="10,100", help="comma-separated sample counts N")
    parser.add_argument("--group", type=int, default=10, help="sample_batch of the batched run")
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--rel-tol", type=float, default=0.01)
    parser.add_argument("--tol", type=float, default=1e-3, help="Lanczos relative tolerance")
    parser.add_argument("--hvp-mode", default="auto", choices=("auto", "forward", "reverse"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reps", type=int, default=1, help="alternating repetitions")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    torch.set_num_threads(args.threads)
    train, _ = load_dataset(args.dataset, subset="mini", data_dir=args.data_dir)
    x = train.inputs[: args.images].float().contiguous()
    y = train.targets[: args.images].contiguous()
    data = [(x, y)]
    params = count_parameters(build_model(args.model, dataset=args.dataset, init=args.init))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.model} "
        f"({args.init} init, {params:,} parameters), {len(x)} images, Lanczos tol {args.tol:g}, "
        f"hvp_mode {args.hvp_mode}"
    )
    ns = [int(n) for n in args.ns.split(",")]
    g = args.group
    fixed: dict[int, SmoothnessEstimate] = {}
    for num in ns:
        times: dict[int, list[tuple[float, float]]] = {1: [], g: []}
        ests: dict[int, SmoothnessEstimate] = {}
        for _ in range(args.reps):
            for sample_batch in (1, g):
                wall, cpu, ests[sample_batch] = run(args, data, num, sample_batch, None)
                times[sample_batch].append((wall, cpu))
        seq, bat = ests[1], ests[g]
        w_seq, c_seq = (statistics.median(t) for t in zip(*times[1], strict=True))
        w_bat, c_bat = (statistics.median(t) for t in zip(*times[g], strict=True))
        diff = max(abs(a - b) / b for a, b in zip(bat.samples, seq.samples, strict=True))
        print(
            f"N={num}: sequential {w_seq:.1f} s  batched({g}) {w_bat:.1f} s  ratio "
            f"{w_seq / w_bat:.2f}x  K_hat {seq.k_hat:.5g} vs {bat.k_hat:.5g}  "
            f"[cpu {c_seq:.1f} s vs {c_bat:.1f} s, ratio {c_seq / c_bat:.2f}x; products "
            f"{seq.num_hvps} vs {bat.num_hvps}; max per-sample rel diff {diff:.1e}; "
            f"median of {args.reps}]"
        )
        fixed[num] = seq
    num = max(ns)
    k_fixed = fixed[num].k_hat
    for label, sample_batch in (("sequential", 1), (f"batched({g})", g)):
        t_ad, c_ad, ad = run(args, data, num, sample_batch, args.patience)
        print(
            f"N={num} adaptive (patience {args.patience}, rel_tol {args.rel_tol:g}) {label}: "
            f"stopped {ad.stopped_early} after {len(ad.samples)} samples"
            f"{f' (+{ad.discarded} discarded)' if ad.discarded else ''}, {t_ad:.1f} s "
            f"(cpu {c_ad:.1f} s), "
            f"K_hat {ad.k_hat:.5g} (fixed N={num}: {k_fixed:.5g}, ratio "
            f"{ad.k_hat / k_fixed:.4f})"
        )


if __name__ == "__main__":
    main()
