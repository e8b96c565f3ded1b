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
   below the running maximum, ``subsample="auto"``), ``tol=X`` (the defaults with that
   tolerance), ``sub=X`` (the defaults with that ``subsample``, ``none``: a random
   start), ``screen=X`` (the defaults with that ``screen``, ``none``: no screen), and
   ``baseline=COMMIT``: ``suggest_lr`` at its defaults in the source of that git commit
   (exported with ``git archive`` to a temporary folder and run in a child process; the
   parent waits for it, so it runs alone), e.g. the defaults of an earlier release.
   ``A+B`` combines two settings (``tol=0.03+sub=none``); a setting may end in ``#K``
   to run it again;
3. one line per setting: alpha, its relative difference from the reference (``tight``,
   else ``old``, else the baseline), full-data and subsample products, seconds, the
   speed-up over the baseline (else ``old``) and the seconds in training runs; for a
   setting that screened samples (:mod:`exactlr.screening`), a second line compares
   them with the reference's full-data norms of the same samples: their subsample to
   full-data ratio and how close to K_hat their full-data norms came.

An untimed one-sample call runs first (in the baseline's process too): the first solver
run of a process pays for first-touch allocations.

    .venv/bin/python benchmarks/bench_lr_cost.py --config fig6 --samples 3
    .venv/bin/python benchmarks/bench_lr_cost.py --config fig1 --samples 20 --settings old,default
    .venv/bin/python benchmarks/bench_lr_cost.py --config fig3 --num-train 10000 --samples 3
    .venv/bin/python benchmarks/bench_lr_cost.py --config fig6 --samples 20 \
        --settings baseline=06efd53,old,default

Every setting draws its samples with ``make_model = build_model(name, init="paper")``
(the figure's preset) from the same generator seed; a baseline commit draws them with
its own Algorithm 2, which for 06efd53 gives the same samples (its K_hat at
``tol=1e-4`` equals ``old``'s), so its alpha is a reference too.

The sample count ``--samples`` is Algorithm 2's N (the paper's 20). With the stop below
the running maximum, later samples cost less than early ones, so measure at the N of
interest.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def setting(name: str) -> dict:
    """The keyword arguments of ``suggest_lr`` for one named setting (see the module
    docstring); ``A+B`` merges two, e.g. ``tol=0.03+sub=none``."""
    if "+" in name:
        merged: dict = {}
        for part in name.split("+"):
            merged.update(setting(part))
        return merged
    if name == "tight":
        return {"tol": 1e-6, "stop_below_max": False, "max_iters": 300}
    if name == "old":
        return {"tol": 1e-4, "stop_below_max": False}
    if name == "default":
        return {}
    if name.startswith("tol="):
        return {"tol": float(name[4:])}
    if name.startswith("sub="):
        value = name[4:]
        return {
            "subsample": None if value == "none" else value if value == "auto" else float(value)
        }
    if name.startswith("screen="):
        value = name[7:]
        return {"screen": None if value == "none" else float(value)}
    if name.startswith("baseline="):
        return {"baseline": name[9:]}
    raise SystemExit(f"unknown setting {name!r}")


def settings(names: list[str]) -> dict[str, dict]:
    """The keyword arguments of ``suggest_lr`` for each label (``NAME`` or ``NAME#K``)."""
    return {label: setting(label.split("#")[0]) for label in names}


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


def setup(args: argparse.Namespace) -> tuple:
    """The figure's model at w0 (seed 0), its batches, T and ``make_model``."""
    dataset, subset, name, batch_size, epochs = CONFIGS[args.config]
    train, _ = load_dataset(dataset, subset=subset, data_dir=args.data_dir, seed=0)
    if args.num_train is not None:
        n = args.num_train
        train = dataclasses.replace(train, inputs=train.inputs[:n], targets=train.targets[:n])
    batches = make_batches(train, batch_size)
    model = build_model(
        name, dataset=dataset, init="paper", generator=torch.Generator().manual_seed(0)
    )

    def make_model() -> torch.nn.Module:
        return build_model(name, dataset=dataset, init="paper")

    return model, batches, epochs * len(batches), make_model


def run_setting(args: argparse.Namespace, kwargs: dict, setup_: tuple) -> dict:
    """``suggest_lr`` with ``kwargs`` (timed): alpha, K_hat, products, seconds."""
    model, batches, steps, make_model = setup_
    start = time.perf_counter()
    s = suggest_lr(
        model,
        F.cross_entropy,
        batches,
        total_steps=steps,
        make_model=make_model,
        num_samples=args.samples,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    seconds = time.perf_counter() - start
    records = s.estimate.records
    return {
        "lr": s.lr,
        "k_hat": s.k_hat,
        "products": s.estimate.num_hvps,
        "subsample": sum(getattr(r, "subsample_hvps", 0) for r in records),
        "ceiling": sum(getattr(r, "certified", "") == "ceiling" for r in records),
        "screened": sum(getattr(r, "certified", "") == "screened" for r in records),
        "values": [r.value for r in records],
        "certified": [getattr(r, "certified", "") for r in records],
        "samples": len(records),
        "seconds": seconds,
    }


def _one(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with one sample (the warm-up)."""
    return argparse.Namespace(**{**vars(args), "samples": 1})


def run_baseline(args: argparse.Namespace, commit: str) -> dict:
    """:func:`run_setting` at the defaults of ``commit``'s source, in a child process."""
    root = Path(__file__).resolve().parents[1]
    sha = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short=12", commit],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    src = Path(tempfile.gettempdir()) / f"exactlr-src-{sha}"
    if not (src / "src" / "exactlr").is_dir():
        src.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(root), "archive", sha, "src"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    command = [sys.executable, __file__, "--worker", *sys.argv[1:]]
    env = {**os.environ, "PYTHONPATH": str(src / "src")}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="fig6")
    parser.add_argument("--samples", type=int, default=3, help="Algorithm 2's N")
    parser.add_argument("--num-train", type=int, default=None, help="first N training images")
    parser.add_argument("--settings", default="tight,old,default,tol=0.03,tol=0.1")
    parser.add_argument("--train-epochs", type=int, default=3, help="epochs timed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=os.environ.get("EXACTLR_DATA", "/work/shared/data"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup_ = setup(args)
    if args.worker:  # a baseline commit's defaults; one JSON line for the parent
        with keep_freed_memory():
            train_seconds(setup_[0], setup_[1], 1)  # warm up as the parent does
            run_setting(_one(args), {}, setup_)
            print(json.dumps(run_setting(args, {}, setup_)))
        return
    model, batches, steps, _ = setup_
    images = sum(len(x) for x, _ in batches)
    print(
        f"{args.config}: {CONFIGS[args.config][2]}, {images} images, {len(batches)} batch(es), "
        f"T = {steps}, N = {args.samples}, {args.threads} threads, torch {torch.__version__}"
    )
    epochs = CONFIGS[args.config][4]
    with keep_freed_memory():
        run = train_seconds(model, batches, args.train_epochs) * epochs / args.train_epochs
        print(
            f"{args.config}: one training run ({epochs} epochs, "
            f"from {args.train_epochs} timed) {run:.1f} s"
        )
        # Untimed warm-up (one sample): the first solver run of a process pays for
        # first-touch allocations that would otherwise count against the first setting.
        run_setting(_one(args), {}, setup_)
        rows = {}
        for label, kwargs in settings(args.settings.split(",")).items():
            if "baseline" in kwargs:
                rows[label] = run_baseline(args, kwargs["baseline"])
            else:
                rows[label] = run_setting(args, kwargs, setup_)
    report(args.config, rows, run)


def report(config: str, rows: dict[str, dict], run: float) -> None:
    """One line per setting: alpha against the reference, products, seconds, ratios.

    The reference alpha is ``tight``'s, else ``old``'s, else the baseline's (every
    sample certified to 1e-4 in the last two, so alpha within 5e-5 of the exact norms'
    alpha on the same samples); speed-ups are against the baseline, else ``old``.
    """
    base = next((k for k in rows if k.startswith("baseline=")), "old" if "old" in rows else None)
    ref = "tight" if "tight" in rows else "old" if "old" in rows else base
    for label, row in rows.items():
        diff = f"vs {ref} {row['lr'] / rows[ref]['lr'] - 1:+.2e}" if ref else "no reference"
        speed = f"{rows[base]['seconds'] / row['seconds']:.2f}x" if base else "-"
        sub = f" + {row['subsample']} subsample" if row["subsample"] else ""
        print(
            f"{config} {label}: alpha {row['lr']:.6g} ({diff}), K_hat {row['k_hat']:.6g}, "
            f"products {row['products']}{sub}, {row['ceiling']}/{row['samples']} samples "
            f"stopped below the max, {row.get('screened', 0)} screened, {row['seconds']:.1f} s, "
            f"speed-up over {base} {speed}, "
            f"{row['seconds'] / run:.2f} training runs"
        )
        if row.get("screened") and ref and len(rows[ref].get("values", [])) == row["samples"]:
            print(screen_line(config, label, row, rows[ref]))


def screen_line(config: str, label: str, row: dict, ref: dict) -> str:
    """The screened samples of ``row`` against ``ref``'s full-data norms of the same
    samples: subsample / full ratio and the largest full norm as a share of K_hat."""
    pairs = [
        (value, full)
        for value, full, kind in zip(row["values"], ref["values"], row["certified"], strict=True)
        if kind == "screened"
    ]
    ratios = [value / full for value, full in pairs]
    top = max(full for _, full in pairs) / ref["k_hat"]
    return (
        f"{config} {label}: {len(pairs)}/{row['samples']} samples screened; subsample / "
        f"full-data norm {min(ratios):.2f} to {max(ratios):.2f}; their full-data norms at "
        f"most {top:.2f} x K_hat"
    )


if __name__ == "__main__":
    main()
