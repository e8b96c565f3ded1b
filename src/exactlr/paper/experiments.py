"""The paper's figures as named, scalable configurations, and the grid runner.

Every figure of the paper (PAPER.md section 3) is a :class:`FigureSpec`: data, model,
batch size, epochs, which groups of methods it compares and, for figures 5, 12-16 and
appendix C.5, the *variations* (batch size, training horizon T, Adam's eps, init) drawn
as rows of panels. :func:`resolve_figure` turns a figure and a *scale* into the list of
runs to do, and :func:`run_figure` does them, resumably: a run whose result file exists
is skipped, and the learning rate ``alpha_ours = sqrt(2 L(w0) / (K_hat T))`` is computed
once per (data, model, batch, epochs, init, seed, num_samples) and cached as a file.

Scales (``SCALES``; :func:`describe_scale` says exactly what each reduces):

* ``paper``: the paper's sizes, 100 epochs, K_hat from 20 weight samples (Lanczos).
* ``cpu``: one MNIST figure in well under 30 minutes on 2 CPU cores, widths kept.
* ``smoke``: seconds per figure (a few hundred images, width-32 nets, 2-4 epochs,
  2 K_hat samples), for tests and for checking the plumbing; its numbers mean nothing.

All methods of one figure row start from the same weights ``w0``: the model is built
once per (architecture, data, init, seed) from a ``torch.Generator`` seeded with the
seed, and its ``state_dict`` is copied into every run; each result file records the
SHA-256 of that ``state_dict`` (``extra["w0_sha256"]``) so this can be checked.

Example:
    >>> plans = resolve_figure("fig1", "smoke", data_dir="/nonexistent")
    >>> sorted({p.role for p in plans})
    ['ours', 'scheduler']
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from exactlr.data import ArrayDataset
    from exactlr.paper.schedules import MethodSpec
    from exactlr.paper.training import TrainConfig

__all__ = [
    "FIGURES",
    "GROUPS",
    "METHOD_SETS",
    "SCALES",
    "FigureSpec",
    "PlannedRun",
    "Variation",
    "checkpoint_path",
    "default_checkpoint_every",
    "describe_scale",
    "execute_run",
    "figure_names",
    "get_figure",
    "list_figures",
    "manifest_path",
    "parse_methods",
    "resolve_figure",
    "run_figure",
    "state_dict_sha256",
]

SCALES: tuple[str, ...] = ("smoke", "cpu", "paper")
GROUPS: tuple[str, ...] = ("ours", "schedulers", "constants")
#: Method sets a figure can include (``exactlr run FIG --methods ...``): "paper" is the
#: figure's own comparison; the others add the method group of that name (see
#: :func:`exactlr.paper.schedules.method_specs`).
METHOD_SETS: dict[str, str | None] = {
    "paper": None,
    "parameter-free": "paramfree",
    "lr-finder": "lr_finder",
    "tuned": "tuned",
}

# Seed of the mini-subset draws: the data set is fixed across weight seeds, as in the
# paper (one mini-MNIST), so that seeds vary only w0 and the K_hat samples.
DATA_SEED = 0

# ---------------------------------------------------------------------------------------
# Figure specifications
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variation:
    """One setting of a figure with variations (a legend entry or a row of panels).

    Attributes:
        row: Label of the row of panels this setting is drawn in (e.g. ``"T = 20"``).
        series: Prefix of the legend label inside the row (e.g. ``"Batch size = 256"``),
            or None when the row holds one setting and the methods are the legend.
        overrides: ``(field, value)`` pairs replacing the figure's defaults; fields are
            ``model``, ``dataset``, ``subset``, ``batch_size``, ``epochs``, ``eps``,
            ``init`` and ``seed_offset`` (added to the run seed).
        paper_ours_lr: The LR the paper's legend shows for ours in this setting.
    """

    row: str
    series: str | None = None
    overrides: tuple[tuple[str, Any], ...] = ()
    paper_ours_lr: float | None = None

    def get(self, key: str, default: Any) -> Any:
        """The override for ``key``, else ``default``."""
        return dict(self.overrides).get(key, default)


@dataclass(frozen=True)
class FigureSpec:
    """A figure of the paper at paper scale; :func:`resolve_figure` scales it down.

    Attributes:
        name: Identifier, ``"fig1"`` ... ``"fig16"``, ``"init"`` (appendix C.5), ``"demo"``.
        title: What the figure shows, in words.
        dataset: ``"mnist"``, ``"cifar10"`` or ``"synthetic"``.
        subset: ``"mini"`` (mini-MNIST 5,500/1,000; mini-CIFAR-10 500/100 per class) or
            ``"full"``.
        model: Architecture name for :func:`exactlr.models.build_model`.
        batch_size: Samples per step; None for full batch.
        epochs: Training epochs (T = epochs x batches per epoch).
        groups: Method groups compared: ``"ours"`` (alpha_ours), ``"schedulers"`` (the
            seven schedulers, base LR 0.01), ``"constants"`` (1e-1..1e-5 and ours x2, /2).
        variations: Settings drawn as rows/legend entries (empty: one plain row).
        num_samples: Weight samples N for K_hat at paper scale (Algorithm 2).
        paper_ours_lr: The LR the paper's legend shows for ours (None where it shows
            none or it varies; then see the variations).
        init: Initialisation preset, ``"paper"`` (N(0, sigma) + BatchNorm) or ``"pytorch"``.
        eps: Adam's eps (the paper's rho).
        fixed_scale: For the demo: the sizes are used as they are at every scale.
        num_train: Cap on training samples at every scale (None: all of the subset).
    """

    name: str
    title: str
    dataset: str
    subset: str
    model: str
    batch_size: int | None
    epochs: int
    groups: tuple[str, ...]
    variations: tuple[Variation, ...] = ()
    num_samples: int = 20
    paper_ours_lr: float | None = None
    init: str = "paper"
    eps: float = 1e-8
    fixed_scale: bool = False
    num_train: int | None = None

    @property
    def rows(self) -> list[str]:
        """Row labels in order (one unnamed row when there are no variations)."""
        if not self.variations:
            return [""]
        seen: list[str] = []
        for v in self.variations:
            if v.row not in seen:
                seen.append(v.row)
        return seen


def _horizons(paper_lrs: Sequence[float]) -> tuple[Variation, ...]:
    return tuple(
        Variation(row=f"T = {e} epochs", overrides=(("epochs", e),), paper_ours_lr=lr)
        for e, lr in zip((20, 50, 150), paper_lrs, strict=True)
    )


def _batch_sizes() -> tuple[Variation, ...]:
    archs = (
        ("FC 5x3000, MNIST", "fc5x3000", "mnist"),
        ("LeNet, MNIST", "lenet", "mnist"),
        ("VGG-9, CIFAR-10", "vgg9", "cifar10"),
    )
    return tuple(
        Variation(
            row=row,
            series=f"Batch size = {b}",
            overrides=(("model", model), ("dataset", dataset), ("batch_size", b)),
        )
        for row, model, dataset in archs
        for b in (256, 512, 1024, 2048)
    )


def _eps_values() -> tuple[Variation, ...]:
    return tuple(
        Variation(
            row="rho (Adam eps)",
            series=f"rho = 1e-{k}",
            overrides=(("eps", 10.0**-k),),
            paper_ours_lr=0.015,
        )
        for k in (6, 7, 8, 9)
    )


def _inits() -> tuple[Variation, ...]:
    rows = [
        Variation(
            row=f"paper init (N(0, 0.04) + BN), seed +{k}",
            overrides=(("init", "paper"), ("seed_offset", k)),
        )
        for k in range(3)
    ]
    rows.append(Variation(row="pytorch init (no BN)", overrides=(("init", "pytorch"),)))
    return tuple(rows)


_SCHED = ("ours", "schedulers")
_CONST = ("ours", "constants")

FIGURES: dict[str, FigureSpec] = {
    spec.name: spec
    for spec in (
        FigureSpec("fig1", "FC 3x1000, mini-MNIST, full batch: ours vs schedulers",
                   "mnist", "mini", "fc3x1000", None, 100, _SCHED, paper_ours_lr=0.045),
        FigureSpec("fig2", "FC 3x1000, mini-MNIST, full batch: ours vs constant LRs",
                   "mnist", "mini", "fc3x1000", None, 100, _CONST, paper_ours_lr=0.046),
        FigureSpec("fig3", "FC 3x1000, MNIST, batch 5000: ours vs schedulers",
                   "mnist", "full", "fc3x1000", 5000, 100, _SCHED, paper_ours_lr=0.012),
        FigureSpec("fig4", "FC 1x1000, MNIST, batch 5000: ours vs constant LRs",
                   "mnist", "full", "fc1x1000", 5000, 100, _CONST, paper_ours_lr=0.014),
        FigureSpec("fig5", "Ours with batch sizes 256..2048: FC 5x3000 / LeNet on MNIST, "
                   "VGG-9 on CIFAR-10", "mnist", "full", "fc5x3000", 256, 100, ("ours",),
                   variations=_batch_sizes()),
        FigureSpec("fig6", "LeNet, mini-MNIST, full batch: ours vs schedulers",
                   "mnist", "mini", "lenet", None, 100, _SCHED, paper_ours_lr=0.044),
        FigureSpec("fig7", "LeNet, MNIST, batch 5000: ours vs schedulers",
                   "mnist", "full", "lenet", 5000, 100, _SCHED, paper_ours_lr=0.013),
        FigureSpec("fig8", "LeNet, MNIST, batch 5000: ours vs constant LRs",
                   "mnist", "full", "lenet", 5000, 100, _CONST, paper_ours_lr=0.011),
        FigureSpec("fig9", "LeNet, mini-MNIST, full batch: ours vs constant LRs",
                   "mnist", "mini", "lenet", None, 100, _CONST, paper_ours_lr=0.039),
        FigureSpec("fig10", "VGG-9, CIFAR-10, batch 2500: ours vs schedulers",
                   "cifar10", "full", "vgg9", 2500, 100, _SCHED),
        FigureSpec("fig11", "VGG-9, CIFAR-10, batch 2500: ours vs constant LRs",
                   "cifar10", "full", "vgg9", 2500, 100, _CONST, paper_ours_lr=0.002),
        FigureSpec("fig12", "LeNet, mini-MNIST, full batch, T = 20/50/150: ours vs schedulers",
                   "mnist", "mini", "lenet", None, 100, _SCHED,
                   variations=_horizons((0.096, 0.051, 0.031))),
        FigureSpec("fig13", "LeNet, MNIST, batch 5000, T = 20/50/150: ours vs schedulers",
                   "mnist", "full", "lenet", 5000, 100, _SCHED,
                   variations=_horizons((0.028, 0.017, 0.011))),
        FigureSpec("fig14", "LeNet, mini-MNIST, full batch, T = 20/50/150: ours vs constants",
                   "mnist", "mini", "lenet", None, 100, _CONST,
                   variations=_horizons((0.096, 0.051, 0.031))),
        FigureSpec("fig15", "LeNet, MNIST, batch 5000, T = 20/50/150: ours vs constants",
                   "mnist", "full", "lenet", 5000, 100, _CONST,
                   variations=_horizons((0.028, 0.017, 0.011))),
        FigureSpec("fig16", "LeNet, MNIST, batch 5000: ours with rho (Adam eps) 1e-6..1e-9",
                   "mnist", "full", "lenet", 5000, 100, ("ours",), variations=_eps_values(),
                   paper_ours_lr=0.015),
        FigureSpec("init", "Appendix C.5: FC 3x1000, mini-MNIST, full batch, ours vs "
                   "schedulers under the paper init (3 seeds) and PyTorch's default init",
                   "mnist", "mini", "fc3x1000", None, 100, _SCHED, variations=_inits()),
    )
}  # fmt: skip

#: The README's main job: fig1/fig2 together on embedded synthetic data, small and fast.
DEMO = FigureSpec(
    "demo",
    "Demo: FC 2x128 on synthetic data (2,000 samples), full batch: ours vs the 7 "
    "schedulers and the constant LRs 1e-1..1e-5, ours x2, ours /2",
    "synthetic",
    "full",
    "fc2x128",
    None,
    40,
    ("ours", "schedulers", "constants"),
    num_samples=5,
    fixed_scale=True,
    num_train=2000,
)


def figure_names(*, include_demo: bool = True) -> list[str]:
    """Valid figure names, in paper order (then ``demo``)."""
    return [*FIGURES, *(["demo"] if include_demo else [])]


def get_figure(name: str) -> FigureSpec:
    """The :class:`FigureSpec` called ``name``.

    Raises:
        ValueError: Unknown name (the message lists the valid ones).
    """
    if name == "demo":
        return DEMO
    if name not in FIGURES:
        raise ValueError(f"unknown figure {name!r}; valid figures: {', '.join(figure_names())}")
    return FIGURES[name]


def _check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid scales: {', '.join(SCALES)}")


# ---------------------------------------------------------------------------------------
# Scales
# ---------------------------------------------------------------------------------------

_SCALE_TEXT = {
    "paper": (
        "the paper's sizes: mini-MNIST 5,500/1,000 and full MNIST / CIFAR-10, widths as in "
        "the paper, batch sizes as in the paper, 100 epochs (T = 20/50/150 where varied), "
        "K_hat from 20 weight samples (Lanczos, full-data Hessian)"
    ),
    "cpu": (
        "reduced for 2 CPU cores, widths kept except FC 5x3000 -> FC 5x1000: "
        "full-batch mini-MNIST runs use 2,000 of the 5,500 training images (test: the 1,000 "
        "mini-MNIST test images) and 30% of the epochs (100 -> 30; T = 20/50/150 -> "
        "6/15/45); mini-batch MNIST runs use 12,000 training images (test: all 10,000), "
        "batch 5000 -> 2000 and 20% of the epochs (100 -> 20; T -> 4/10/30); CIFAR-10 "
        "runs use mini-CIFAR-10 with 1,000 training images (test: 1,000), batch 2500 -> "
        "250, 10 epochs; fig5 batch sizes 256..2048 are kept on MNIST (12,000 images) and "
        "divided by 8 (32..256) for VGG-9; K_hat from 5 weight samples"
    ),
    "smoke": (
        "plumbing check only (numbers mean nothing): 256 training images of mini-MNIST "
        "(200 of mini-CIFAR-10) and the first 500 test images when the data folder exists, "
        "else the synthetic set; FC "
        "widths -> 32, VGG-9 -> LeNet, 3 epochs (T = 20/50/150 -> 2/3/4), mini-batches of "
        "64 (fig5: 16..128), K_hat from 2 weight samples (Lanczos capped at 6 iterations), "
        "one CPU thread"
    ),
}


def describe_scale(scale: str) -> str:
    """What ``scale`` changes relative to the paper, in words.

    Raises:
        ValueError: Unknown scale.
    """
    _check_scale(scale)
    return _SCALE_TEXT[scale]


def _data_available(dataset: str, data_dir: str | os.PathLike[str] | None) -> bool:
    from exactlr.data import resolve_data_dirs

    if dataset == "synthetic":
        return True
    for root in resolve_data_dirs(data_dir):
        if dataset == "mnist":
            raw = root / "MNIST" / "raw"
            if any(
                (raw / n).is_file()
                for n in ("train-images-idx3-ubyte", "train-images-idx3-ubyte.gz")
            ):
                return True
        elif (root / "cifar-10-batches-py" / "data_batch_1").is_file():
            return True
    return False


def _fc_width(model: str, width: int) -> str:
    depth = model[2:].split("x")[0]
    return f"fc{depth}x{width}"


@dataclass(frozen=True)
class _Setting:
    dataset: str
    subset: str
    num_train: int | None
    model: str
    batch_size: int | None
    epochs: int
    eps: float
    init: str
    seed_offset: int
    num_samples: int


def _scaled(
    spec: FigureSpec,
    var: Variation | None,
    scale: str,
    data_dir: str | os.PathLike[str] | None,
    epochs_override: int | None,
) -> _Setting:
    get = (lambda k, d: var.get(k, d)) if var is not None else (lambda k, d: d)
    dataset = get("dataset", spec.dataset)
    subset = get("subset", spec.subset)
    model = get("model", spec.model)
    batch = get("batch_size", spec.batch_size)
    epochs = get("epochs", spec.epochs)
    num_train = spec.num_train
    num_samples = spec.num_samples
    if not spec.fixed_scale and scale == "cpu":
        num_samples = 5
        if model == "fc5x3000":
            model = "fc5x1000"
        if dataset == "cifar10":
            subset, num_train, epochs = "mini", 1000, 10
            if batch is not None:
                batch = batch // 8 if spec.name == "fig5" else 250
        elif batch is None:  # full-batch mini-MNIST
            num_train, epochs = 2000, max(2, round(epochs * 0.3))
        else:  # mini-batch full MNIST
            num_train, epochs = 12000, max(2, round(epochs * 0.2))
            if batch == 5000:
                batch = 2000
    elif not spec.fixed_scale and scale == "smoke":
        num_samples = 2
        if model.startswith("fc"):
            model = _fc_width(model, 32)
        elif model == "vgg9":
            model = "lenet"
        epochs = {20: 2, 50: 3, 150: 4}.get(epochs, 3)
        if batch is not None:
            batch = batch // 16 if spec.name == "fig5" else 64
        num_train = 200 if dataset == "cifar10" else 256
        if _data_available(dataset, data_dir):
            subset = "mini"
        else:
            dataset, subset = "synthetic", "full"
    if epochs_override is not None:
        epochs = epochs_override
    return _Setting(
        dataset=dataset,
        subset=subset,
        num_train=num_train,
        model=model,
        batch_size=batch,
        epochs=int(epochs),
        eps=float(get("eps", spec.eps)),
        init=get("init", spec.init),
        seed_offset=int(get("seed_offset", 0)),
        num_samples=num_samples,
    )


# ---------------------------------------------------------------------------------------
# Planned runs
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedRun:
    """One training run of a figure, before the ours LR is known. Picklable.

    Attributes:
        figure: Figure name.
        scale: Scale name.
        row: Row label (``""`` for figures without variations).
        series: Legend prefix within the row, or None.
        group: Method group the method comes from (``"ours"``, ``"schedulers"``,
            ``"constants"``, ``"paramfree"``, ``"lr_finder"``, ``"tuned"``).
        method: The method's name (as in :func:`exactlr.paper.schedules.method_specs`).
        role: ``"ours"``, ``"ours_variant"`` (x2, /2), ``"scheduler"``, ``"constant"``,
            ``"paramfree"``, ``"lr_finder"`` or ``"tuned"`` (a scheduler at one base LR
            of the tuning grid).
        config: The run's :class:`~exactlr.paper.training.TrainConfig`; for methods that depend
            on the ours LR its ``method.lr`` is a placeholder: use :meth:`resolve`.
        lr_key: Key of the ours-LR cache entry this run depends on.
        num_samples: Weight samples for K_hat.
        paper_ours_lr: The LR the paper's legend shows for ours here (None if none).
    """

    figure: str
    scale: str
    row: str
    series: str | None
    group: str
    method: str
    role: str
    config: TrainConfig
    lr_key: str
    num_samples: int
    paper_ours_lr: float | None

    @property
    def run_name(self) -> str:
        """The run's name (also its result file's stem)."""
        return self.config.run_name()

    def resolve(self, ours_lr: float, finder_lr: float | None = None) -> TrainConfig:
        """The config with the method's LR computed from ``ours_lr`` (or, for the LR
        finder, set to the range test's ``finder_lr``)."""
        method = _method_by_name(self.group, self.method, ours_lr, finder_lr)
        return dataclasses.replace(self.config, method=method)

    def legend(self, label: str) -> str:
        """Legend text: the series prefix (if any) and the method label."""
        return f"{self.series}: {label}" if self.series else label


