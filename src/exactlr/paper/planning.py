"""A figure at a scale, as the list of runs to do.

:func:`resolve_figure` applies a :class:`~exactlr.paper.scales.Scale`'s rules to a
:class:`~exactlr.paper.figures.FigureSpec` (and to each of its variations) and lists one
:class:`PlannedRun` per method of each row. Runs shared between figures (e.g. ours in
fig1 and fig2) have identical configs, so identical run names and result files.

Three things are called "paper" and are kept apart here: the scale ``Scale.PAPER`` (the
paper's sizes), the method set :data:`FIGURE_METHODS` (``--methods paper``: the figure's
own comparison) and the init preset ``init="paper"`` of :mod:`exactlr.models`.

Example:
    >>> plans = resolve_figure("fig1", "cpu")
    >>> sorted({p.role for p in plans})
    ['ours', 'scheduler']
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass

from exactlr.data import resolve_data_dirs
from exactlr.paper.figures import FigureSpec, Variation, get_figure
from exactlr.paper.lrcache import LRKey
from exactlr.paper.scales import Scale, parse_scale
from exactlr.paper.schedules import MethodSpec, method_specs
from exactlr.paper.training import TrainConfig

__all__ = [
    "FIGURE_METHODS",
    "METHOD_SETS",
    "PlannedRun",
    "parse_methods",
    "resolve_figure",
]

#: The method set of a figure's own comparison (its ``groups``).
FIGURE_METHODS = "paper"
#: Method sets a figure can include (``methods=`` of :func:`resolve_figure`):
#: :data:`FIGURE_METHODS` is the figure's own comparison; the others add the method group
#: of that name (see :func:`exactlr.paper.schedules.method_specs`).
METHOD_SETS: dict[str, str | None] = {
    FIGURE_METHODS: None,
    "parameter-free": "paramfree",
    "lr-finder": "lr_finder",
    "tuned": "tuned",
}


_LAYOUTS = {
    "mnist": "MNIST/raw/train-images-idx3-ubyte[.gz]",
    "cifar10": "cifar-10-batches-py/data_batch_1",
}


def _data_available(dataset: str, data_dir: str | os.PathLike[str] | None) -> bool:
    """Whether the files of ``dataset`` are in a data folder (the synthetic set always)."""
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
    synthetic_fallback: bool


def _scaled(
    spec: FigureSpec,
    var: Variation | None,
    scale: Scale,
    data_dir: str | os.PathLike[str] | None,
    epochs_override: int | None,
) -> _Setting:
    """The setting of one row of ``spec`` at ``scale`` (see each scale's description)."""
    get = (lambda k, d: var.get(k, d)) if var is not None else (lambda k, d: d)
    dataset = get("dataset", spec.dataset)
    subset = get("subset", spec.subset)
    model = get("model", spec.model)
    batch = get("batch_size", spec.batch_size)
    epochs = get("epochs", spec.epochs)
    num_train = spec.num_train
    num_samples = spec.num_samples
    fallback = False
    if not spec.fixed_scale and scale is Scale.CPU:
        # fig5 needs one K_hat per batch size and architecture (BatchNorm's batch
        # statistics make the Hessian depend on the batch size): fewer samples, and
        # half the MNIST images, keep it near an hour (the cost model of
        # exactlr.paper.estimate; docs/reproduction.md).
        num_samples = 2 if spec.name == "fig5" else 5
        if model == "fc5x3000":
            model = "fc5x1000"
        if dataset == "cifar10":  # VGG-9: an epoch of 1,000 images ~60 CPU seconds
            subset, num_train, epochs = "mini", 500, 10
            num_samples = min(num_samples, 3)
            if batch is not None:
                batch = batch // 16 if spec.name == "fig5" else 125
        elif batch is None:  # full-batch mini-MNIST
            num_train, epochs = 2000, max(2, round(epochs * 0.3))
        else:  # mini-batch full MNIST
            num_train = 6000 if spec.name == "fig5" else 12000
            epochs = max(2, round(epochs * 0.2))
            if batch == 5000:
                batch = 2000
    elif not spec.fixed_scale and scale is Scale.SMOKE:
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
        elif data_dir is not None:
            raise FileNotFoundError(
                f"data folder {data_dir} holds no {dataset} files ({_LAYOUTS[dataset]}); "
                "fix the folder, or give none to run the smoke scale on the synthetic set"
            )
        else:
            dataset, subset, fallback = "synthetic", "full", True
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
        synthetic_fallback=fallback,
    )


