"""How long a set of figures will take: an explicit cost model, measured on one machine.

The model counts work in *image passes* and prices them per architecture:

* a training epoch costs ``2 n_train + n_test / 3`` gradient-image passes: the training
  pass, the per-epoch metrics' full-data gradient (which also gives the loss) and a
  forward pass over the test set (a forward pass ~ a third of a forward-and-backward);
  the metrics at w0 add ``n_train + n_test / 3`` once per run;
* one K_hat weight sample costs ``hvps_per_sample`` Hessian-vector products over the
  whole training set, each priced per image (:attr:`ArchCost.hvp_image_s`).

:data:`REFERENCE_COSTS` holds the seconds per image of each architecture on the
reference machine (:data:`REFERENCE_MACHINE`), measured from the result files of real
runs (each entry names the run it was read from). Fully connected nets are priced by
parameter count from FC 3x1000's measurement (their cost per image grows with the
weights touched). A device ``speed`` times faster than the reference divides every
time, one speed for all or one per architecture family (``fc``, ``lenet``, ``vgg9``);
:func:`calibrate_speed` measures the family speeds on the device with a small probe
(one forward-and-backward pass) priced by the model itself
(:func:`probe_reference_seconds`).

Runs shared between figures (ours in fig1 and fig2) and K_hat estimates shared between
horizons (fig12-15) are counted once, and work already done in ``out_dir`` (finished
result files, cached LR entries) is counted apart as done, so the estimate of a resumed
run is what is left.

Example:
    >>> est = estimate_jobs([("fig1", 0)], "paper", data_dir="/nonexistent")
    >>> est.runs, round(est.total_seconds / 3600, 2) > 0
    (8, True)
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from exactlr.models import build_model
from exactlr.paper.planning import PlannedRun, resolve_figure
from exactlr.paper.results import is_finished
from exactlr.paper.scales import Scale, parse_scale
from exactlr.paper.store import lr_cache_path, run_path

__all__ = [
    "REFERENCE_COSTS",
    "REFERENCE_MACHINE",
    "ArchCost",
    "Estimate",
    "FigureEstimate",
    "arch_cost",
    "arch_family",
    "calibrate_speed",
    "device_speed",
    "estimate_jobs",
    "format_estimate",
    "probe_reference_seconds",
    "probe_seconds",
]

#: The machine the reference costs were measured on.
REFERENCE_MACHINE = "2 shared x86 CPU cores, torch 2.13.0 CPU, float32"


@dataclass(frozen=True)
class ArchCost:
    """Seconds per image of one architecture on the reference machine.

    Attributes:
        grad_image_s: One forward-and-backward pass of one image (training step share).
        hvp_image_s: One Hessian-vector product's share of one image (the full-data
            Hessian, BatchNorm's double backward included).
        hvps_per_sample: Full-data products per K_hat weight sample at the library's
            defaults, the sample's fixed costs (loss, gradient graph, subsample start)
            counted as products; every sample solved on all the data (the screen of
            :mod:`exactlr.screening` skips samples only where their norms spread
            beyond 2x, which a plan cannot know in advance, so the estimate is an
            upper one there).
        source: The runs the numbers were read from.
    """

    grad_image_s: float
    hvp_image_s: float
    hvps_per_sample: float
    source: str


#: Measured costs (see :class:`ArchCost`). LeNet: ``exactlr run fig6 --scale paper``
#: (100 epochs of 5,500 images in 103 s) and fig7 cpu (12,000 images, batch 2,000: 2.2 s
#: an epoch, which the model predicts within 15%). FC 3x1000: ``exactlr run fig3 --scale
#: cpu`` (batch 2,000: 4.2 s an epoch; full batch is 1.7x cheaper per image, so this errs
#: long). VGG-9: ``python benchmarks/time_epoch.py fig10 --scale cpu --no-khat`` (one
#: epoch on 1,000 mini-CIFAR-10 images, batch 250; the machine was shared, so CPU
#: seconds / 2 threads, not the wall time); a product is priced at 3 of its gradients
#: per image (``HessianOperator`` on 64 images measured 2.4). Products per K_hat sample
#: at the library's defaults (``LR_TOL``, the stop below the running max, the subsample
#: start), as product-equivalents (a sample's seconds over a product's, the fixed costs
#: of a sample included): ``benchmarks/bench_lr_cost.py --samples 20`` gives 4.4 for
#: fig6 (LeNet) and 3.7 for fig1 (FC 3x1000), rounded up here; VGG-9 (convolutions and
#: BatchNorm like LeNet) takes LeNet's.
REFERENCE_COSTS: dict[str, ArchCost] = {
    "lenet": ArchCost(9.1e-5, 7.0e-4, 5.0, "fig6 paper, fig7 cpu result files"),
    "fc3x1000": ArchCost(1.5e-4, 3.4e-4, 4.0, "fig3 cpu, fig1 cpu result files"),
    "vgg9": ArchCost(1.3e-2, 3.9e-2, 5.0, "benchmarks/time_epoch.py fig10 --scale cpu"),
}

#: Parameters of FC 3x1000 on MNIST, the unit for pricing other FC nets.
_FC_NAME = re.compile(r"fc(\d+)x(\d+)")


def _fc_params(depth: int, width: int, inputs: int = 784, classes: int = 10) -> int:
    return inputs * width + (depth - 1) * width * width + width * classes


def arch_cost(model: str, dataset: str = "mnist") -> ArchCost:
    """The reference cost of ``model``: measured, or for an FC net FC 3x1000's scaled by
    parameter count (inputs 3,072 on CIFAR-10).

    Raises:
        ValueError: A model with no measured cost.
    """
    if model in REFERENCE_COSTS:
        return REFERENCE_COSTS[model]
    match = _FC_NAME.fullmatch(model)
    if match is None:
        raise ValueError(f"no reference cost for model {model!r}; known: lenet, vgg9, fc*")
    inputs = 3072 if dataset == "cifar10" else 784
    ratio = _fc_params(int(match[1]), int(match[2]), inputs) / _fc_params(3, 1000)
    base = REFERENCE_COSTS["fc3x1000"]
    return ArchCost(
        base.grad_image_s * ratio,
        base.hvp_image_s * ratio,
        base.hvps_per_sample,
        f"fc3x1000 x {ratio:.3g} (parameters)",
    )


#: (train, test) images of each data set and subset before a scale's caps.
_SIZES = {
    ("mnist", "mini"): (5500, 1000),
    ("mnist", "full"): (60000, 10000),
    ("cifar10", "mini"): (5000, 1000),
    ("cifar10", "full"): (50000, 10000),
    ("synthetic", "mini"): (2000, 500),
    ("synthetic", "full"): (2000, 500),
}


def _sizes(plan: PlannedRun) -> tuple[int, int]:
    cfg = plan.config
    train, test = _SIZES[(cfg.dataset, cfg.subset)]
    if cfg.num_train is not None:
        train = min(train, cfg.num_train)
    if plan.scale.num_test is not None:
        test = min(test, plan.scale.num_test)
    return train, test


def arch_family(model: str) -> str:
    """``"fc"`` for any FC net, else the model name (``"lenet"``, ``"vgg9"``)."""
    return "fc" if _FC_NAME.fullmatch(model) else model


def training_seconds(plan: PlannedRun) -> float:
    """Reference seconds of one run's training and per-epoch metrics."""
    train, test = _sizes(plan)
    cost = arch_cost(plan.config.model, plan.config.dataset)
    return (plan.config.epochs * (2 * train + test / 3) + train + test / 3) * cost.grad_image_s