# A stand-in for alpha_ours while planning; run names do not depend on LR values.
_PLACEHOLDER_LR = 0.01


def _group_methods(group: str, ours_lr: float, finder_lr: float | None = None) -> list[MethodSpec]:
    from exactlr.paper.schedules import method_specs

    if group == "lr_finder" and finder_lr is None:
        finder_lr = _PLACEHOLDER_LR  # planning: run names do not depend on it
    return list(method_specs(group, ours_lr, finder_lr=finder_lr))


def _method_by_name(
    group: str, name: str, ours_lr: float, finder_lr: float | None = None
) -> MethodSpec:
    if group == "lr_finder" and finder_lr is None:
        raise ValueError(f"method {name!r} needs the LR range test's suggestion")
    for method in _group_methods(group, ours_lr, finder_lr):
        if method.name == name:
            return method
    raise ValueError(f"method {name!r} is not in group {group!r}")


def _role(method: MethodSpec, group: str) -> str:
    if method.kind == "ours":
        return "ours" if method.name == "ours" else "ours_variant"
    if group == "tuned":
        return "tuned"
    return method.kind  # "scheduler", "constant", "paramfree" or "lr_finder"


def parse_methods(text: str | Sequence[str]) -> tuple[str, ...]:
    """Parses ``--methods``: comma-separated names of :data:`METHOD_SETS`.

    Example:
        >>> parse_methods("paper,parameter-free")
        ('paper', 'parameter-free')

    Raises:
        ValueError: An unknown or empty name, naming the valid ones.
    """
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    valid = ", ".join(METHOD_SETS)
    if not names or any(not n for n in names):
        raise ValueError(f"--methods {text!r} is empty or has an empty name; valid: {valid}")
    for name in names:
        if name not in METHOD_SETS:
            raise ValueError(f"unknown method set {name!r} in --methods; valid: {valid}")
    return tuple(dict.fromkeys(names))


