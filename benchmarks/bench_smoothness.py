"""Benchmark of Algorithm 2 (K_hat): fixed N against the adaptive stop, and vmap.

1. ``estimate_smoothness`` with N = 10 and N = 100 weight samples, fixed N against the
   adaptive stop (``patience``, ``rel_tol``), run one after the other in one process;
   prints wall time and K_hat of each and the time ratio. The samples are drawn from the
   same seeds, so the adaptive run is a prefix of the fixed one and its K_hat is the
   running max where it stopped.
2. ``--vmap``: one Hessian-vector product at each of S weight samples, a Python loop
   against ``torch.func.stack_module_state`` + ``vmap`` (forward-over-reverse in both),
   on a model without BatchNorm. Interleaved repetitions, medians, ratio. (BatchNorm in
   training-loss mode works under vmap too; ``bench_smoothness_batched.py`` times the
   whole K_hat loop with stacked samples, ``estimate_smoothness(sample_batch=G)``.)

    .venv/bin/python benchmarks/bench_smoothness.py                 # fc3x100, 1,000 images
    .venv/bin/python benchmarks/bench_smoothness.py --vmap --skip-khat
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
from torch.func import functional_call, grad, jvp, stack_module_state, vmap

from exactlr.allocator import keep_freed_memory
from exactlr.data import load_dataset
from exactlr.models import build_model
from exactlr.smoothness import estimate_smoothness


def bench_khat(x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> None:
    """Part 1: fixed N against the adaptive stop, N = 10 and 100."""

    def make_model() -> torch.nn.Module:
        return build_model(args.model, dataset="mnist", init="paper")

    for num, patience in ((10, args.patience_10), (100, args.patience_100)):
        out = {}
        for label, kw in (("fixed", {}), ("adaptive", {"patience": patience})):
            start = time.perf_counter()
            with keep_freed_memory():  # as under the exactlr command
                est = estimate_smoothness(
                    make_model,
                    F.cross_entropy,
                    [(x, y)],
                    num_samples=num,
                    generator=torch.Generator().manual_seed(0),
                    rel_tol=args.rel_tol,
                    tol=1e-3,
                    **kw,
                )
            out[label] = (time.perf_counter() - start, est)
        (t_fix, fix), (t_ad, ad) = out["fixed"], out["adaptive"]
        print(
            f"N={num}: fixed K_hat {fix.k_hat:.5g} ({t_fix:.1f} s, {fix.num_hvps} products), "
            f"adaptive (patience {patience}, rel_tol {args.rel_tol:g}) K_hat {ad.k_hat:.5g} "
            f"after {len(ad.samples)} samples ({t_ad:.1f} s), K_hat ratio "
            f"{ad.k_hat / fix.k_hat:.4f}, time ratio fixed/adaptive {t_fix / t_ad:.2f}"
        )


def bench_vmap(x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> None:
    """Part 2: S HVPs at S weight samples, loop against vmap over stacked parameters."""
    models = [
        build_model(
            args.vmap_model,
            dataset="mnist",
            init="pytorch",
            generator=torch.Generator().manual_seed(s),
        )
        for s in range(args.stack)
    ]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    gen = torch.Generator().manual_seed(1)
    tangents = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}

    def loss(p: dict, b: dict) -> torch.Tensor:
        return F.cross_entropy(functional_call(base, (p, b), (x,)), y)

    def hvp(p: dict, b: dict, v: dict) -> dict:
        return jvp(lambda q: grad(loss)(q, b), (p,), (v,))[1]

    def looped() -> list:
        return [
            hvp(
                {k: t[i] for k, t in params.items()},
                {k: t[i] for k, t in buffers.items()},
                {k: t[i] for k, t in tangents.items()},
            )
            for i in range(args.stack)
        ]

    def vmapped() -> dict:
        return vmap(hvp)(params, buffers, tangents)

    ref, fast = looped(), vmapped()
    diff = max(
        float((fast[k][i] - ref[i][k]).abs().max()) for i in range(args.stack) for k in params
    )
    t_loop, t_vmap = [], []
    for _ in range(args.reps):
        start = time.perf_counter()
        looped()
        t_loop.append(time.perf_counter() - start)
        start = time.perf_counter()
        vmapped()
        t_vmap.append(time.perf_counter() - start)
    a, b = statistics.median(t_loop), statistics.median(t_vmap)
    print(
        f"vmap: {args.stack} HVPs on {args.vmap_model} (pytorch init, no BatchNorm), "
        f"{len(x)} samples: loop {a:.3f} s, vmap {b:.3f} s, speedup {a / b:.2f} "
        f"[median of {args.reps}; max abs diff {diff:.1e}]"
    )


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("EXACTLR_DATA", "/work/shared/data"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="fc3x100", help="K_hat model (paper preset)")
    parser.add_argument("--num-samples", type=int, default=1000, help="training images")
    parser.add_argument("--patience-10", type=int, default=3)
    parser.add_argument("--patience-100", type=int, default=10)
    parser.add_argument("--rel-tol", type=float, default=0.01)
    parser.add_argument("--vmap", action="store_true", help="also part 2")
    parser.add_argument("--skip-khat", action="store_true", help="only part 2")
    parser.add_argument("--vmap-model", default="fc3x100")
    parser.add_argument("--stack", type=int, default=10, help="weight samples per vmap")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    torch.set_num_threads(args.threads)
    train, _ = load_dataset("mnist", subset="mini", data_dir=args.data_dir)
    n = args.num_samples
    x, y = train.inputs[:n].float().contiguous(), train.targets[:n].contiguous()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {n} images")
    if not args.skip_khat:
        bench_khat(x, y, args)
    if args.vmap:
        bench_vmap(x, y, args)


if __name__ == "__main__":
    main()