@dataclass(frozen=True)
class PlannedRun:
    """One training run of a figure, before the ours LR is known. Picklable.

    Attributes:
        figure: Figure name.
        scale: The scale.
        row: Row label (``""`` for figures without variations).
        series: Legend prefix within the row, or None.
        group: Method group the method comes from (``"ours"``, ``"schedulers"``,
            ``"constants"``, ``"paramfree"``, ``"lr_finder"``, ``"tuned"``).
        method: The method's name (as in :func:`exactlr.paper.schedules.method_specs`).
        role: ``"ours"``, ``"ours_variant"`` (x2, /2), ``"scheduler"``, ``"constant"``,
            ``"paramfree"``, ``"lr_finder"`` or ``"tuned"`` (a scheduler at one base LR
            of the tuning grid).
        config: The run's :class:`~exactlr.paper.training.TrainConfig`; for methods that
            depend on the ours LR its ``method.lr`` is a placeholder: use :meth:`resolve`.
        lr_key: The ours-LR cache entry this run depends on.
        paper_ours_lr: The LR the paper's legend shows for ours here (None if none).
        synthetic_fallback: The figure asks for real data but no data folder was given
            and none was found, so the synthetic set stands in (smoke scale only).
    """

    figure: str
    scale: Scale
    row: str
    series: str | None
    group: str
    method: str
    role: str
    config: TrainConfig
    lr_key: LRKey
    paper_ours_lr: float | None
    synthetic_fallback: bool = False

    @property
    def num_samples(self) -> int:
        """Weight samples for K_hat."""
        assert self.lr_key.num_samples is not None
        return self.lr_key.num_samples

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
    """Parses method sets: comma-separated names of :data:`METHOD_SETS`.

    Example:
        >>> parse_methods("paper,parameter-free")
        ('paper', 'parameter-free')

    Raises:
        ValueError: An unknown or empty name, naming the valid ones.
    """
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    valid = ", ".join(METHOD_SETS)
    if not names or any(not n for n in names):
        raise ValueError(f"method sets {text!r}: empty or an empty name; valid: {valid}")
    for name in names:
        if name not in METHOD_SETS:
            raise ValueError(f"unknown method set {name!r}; valid: {valid}")
    return tuple(dict.fromkeys(names))


def _method_groups(spec: FigureSpec, methods: Sequence[str]) -> list[str]:
    """The method groups of the sets ``methods``, in order."""
    groups: list[str] = []
    for name in parse_methods(methods):
        extra = METHOD_SETS[name]
        groups += list(spec.groups) if extra is None else [extra]
    return groups


def _row_runs(
    spec: FigureSpec,
    var: Variation | None,
    setting: _Setting,
    *,
    scale: Scale,
    seed: int,
    groups: Sequence[str],
    curvature_every: int,
) -> list[PlannedRun]:
    """The runs of one row (one variation, or the figure's single row)."""
    run_seed = seed + setting.seed_offset
    runs = []
    for group in groups:
        for method in _group_methods(group, _PLACEHOLDER_LR):
            cfg = TrainConfig(
                dataset=setting.dataset,
                subset=setting.subset,
                model=setting.model,
                method=method,
                epochs=setting.epochs,
                batch_size=setting.batch_size,
                seed=run_seed,
                init=setting.init,
                eps=setting.eps,
                num_train=setting.num_train,
                curvature_every=curvature_every,
                data_seed=seed,
            )
            runs.append(
                PlannedRun(
                    figure=spec.name,
                    scale=scale,
                    row=var.row if var is not None else "",
                    series=var.series if var is not None else None,
                    group=group,
                    method=method.name,
                    role=_role(method, group),
                    config=cfg,
                    lr_key=LRKey.of(cfg, setting.num_samples),
                    paper_ours_lr=(
                        var.paper_ours_lr
                        if var is not None and var.paper_ours_lr is not None
                        else spec.paper_ours_lr
                    ),
                    synthetic_fallback=setting.synthetic_fallback,
                )
            )
    return runs


def resolve_figure(
    name: str,
    scale: str | Scale,
    *,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
    epochs: int | None = None,
    methods: Sequence[str] = (FIGURE_METHODS,),
    curvature_every: int = 0,
) -> list[PlannedRun]:
    """The runs of figure ``name`` at ``scale``.

    Runs shared between figures (e.g. ours in fig1 and fig2) have identical configs and
    so identical run names and result files. Within a figure a run is listed once.

    Args:
        name: Figure name (see :func:`exactlr.paper.figures.figure_names`).
        scale: A :class:`~exactlr.paper.scales.Scale` or its name.
        seed: Base seed: it draws the data (``data_seed``) and, plus a variation's
            ``seed_offset``, the weights w0, the K_hat samples and the batch order. Seed
            0 is the figure as first run; other seeds are its replicates.
        data_dir: Data root. At smoke scale without one, the synthetic set stands in
            when no data folder is found (``PlannedRun.synthetic_fallback``); a given
            folder without the data is an error.
        epochs: Override every run's epoch count (for quick checks of the demo).
        methods: Method sets (:data:`METHOD_SETS`): :data:`FIGURE_METHODS` (the
            figure's own methods), "parameter-free", "lr-finder", "tuned"; each row gets
            all of them.
        curvature_every: Measure the Hessian spectral norm every this many epochs in
            every run (0: never); such runs are named "...__curv{k}".

    Returns:
        The planned runs, row by row.

    Raises:
        ValueError: Unknown figure, scale or method set.
        FileNotFoundError: At smoke scale, ``data_dir`` holds no files of the dataset.
    """
    spec = get_figure(name)
    scale = parse_scale(scale)
    groups = _method_groups(spec, methods)
    if not isinstance(curvature_every, int) or curvature_every < 0:
        raise ValueError(f"curvature_every={curvature_every!r} must be an integer >= 0")
    plans: list[PlannedRun] = []
    seen: set[str] = set()
    for var in spec.variations or (None,):
        setting = _scaled(spec, var, scale, data_dir, epochs)
        for plan in _row_runs(
            spec,
            var,
            setting,
            scale=scale,
            seed=seed,
            groups=groups,
            curvature_every=curvature_every,
        ):
            if plan.run_name not in seen:
                seen.add(plan.run_name)
                plans.append(plan)
    return plans