def _lr_key(s: _Setting, seed: int) -> str:
    data = f"{s.dataset}-{s.subset}" + (f"-n{s.num_train}" if s.num_train else "")
    batch = "full" if s.batch_size is None else str(s.batch_size)
    # eps is not in the key: the practical rule drops delta^2 = gamma^2 / rho^2, so the
    # LR does not depend on rho (the paper's fig16 legend shows 0.015 for every rho).
    return f"{data}__{s.model}__{s.init}__b{batch}__e{s.epochs}__seed{seed}__k{s.num_samples}"


def _smoothness_key(lr_key: str) -> str:
    """The ours-LR key without the horizon: K_hat and L(w0) do not depend on T."""
    return re.sub(r"__e\d+__", "__", lr_key)


def resolve_figure(
    name: str,
    scale: str,
    *,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
    epochs: int | None = None,
    methods: Sequence[str] = ("paper",),
    curvature_every: int = 0,
) -> list[PlannedRun]:
    """The runs of figure ``name`` at ``scale``.

    Runs shared between figures (e.g. ours in fig1 and fig2) have identical configs and
    so identical run names and result files. Within a figure a run is listed once.

    Args:
        name: Figure name (see :func:`figure_names`).
        scale: ``"smoke"``, ``"cpu"`` or ``"paper"``.
        seed: Base seed (weights w0, K_hat samples, batch order).
        data_dir: Data root; at smoke scale, decides between real and synthetic data.
        epochs: Override every run's epoch count (for quick checks of the demo).
        methods: Method sets (:data:`METHOD_SETS`): "paper" (the figure's own methods),
            "parameter-free", "lr-finder", "tuned"; each row gets all of them.
        curvature_every: Measure the Hessian spectral norm every this many epochs in
            every run (0: never); such runs are named "...__curv{k}".

    Returns:
        The planned runs, row by row.

    Raises:
        ValueError: Unknown figure, scale or method set.
    """
    from exactlr.paper.training import TrainConfig

    spec = get_figure(name)
    _check_scale(scale)
    sets = parse_methods(methods)
    groups: list[str] = []
    for name_ in sets:
        extra = METHOD_SETS[name_]
        groups += list(spec.groups) if extra is None else [extra]
    if not isinstance(curvature_every, int) or curvature_every < 0:
        raise ValueError(f"curvature_every={curvature_every!r} must be an integer >= 0")
    plans: list[PlannedRun] = []
    seen: set[str] = set()
    for var in spec.variations or (None,):
        s = _scaled(spec, var, scale, data_dir, epochs)
        run_seed = seed + s.seed_offset
        key = _lr_key(s, run_seed)
        for group in groups:
            for method in _group_methods(group, _PLACEHOLDER_LR):
                cfg = TrainConfig(
                    dataset=s.dataset,
                    subset=s.subset,
                    model=s.model,
                    method=method,
                    epochs=s.epochs,
                    batch_size=s.batch_size,
                    seed=run_seed,
                    init=s.init,
                    eps=s.eps,
                    num_train=s.num_train,
                    curvature_every=curvature_every,
                )
                run_name = cfg.run_name()
                if run_name in seen:
                    continue
                seen.add(run_name)
                plans.append(
                    PlannedRun(
                        figure=spec.name,
                        scale=scale,
                        row=var.row if var is not None else "",
                        series=var.series if var is not None else None,
                        group=group,
                        method=method.name,
                        role=_role(method, group),
                        config=cfg,
                        lr_key=key,
                        num_samples=s.num_samples,
                        paper_ours_lr=(
                            var.paper_ours_lr
                            if var is not None and var.paper_ours_lr is not None
                            else spec.paper_ours_lr
                        ),
                    )
                )
    return plans


