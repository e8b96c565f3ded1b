"""Where the comparison grid's time goes on a CPU: one forward + backward of K runs.

Prints, side by side in one run (interleaved repetitions, medians):

1. LeNet (paper preset) forward + backward of K runs on B random images: K sequential
   `model(x).backward()` calls, the grid's folded layout (`exactlr.paper.stacked._Stacked`), and
   the grid's vmap path, with the minor page faults of each (`getrusage`).
2. LeNet's two convolutions, forward + backward, K runs: the first layer as one wide
   convolution on the shared batch vs K separate ones; the second as one grouped
   convolution (`groups=K`, what vmap produces) vs K separate ones.

Never asserts on time. Example:

    .venv/bin/python benchmarks/bench_grid_layers.py                 # B = 2000, K = 15
    .venv/bin/python benchmarks/bench_grid_layers.py --batch 128
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from exactlr.models import build_model
from exactlr.paper.stacked import _Stacked


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _bench(fns: dict[str, Callable[[], None]], reps: int) -> dict[str, tuple[float, int]]:
    """Median seconds and minor page faults per call, repetitions interleaved."""
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    faults: dict[str, list[int]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            f0, t0 = _faults(), time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            faults[name].append(_faults() - f0)
    return {k: (statistics.median(times[k]), int(statistics.median(faults[k]))) for k in fns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2000, help="images per step")
    parser.add_argument("--runs", type=int, default=15, help="K")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    k, b = args.runs, args.batch
    gen = torch.Generator().manual_seed(0)
    model = build_model("lenet", dataset="mnist", generator=gen)
    x = torch.randn(b, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (b,), generator=gen)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32, "
        f"LeNet paper preset, K={k} runs, batch {b}, median of {args.reps}"
    )

    def sequential() -> None:
        for _ in range(k):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()

    weights = {
        n: p.detach().unsqueeze(0).repeat(k, *[1] * p.dim()).requires_grad_(True)
        for n, p in model.named_parameters()
    }
    folded_model = _Stacked(model, torch.device("cpu"))
    vmap_model = _Stacked(model, torch.device("cpu"), fold=False)
    assert folded_model.folded and not vmap_model.folded

    def grid(stacked_model: _Stacked) -> Callable[[], None]:
        def step() -> None:
            losses, _ = stacked_model(weights, x, y)
            torch.autograd.grad(losses.sum(), list(weights.values()))

        return step

    res = _bench(
        {"sequential": sequential, "folded": grid(folded_model), "vmap": grid(vmap_model)},
        args.reps,
    )
    seq = res["sequential"][0]
    print(
        "forward + backward: "
        + "  ".join(f"{n} {t:.2f} s ({f:,} faults)" for n, (t, f) in res.items())
        + f"  | sequential/folded {seq / res['folded'][0]:.2f}x"
        f"  sequential/vmap {seq / res['vmap'][0]:.2f}x"
    )

    # The two convolutions alone (forward + backward; inputs as in LeNet).
    w1 = torch.randn(k * 6, 1, 5, 5, generator=gen, requires_grad=True)
    h = torch.randn(b, k * 6, 13, 13, generator=gen, requires_grad=True)
    w2 = torch.randn(k * 16, 6, 5, 5, generator=gen, requires_grad=True)
    blocks = [torch.randn(b, 6, 13, 13, generator=gen, requires_grad=True) for _ in range(k)]

    def conv1_wide() -> None:
        F.conv2d(x, w1, padding=1).sum().backward()

    def conv1_separate() -> None:
        for i in range(k):
            F.conv2d(x, w1[6 * i : 6 * i + 6], padding=1).sum().backward()

    def conv2_grouped() -> None:
        F.conv2d(h, w2, padding=1, groups=k).sum().backward()

    def conv2_separate() -> None:
        for i in range(k):
            F.conv2d(blocks[i], w2[16 * i : 16 * i + 16], padding=1).sum().backward()

    conv = _bench(
        {
            "conv1 wide": conv1_wide,
            "conv1 separate": conv1_separate,
            "conv2 grouped": conv2_grouped,
            "conv2 separate": conv2_separate,
        },
        args.reps,
    )
    ms = {n: t * 1e3 for n, (t, _) in conv.items()}
    print(
        f"conv1 (shared input): wide {ms['conv1 wide']:.1f} ms  {k} separate "
        f"{ms['conv1 separate']:.1f} ms  ratio {ms['conv1 separate'] / ms['conv1 wide']:.2f}x"
    )
    print(
        f"conv2 (per-run input): grouped {ms['conv2 grouped']:.1f} ms  {k} separate "
        f"{ms['conv2 separate']:.1f} ms  ratio {ms['conv2 separate'] / ms['conv2 grouped']:.2f}x"
    )


if __name__ == "__main__":
    main()
