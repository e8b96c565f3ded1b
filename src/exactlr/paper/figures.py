"""The paper's figures as named configurations at the paper's sizes.

Every figure of the paper (PAPER.md section 3) is a :class:`FigureSpec`: data, model,
batch size, epochs, which groups of methods it compares and, for figures 5, 12-16 and
appendix C.5, the *variations* (batch size, training horizon T, Adam's eps, init) drawn
as rows of panels. :func:`exactlr.paper.planning.resolve_figure` scales a figure down to
a :class:`~exactlr.paper.scales.Scale` and lists its runs.

Example:
    >>> get_figure("fig1").paper_ours_lr
    0.045
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from exactlr.paper.scales import Scale

__all__ = [
    "DEMO",
    "FIGURES",
    "GROUPS",
    "FigureSpec",
    "Variation",
    "figure_names",
    "get_figure",
    "list_figures",
]

#: Method groups a figure compares (see :func:`exactlr.paper.schedules.method_specs`).
GROUPS: tuple[str, ...] = ("ours", "schedulers", "constants")


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
    for scale in Scale:
        lines.append(f"  {scale}: {scale.description}")
    lines.append("  (the demo has one fixed size at every scale)")
    return "\n".join(lines)