# ---------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over a state_dict's names, dtypes, shapes and values (CPU bytes)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def manifest_path(out_dir: str | os.PathLike[str], name: str, scale: str) -> Path:
    """``out_dir/figures/<name>-<scale>.json``: the list of a figure's runs."""
    return Path(out_dir) / "figures" / f"{name}-{scale}.json"


def _lr_cache_path(out_dir: Path, key: str) -> Path:
    return out_dir / "lr" / f"{key}.json"


def _load_data(
    cfg: TrainConfig, data_dir: str | os.PathLike[str] | None, scale: str
) -> tuple[ArrayDataset, ArrayDataset]:
    from exactlr.data import ArrayDataset, load_dataset

    train, test = load_dataset(cfg.dataset, subset=cfg.subset, data_dir=data_dir, seed=DATA_SEED)
    if cfg.num_train is not None and cfg.num_train < len(train):
        # The first num_train samples, as TrainConfig.num_train defines (train_run does the
        # same); K_hat and L(w0) must see exactly the training data.
        n = cfg.num_train
        train = ArrayDataset(train.inputs[:n], train.targets[:n], train.num_classes, train.name)
    if scale == "smoke" and len(test) > SMOKE_NUM_TEST:
        n = SMOKE_NUM_TEST
        test = ArrayDataset(test.inputs[:n], test.targets[:n], test.num_classes, test.name)
    return train, test