def khat_seconds(plan: PlannedRun) -> float:
    """Reference seconds of the K_hat estimate a run's LR needs."""
    train, _ = _sizes(plan)
    cost = arch_cost(plan.config.model, plan.config.dataset)
    return plan.num_samples * cost.hvps_per_sample * train * cost.hvp_image_s


@dataclass
class FigureEstimate:
    """One figure at one base seed: its runs and reference seconds (new work only:
    runs and K_hat estimates counted by an earlier figure of the plan are not again)."""

    figure: str
    seed: int
    runs: int = 0
    runs_todo: int = 0
    khat: int = 0
    khat_todo: int = 0
    training_s: float = 0.0
    khat_s: float = 0.0


@dataclass
class Estimate:
    """The estimate of a plan of figures, in seconds on the device (reference / speed)."""

    scale: Scale
    speed: float | dict[str, float]
    figures: list[FigureEstimate] = field(default_factory=list)

    @property
    def runs(self) -> int:
        """Distinct runs of the plan."""
        return sum(f.runs for f in self.figures)

    @property
    def runs_todo(self) -> int:
        """Runs without a finished result file."""
        return sum(f.runs_todo for f in self.figures)

    @property
    def total_seconds(self) -> float:
        """Seconds of the work left, on the device."""
        return sum(f.training_s + f.khat_s for f in self.figures)


