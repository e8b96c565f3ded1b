"""The safety check on the paper's presets: flags PyTorch's init, passes the paper's.

For three configurations (full batch on a random subset of mini-MNIST, T steps):
fig1 (FC 3x1000, paper init: N(0, 0.04) + BatchNorm), fig6 (LeNet, paper init) and the
init figure's failing row (FC 3x1000, PyTorch's default init, no BatchNorm), this prints
K_hat, the suggested lr, and what ``check_step_size`` saw after k Adam steps: the loss
change, the Hessian norm at the end against K_hat and 2/lr, the verdict and its cost.

    EXACTLR_DATA=/path/to/data python benchmarks/safety_check.py --images 500 --steps 10
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from exactlr.check import check_step_size
from exactlr.data import load_dataset, make_batches, mini_subset
from exactlr.models import build_model
from exactlr.stepsize import suggest_lr

CONFIGS = (
    ("fig1 (fc3x1000, paper init)", "fc3x1000", "paper"),
    ("fig6 (lenet, paper init)", "lenet", "paper"),
    ("init (fc3x1000, pytorch init)", "fc3x1000", "pytorch"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--total-steps", type=int, default=30)
    parser.add_argument("--steps", type=int, nargs="+", default=[10])
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", default=None, help="one configuration: fig1, fig6 or init")
    args = parser.parse_args()
    train, _ = load_dataset("mnist", subset="mini")
    for seed in args.seeds:
        data = make_batches(mini_subset(train, total=args.images, seed=seed), None)
        for name, arch, init in CONFIGS:
            if args.only and name.split()[0] != args.only:
                continue
            gen = torch.Generator().manual_seed(seed)
            model = build_model(arch, dataset="mnist", init=init, generator=gen)
            t0 = time.perf_counter()
            s = suggest_lr(
                model,
                F.cross_entropy,
                data,
                total_steps=args.total_steps,
                num_samples=args.samples,
                generator=gen,
                tol=1e-3,
            )
            t_lr = time.perf_counter() - t0
            for k in args.steps:
                r = check_step_size(
                    model,
                    F.cross_entropy,
                    data,
                    lr=s.lr,
                    k_hat=s.k_hat,
                    steps=k,
                    initial_loss=s.initial_loss,
                    total_steps=args.total_steps,
                    generator=torch.Generator().manual_seed(seed),
                )
                verdict = "FLAG" if r.warning else "pass"
                print(
                    f"{name:31s} seed {seed} n={args.images} T={args.total_steps} k={k:3d}: "
                    f"K_hat {s.k_hat:7.3f} lr {s.lr:.4f} | L {r.initial_loss:.3f} -> "
                    f"{r.final_loss:.3f} | ||H|| end {r.end_norm:8.3f} vs K_hat "
                    f"{s.k_hat:.3f}, 2/lr {r.stability_threshold:.1f} | {verdict} | check "
                    f"{r.seconds:.1f} s ({r.num_hvps} HVPs) vs suggest_lr {t_lr:.1f} s",
                    flush=True,
                )


if __name__ == "__main__":
    main()