def _build_w0(cfg: TrainConfig) -> torch.nn.Module:
    from exactlr.models import build_model

    generator = torch.Generator().manual_seed(cfg.seed)
    return build_model(cfg.model, dataset=cfg.dataset, init=cfg.init, generator=generator)


# Solver settings per scale: smoke only checks the plumbing, so a loose tolerance.
_K_OPTIONS: dict[str, dict[str, Any]] = {"smoke": {"tol": 1e-2, "max_iters": 6}}

#: Test images used at smoke scale (the first ones of the test set); other scales: all.
SMOKE_NUM_TEST = 500


def _compute_ours(
    plan: PlannedRun,
    model: torch.nn.Module,
    train: ArrayDataset,
    out_dir: Path,
    device: torch.device,
    progress: bool,
) -> dict[str, Any]:
    """alpha_ours for ``plan``'s setting, from the cache file or computed and cached."""
    import torch.nn.functional as F

    from exactlr.data import make_batches
    from exactlr.paper.results import write_json_atomic
    from exactlr.stepsize import exact_step_size, suggest_lr

    path = _lr_cache_path(out_dir, plan.lr_key)
    if path.is_file():
        return json.loads(path.read_text())
    cfg = plan.config
    batches = make_batches(train.to(device), cfg.batch_size)
    total_steps = cfg.epochs * len(batches)
    # Figures that vary T (fig12-15) share one K_hat estimate: only alpha depends on T.
    for other in sorted(path.parent.glob("*.json")) if path.parent.is_dir() else []:
        cached = json.loads(other.read_text())
        if _smoothness_key(cached.get("key", "")) == _smoothness_key(plan.lr_key):
            entry = dict(cached)
            entry.update(
                key=plan.lr_key,
                lr=exact_step_size(cached["initial_loss"], cached["k_hat"], total_steps),
                total_steps=total_steps,
                epochs=cfg.epochs,
                reused_from=cached["key"],
            )
            write_json_atomic(path, entry)
            return entry
    start = time.perf_counter()
    suggestion = suggest_lr(
        copy.deepcopy(model).to(device),
        F.cross_entropy,
        batches,
        total_steps=total_steps,
        num_samples=plan.num_samples,
        generator=torch.Generator().manual_seed(cfg.seed + 1),
        progress=progress,
        method="lanczos",
        **_K_OPTIONS.get(plan.scale, {}),
    )
    est = suggestion.estimate
    entry = {
        "key": plan.lr_key,
        "lr": suggestion.lr,
        "k_hat": suggestion.k_hat,
        "initial_loss": suggestion.initial_loss,
        "total_steps": total_steps,
        "epochs": cfg.epochs,
        "batches_per_epoch": len(batches),
        "num_train": len(train),
        "num_samples": plan.num_samples,
        "samples": list(est.samples),
        "running_max": list(est.running_max),
        "records": [dataclasses.asdict(r) for r in est.records],
        "variant": est.variant,
        "seconds": time.perf_counter() - start,
        "device": str(device),
    }
    write_json_atomic(path, entry)
    return entry