def _speed_of(speed: float | Mapping[str, float], model: str) -> float:
    if isinstance(speed, Mapping):
        return float(speed.get(arch_family(model), 1.0))
    return float(speed)


def estimate_jobs(
    jobs: Sequence[tuple[str, int]],
    scale: str | Scale,
    *,
    out_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    speed: float | Mapping[str, float] = 1.0,
) -> Estimate:
    """Estimates the time of running ``jobs`` (``(figure, base seed)`` pairs) at ``scale``.

    Args:
        jobs: The figures and seeds, in the order they will run.
        scale: The scale.
        out_dir: Results folder whose finished work is counted as done (None: nothing).
        data_dir: Data root (decides real vs synthetic data at smoke scale).
        speed: How many times faster the device is than the reference machine: one
            number, or one per :func:`arch_family` (a missing family counts as 1).

    Raises:
        ValueError: Unknown figure or scale, a model without a cost, ``speed <= 0``.
    """
    speeds = speed.values() if isinstance(speed, Mapping) else [speed]
    if not all(v > 0 for v in speeds):
        raise ValueError(f"speed={speed} must be positive (1 = the reference machine)")
    scale = parse_scale(scale)
    est = Estimate(scale=scale, speed=dict(speed) if isinstance(speed, Mapping) else speed)
    seen_runs: set[str] = set()
    seen_khat: set[object] = set()
    for figure, seed in jobs:
        fig = FigureEstimate(figure, seed)
        for plan in resolve_figure(figure, scale, seed=seed, data_dir=data_dir):
            if plan.run_name in seen_runs:
                continue
            seen_runs.add(plan.run_name)
            fig.runs += 1
            done = out_dir is not None and is_finished(run_path(out_dir, plan.run_name))
            factor = _speed_of(speed, plan.config.model)
            if not done:
                fig.runs_todo += 1
                fig.training_s += training_seconds(plan) / factor
            key = plan.lr_key.smoothness_key()
            if key in seen_khat:
                continue
            seen_khat.add(key)
            fig.khat += 1
            cached = (
                out_dir is not None and lr_cache_path(out_dir, plan.lr_key.to_filename()).is_file()
            )
            if not cached and not done:
                fig.khat_todo += 1
                fig.khat_s += khat_seconds(plan) / factor
        est.figures.append(fig)
    return est


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f}"


