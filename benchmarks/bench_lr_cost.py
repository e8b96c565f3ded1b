"""What the learning rate costs: ``suggest_lr`` settings against a tight K_hat and a run.

For one of the paper's configurations (``fig1``: FC 3x1000 on mini-MNIST, full batch;
``fig3``: FC 3x1000 on MNIST, batch 5000; ``fig6``: LeNet on mini-MNIST, full batch;
paper init preset), in one process, inside ``keep_freed_memory`` as under the command:

1. a few epochs of Adam training of the same model and data, timed, scaled to the
   figure's 100 epochs (one training run, in seconds);
2. ``suggest_lr`` on the same model, data and weight samples (same generator seed) with
   each setting of ``--settings``: ``tight`` (``tol=1e-6``, every sample to tol: the
   reference alpha), ``old`` (``tol=1e-4``, every sample to tol: the defaults before the
   step size had its own tolerance), ``default`` (the defaults: ``LR_TOL`` and the stop
   below the running maximum), and ``tol=X`` (the defaults with that tolerance);
3. one line per setting: alpha, its relative difference from ``tight``, full-data
   products, seconds, seconds against ``old`` and against the training run.

    .venv/bin/python benchmarks/bench_lr_cost.py --config fig6 --samples 3
    .venv/bin/python benchmarks/bench_lr_cost.py --config fig1 --samples 20 --settings old,default
    .venv/bin/python benchmarks/bench_lr_cost.py --config fig3 --num-train 10000 --samples 3

The sample count ``--samples`` is Algorithm 2's N (the paper's 20); with fewer, the
seconds scale with N (every sample is a solver run of the same kind).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import time

import torch
import torch.nn.functional as F

from exactlr.allocator import keep_freed_memory
from exactlr.data import load_dataset, make_batches
from exactlr.models import build_model
from exactlr.stepsize import suggest_lr

CONFIGS = {  # dataset, subset, model, batch size (None: full batch), epochs
    "fig1": ("mnist", "mini", "fc3x1000", None, 100),
    "fig3": ("mnist", "full", "fc3x1000", 5000, 100),
    "fig6": ("mnist", "mini", "lenet", None, 100),
}


def settings(names: list[str]) -> dict[str, dict]:
    """The keyword arguments of ``suggest_lr`` for each named setting."""
    out = {}
    for name in names:
        if name == "tight":
            out[name] = {"tol": 1e-6, "stop_below_max": False, "max_iters": 300}
        elif name == "old":
            out[name] = {"tol": 1e-4, "stop_below_max": False}
        elif name == "default":
            out[name] = {}
        elif name.startswith("tol="):
            out[name] = {"tol": float(name[4:])}
        elif name.startswith("sub="):
            out[name] = {"subsample": float(name[4:])}
        else:
            raise SystemExit(f"unknown setting {name!r}")
    return out


def train_seconds(model: torch.nn.Module, batches: list, epochs: int) -> float:
    """Seconds of ``epochs`` epochs of Adam (lr 1e-3) on a copy of ``model``."""
    net = copy.deepcopy(model)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    start = time.perf_counter()
    for _ in range(epochs):
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opt.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="fig6")
    parser.add_argument("--samples", type=int, default=3, help="Algorithm 2's N")
    parser.add_argument("--num-train", type=int, default=None, help="first N training images")
    parser.add_argument("--settings", default="tight,old,default,tol=0.03,tol=0.1")
    parser.add_argument("--train-epochs", type=int, default=3, help="epochs timed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=os.environ.get("EXACTLR_DATA", "/work/shared/data"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset, subset, name, batch_size, epochs = CONFIGS[args.config]
    train, _ = load_dataset(dataset, subset=subset, data_dir=args.data_dir, seed=0)
    if args.num_train is not None:
        n = args.num_train
        train = dataclasses.replace(train, inputs=train.inputs[:n], targets=train.targets[:n])
    batches = make_batches(train, batch_size)
    model = build_model(
        name, dataset=dataset, init="paper", generator=torch.Generator().manual_seed(0)
    )
    steps = epochs * len(batches)
    images = sum(len(x) for x, _ in batches)
    print(
        f"{args.config}: {name}, {images} images, {len(batches)} batch(es), T = {steps}, "
        f"N = {args.samples}, {args.threads} threads, torch {torch.__version__}"
    )
    with keep_freed_memory():
        run = train_seconds(model, batches, args.train_epochs) * epochs / args.train_epochs
        print(
            f"{args.config}: one training run ({epochs} epochs, "
            f"from {args.train_epochs} timed) {run:.1f} s"
        )
        rows = {}
        for label, kwargs in settings(args.settings.split(",")).items():
            start = time.perf_counter()
            s = suggest_lr(
                model,
                F.cross_entropy,
                batches,
                total_steps=steps,
                num_samples=args.samples,
                generator=torch.Generator().manual_seed(0),
                **kwargs,
            )
            rows[label] = (s, time.perf_counter() - start)
    # The reference alpha: ``tight``, else ``old`` (every sample certified to 1e-4, so
    # its alpha is within 5e-5 of the exact norms' alpha on the same samples).
    ref_label = "tight" if "tight" in rows else "old" if "old" in rows else None
    ref = rows[ref_label][0] if ref_label else None
    old = rows.get("old")
    for label, (s, seconds) in rows.items():
        est = s.estimate
        full = est.num_hvps
        sub = sum(r.subsample_hvps for r in est.records)
        diff = f"{s.lr / ref.lr - 1:+.2e}" if ref else "-"
        speed = f"{old[1] / seconds:.2f}x" if old else "-"
        ceil = sum(r.certified == "ceiling" for r in est.records)
        print(
            f"{args.config} {label}: alpha {s.lr:.6g} (vs {ref_label} {diff}), "
            f"K_hat {s.k_hat:.6g}, "
            f"products {full}{f' + {sub} subsample' if sub else ''}, "
            f"{ceil}/{len(est.records)} samples stopped below the max, {seconds:.1f} s, "
            f"speed-up over old {speed}, {seconds / run:.2f} training runs"
        )


if __name__ == "__main__":
    main()