def _finder_key(lr_key: str) -> str:
    """The LR finder's cache key: the ours-LR key without horizon and K_hat samples."""
    return re.sub(r"__k\d+$", "", _smoothness_key(lr_key))


def _compute_finder(
    plan: PlannedRun,
    model: torch.nn.Module,
    train: ArrayDataset,
    out_dir: Path,
    device: torch.device,
) -> dict[str, Any]:
    """The LR range test's suggestion for ``plan``'s setting, cached in
    ``out_dir/lr_finder/<key>.json`` (it does not depend on the horizon T)."""
    from exactlr.paper.lrfinder import lr_range_test
    from exactlr.paper.results import write_json_atomic

    key = _finder_key(plan.lr_key)
    path = out_dir / "lr_finder" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    cfg = plan.config
    result = lr_range_test(
        model,
        train,
        batch_size=cfg.batch_size,
        betas=cfg.betas,
        eps=cfg.eps,
        seed=cfg.seed,
        device=device,
    )
    entry = {
        "key": key,
        "lr": result.suggestion,
        "steps": result.steps,
        "diverged": result.diverged,
        "gradient_equivalents": result.gradient_equivalents,
        "seconds": result.seconds,
        "lrs": result.lrs,
        "losses": result.losses,
        "batch_size": cfg.batch_size,
        "num_train": len(train),
        "device": str(device),
    }
    write_json_atomic(path, entry)
    return entry


def checkpoint_path(out_dir: str | os.PathLike[str], run_name: str) -> Path:
    """``out_dir/checkpoints/<run_name>.pt``: a run's checkpoint while it trains."""
    return Path(out_dir) / "checkpoints" / f"{run_name}.pt"


def default_checkpoint_every(scale: str, *, fixed_scale: bool = False) -> int:
    """Epochs between checkpoints: 5 at the ``cpu`` and ``paper`` scales, else 0 (none).

    Smoke runs and the demo take seconds, so checkpoints would cost more than they save.
    """
    return 0 if scale == "smoke" or fixed_scale else 5