def format_estimate(est: Estimate, device: str) -> str:
    """The estimate as a plain-text table, one line per figure and seed, then the total."""
    lines = [
        f"{'figure':<7} {'seed':>4} {'runs':>5} {'to do':>6} {'K_hat':>6} "
        f"{'train h':>8} {'K_hat h':>8} {'total h':>8}"
    ]
    for f in est.figures:
        lines.append(
            f"{f.figure:<7} {f.seed:>4} {f.runs:>5} {f.runs_todo:>6} {f.khat_todo:>6} "
            f"{_hours(f.training_s):>8} {_hours(f.khat_s):>8} "
            f"{_hours(f.training_s + f.khat_s):>8}"
        )
    speed = (
        ", ".join(f"{k} {v:.3g}" for k, v in est.speed.items())
        if isinstance(est.speed, dict)
        else f"{est.speed:.3g}"
    )
    lines.append(
        f"total: {est.runs} runs ({est.runs_todo} to do) at scale {est.scale} on {device}: "
        f"about {_hours(est.total_seconds)} h at speed {speed} (1 = {REFERENCE_MACHINE}; "
        "cost model: exactlr.paper.estimate)"
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ calibration

#: The probe of each architecture family: (model, dataset, images).
_PROBES = {"fc": ("fc3x1000", "mnist", 1024), "lenet": ("lenet", "mnist", 1024),
           "vgg9": ("vgg9", "cifar10", 64)}  # fmt: skip


def probe_reference_seconds(family: str) -> float:
    """What :func:`probe_seconds` of ``family`` costs on the reference machine by the
    cost model itself (images x ``grad_image_s``), so that a calibrated speed rescales
    the model's own prices. (VGG-9's probe measured 1.25 s there, CPU seconds / 2
    threads, against the model's 0.83 s.)"""
    name, dataset, count = _PROBES[family]
    return count * arch_cost(name, dataset).grad_image_s


def probe_seconds(
    device: str | torch.device, family: str, *, repeats: int = 3, cpu_time: bool = False
) -> float:
    """Median seconds of one forward-and-backward pass of ``family``'s probe model over
    random inputs on ``device`` (after one warm-up pass); with ``cpu_time``, process CPU
    seconds divided by torch's thread count (for a shared machine)."""
    device = torch.device(device)
    name, dataset, count = _PROBES[family]
    model = build_model(name, dataset=dataset, generator=torch.Generator().manual_seed(0))
    model = model.to(device)
    gen = torch.Generator().manual_seed(0)
    shape = (count, 3, 32, 32) if dataset == "cifar10" else (count, 1, 28, 28)
    inputs = torch.randn(*shape, generator=gen).to(device)
    targets = torch.randint(0, 10, (count,), generator=gen).to(device)
    clock = time.process_time if cpu_time else time.perf_counter
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = clock()
        F.cross_entropy(model(inputs), targets).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(clock() - start)
    seconds = float(statistics.median(times[1:]))
    return seconds / torch.get_num_threads() if cpu_time else seconds


def calibrate_speed(
    device: str | torch.device, families: Sequence[str] = tuple(_PROBES)
) -> dict[str, float]:
    """How many times faster ``device`` runs each family's probe than the reference
    machine (a few seconds on a GPU). Small probes on a GPU are bound by kernel launches
    more than a full epoch is, so the estimate errs long."""
    return {f: probe_reference_seconds(f) / probe_seconds(device, f) for f in families}


def device_speed(device: str, speed: float | str | None) -> tuple[float | dict[str, float], str]:
    """The speed for an estimate on ``device`` (a name: ``cpu``, ``cuda``, ``auto``) and
    where it came from: ``speed`` when a number; ``"auto"``, or None on a GPU, calibrates
    (:func:`calibrate_speed`); None on a CPU, or for a GPU this machine lacks (a dry run
    planned elsewhere), 1."""
    if isinstance(speed, (int, float)):
        return float(speed), "--speed"
    wants_gpu = device.startswith("cuda") or device == "auto"
    if wants_gpu and torch.cuda.is_available():
        return calibrate_speed("cuda" if device == "auto" else device), "calibrated"
    if wants_gpu:
        return 1.0, "no GPU here to calibrate on; pass --speed"
    if speed == "auto":
        return calibrate_speed("cpu"), "calibrated"
    return 1.0, "the reference machine"