def execute_run(
    plan: PlannedRun,
    *,
    ours: Mapping[str, Any],
    w0_state: Mapping[str, torch.Tensor],
    train: ArrayDataset,
    test: ArrayDataset,
    out_dir: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    progress: bool = False,
    checkpoint_every: int = 0,
) -> Path:
    """Trains one planned run from ``w0_state`` and saves its result file.

    Every input is picklable, so this can run in another process (e.g. a Ray task).
    With ``checkpoint_every > 0`` the run checkpoints to :func:`checkpoint_path` every
    that many epochs and resumes from an existing checkpoint of the same run (also with
    ``checkpoint_every = 0``); the checkpoint is deleted once the result file is saved.

    Args:
        plan: The run.
        ours: The ours-LR cache entry (``lr``, ``k_hat``, ``initial_loss``, ...); for
            an ``"lr_finder"`` run also ``finder``, the range test's cache entry.
        w0_state: The initial weights shared by all methods of the row.
        train: Training data (already capped to ``num_train``).
        test: Test data.
        out_dir: Results root.
        device: Torch device.
        progress: Show the training loop's own progress bar.
        checkpoint_every: Epochs between checkpoints (0: none).

    Returns:
        The result file's path.
    """
    from exactlr.paper.results import result_path, save_result
    from exactlr.paper.training import train_run

    device = torch.device(device)
    finder = ours.get("finder") if plan.group == "lr_finder" else None
    cfg = plan.resolve(float(ours["lr"]), float(finder["lr"]) if finder else None)
    model = _build_w0(cfg)
    model.load_state_dict(w0_state)
    ckpt = checkpoint_path(out_dir, cfg.run_name())
    result = train_run(
        cfg,
        model.to(device),
        train,
        test,
        device=device,
        progress=progress,
        checkpoint_path=ckpt,
        checkpoint_every=checkpoint_every,
    )
    path = result_path(Path(out_dir), cfg)
    extra = {
        "figure": plan.figure,
        "scale": plan.scale,
        "row": plan.row,
        "series": plan.series,
        "group": plan.group,
        "role": plan.role,
        "method": plan.method,
        "label": cfg.method.label,
        "legend": plan.legend(cfg.method.label),
        "lr": cfg.method.lr,
        "paper_ours_lr": plan.paper_ours_lr,
        "w0_sha256": state_dict_sha256(w0_state),
        "ours": {k: ours[k] for k in ("key", "lr", "k_hat", "initial_loss", "total_steps")},
    }
    if finder:
        extra["finder"] = {
            k: finder[k] for k in ("key", "lr", "steps", "gradient_equivalents", "seconds")
        }
    save_result(path, result, extra=extra)
    ckpt.unlink(missing_ok=True)  # only now: a crash before the save resumes from it
    return path


def _manifest_entry(plan: PlannedRun, out_dir: Path) -> dict[str, Any]:
    from exactlr.paper.results import result_path

    return {
        "run_name": plan.run_name,
        "path": str(result_path(out_dir, plan.config).relative_to(out_dir)),
        "row": plan.row,
        "series": plan.series,
        "group": plan.group,
        "method": plan.method,
        "role": plan.role,
        "lr_key": plan.lr_key,
        "paper_ours_lr": plan.paper_ours_lr,
    }


def _write_manifest(
    out_dir: Path, spec: FigureSpec, scale: str, seed: int, plans: Sequence[PlannedRun]
) -> Path:
    from exactlr.paper.results import write_json_atomic

    path = manifest_path(out_dir, spec.name, scale)
    entries = [_manifest_entry(p, out_dir) for p in plans]

    # Keep the runs of earlier calls with other method sets (e.g. `--methods tuned`),
    # unless this call plans the same method of the same row again. A paper scheduler
    # planned again only as a point of the tuning grid keeps its paper role.
    def key(e: dict[str, Any]) -> tuple[Any, ...]:
        return (e.get("row"), e.get("series"), e.get("method"))

    planned = {key(e): i for i, e in enumerate(entries)}
    if path.is_file():
        try:
            previous = json.loads(path.read_text(encoding="utf-8")).get("runs", [])
        except (json.JSONDecodeError, AttributeError):
            previous = []  # a corrupt manifest is rewritten from this call's plans
        for old in previous:
            if not isinstance(old, dict):
                continue
            index = planned.get(key(old))
            if index is None:
                entries.append(old)
            elif entries[index]["group"] == "tuned" and old.get("group") != "tuned":
                entries[index] = {
                    **entries[index],
                    "group": old.get("group"),
                    "role": old.get("role"),
                }
    write_json_atomic(
        path,
        {
            "figure": spec.name,
            "title": spec.title,
            "scale": scale,
            "scale_description": describe_scale(scale)
            if not spec.fixed_scale
            else "fixed size (the demo)",
            "seed": seed,
            "paper_ours_lr": spec.paper_ours_lr,
            "rows": spec.rows,
            "runs": entries,
        },
    )
    return path


def run_figure(
    name: str,
    *,
    scale: str,
    out_dir: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    executor: str = "local",
    epochs: int | None = None,
    runner: Callable[..., Path] | None = None,
    checkpoint_every: int | None = None,
    methods: Sequence[str] = ("paper",),
    curvature_every: int = 0,
) -> list[Path]:
    """Runs (or resumes) every run of a figure and writes its manifest.

    Data are loaded once per setting; the model is built once per (architecture, data,
    init, seed) so every method of a row starts from the same ``w0``; alpha_ours is
    computed once per setting and cached in ``out_dir/lr/<key>.json``. Runs whose result
    file is finished are skipped, so rerunning resumes.

    Args:
        name: Figure name (see :func:`figure_names`).
        scale: ``"smoke"``, ``"cpu"`` or ``"paper"``.
        out_dir: Results root (``runs/``, ``lr/``, ``figures/`` are created inside).
        device: Torch device for training and K_hat.
        seed: Base seed.
        data_dir: Data root (default search: ``$EXACTLR_DATA``, ``./data``, ...).
        progress: Show a progress bar over runs (and K_hat samples).
        executor: ``"local"`` (runs one after another in this process).
        epochs: Override every run's epoch count.
        runner: Replaces :func:`execute_run` (same signature); for tests and executors.
        checkpoint_every: Epochs between a run's checkpoints (``out_dir/checkpoints``);
            None: :func:`default_checkpoint_every` (5 at cpu/paper scale); 0: none.
        methods: Method sets to run (:data:`METHOD_SETS`, default the paper's own). The
            manifest keeps the runs of earlier calls with other sets, so that
            ``--methods tuned`` after a plain run reports both.
        curvature_every: Hessian spectral norm every this many epochs in every run.

    Returns:
        The result file of every run of the figure, in plan order.

    Raises:
        ValueError: Unknown figure, scale or executor; ``out_dir`` is a file or cannot
            be created; a negative ``checkpoint_every``.
        FileNotFoundError: The data files are missing.
    """
    from exactlr.paper.results import is_finished, result_path

    if executor != "local":
        raise ValueError(f"unknown executor {executor!r}; valid executors: local")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a folder")
    if checkpoint_every is not None and checkpoint_every < 0:
        raise ValueError(f"checkpoint_every={checkpoint_every} must be >= 0 (0: none)")
    spec = get_figure(name)
    plans = resolve_figure(
        name,
        scale,
        seed=seed,
        data_dir=data_dir,
        epochs=epochs,
        methods=methods,
        curvature_every=curvature_every,
    )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"--out {out} cannot be created ({err.strerror or err}); choose a writable folder"
        ) from err
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out} is not writable; choose a writable folder")
    if checkpoint_every is None:
        checkpoint_every = default_checkpoint_every(scale, fixed_scale=spec.fixed_scale)
    torch_device = torch.device(device)
    run = runner or execute_run
    _write_manifest(out, spec, scale, seed, plans)

    data_cache: dict[tuple[Any, ...], tuple[ArrayDataset, ArrayDataset]] = {}
    w0_cache: dict[tuple[Any, ...], tuple[torch.nn.Module, dict[str, torch.Tensor]]] = {}
    ours_cache: dict[str, dict[str, Any]] = {}
    finder_cache: dict[str, dict[str, Any]] = {}
    paths: list[Path] = []
    bar = _progress_bar(len(plans), f"{name} ({scale})", enabled=progress)
    threads = torch.get_num_threads()
    if (scale == "smoke" or spec.fixed_scale) and torch_device.type == "cpu":
        # Smoke and demo tensors are small: with several threads, OpenMP's spin-waiting
        # costs far more than the work (measured 20x slower on a busy 2-core machine).
        torch.set_num_threads(1)
    try:
        for plan in plans:
            cfg = plan.config
            path = result_path(out, cfg)
            paths.append(path)
            if is_finished(path):
                bar.update(1)
                continue
            bar.set_postfix_str(f"{plan.row + ' ' if plan.row else ''}{plan.method}")
            data_key = (cfg.dataset, cfg.subset, cfg.num_train)
            if data_key not in data_cache:
                data_cache[data_key] = _load_data(cfg, data_dir, scale)
            train, test = data_cache[data_key]
            w0_key = (cfg.model, cfg.dataset, cfg.init, cfg.seed)
            if w0_key not in w0_cache:
                model = _build_w0(cfg)
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                w0_cache[w0_key] = (model, state)
            model, state = w0_cache[w0_key]
            if plan.lr_key not in ours_cache:
                ours_cache[plan.lr_key] = _compute_ours(
                    plan, model, train, out, torch_device, progress
                )
            ours = ours_cache[plan.lr_key]
            if plan.group == "lr_finder":
                finder_key = _finder_key(plan.lr_key)
                if finder_key not in finder_cache:
                    finder_cache[finder_key] = _compute_finder(
                        plan, model, train, out, torch_device
                    )
                ours = {**ours, "finder": finder_cache[finder_key]}
            run(
                plan,
                ours=ours,
                w0_state=state,
                train=train,
                test=test,
                out_dir=out,
                device=torch_device,
                progress=False,
                checkpoint_every=checkpoint_every,
            )
            bar.update(1)
    finally:
        bar.close()
        torch.set_num_threads(threads)
    return paths


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, desc: str, *, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is an optional dependency
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="run")


# ---------------------------------------------------------------------------------------
# Listing
# ---------------------------------------------------------------------------------------


def list_figures() -> str:
    """A plain-text table of the figures, their titles and the scales."""
    lines = [f"{'figure':<7} {'runs':>4}  title"]
    for name in figure_names():
        spec = get_figure(name)
        per_row = sum({"ours": 1, "schedulers": 7, "constants": 7}.get(g, 0) for g in spec.groups)
        runs = per_row * max(1, len(spec.variations))
        lines.append(f"{name:<7} {runs:>4}  {spec.title}")
    lines.append("")
    lines.append("scales (--scale):")
    for scale in SCALES:
        lines.append(f"  {scale}: {describe_scale(scale)}")
    lines.append("  (the demo has one fixed size at every scale)")
    return "\n".join(lines)
