"""Running a figure: its runs, resumably, and its manifest.

:func:`run_figure` plans a figure (:func:`exactlr.paper.planning.resolve_figure`), writes
its manifest, and does every run whose result file is not finished yet, so rerunning
resumes. All methods of one figure row start from the same weights ``w0``: the model is
built once per (architecture, data, init, seed) from a ``torch.Generator`` seeded with
the seed, and its ``state_dict`` is copied into every run; each result file records the
SHA-256 of that ``state_dict`` (``extra["w0_sha256"]``) so this can be checked.
:func:`execute_run` does one run and is what an executor (e.g. Ray) calls elsewhere.

Example:
    >>> paths = run_figure("fig1", scale="smoke", out_dir="results")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from exactlr.data import ArrayDataset, load_dataset
from exactlr.models import build_model
from exactlr.paper.figures import FigureSpec, get_figure
from exactlr.paper.lrcache import LRKey, finder_entry, ours_entry
from exactlr.paper.planning import FIGURE_METHODS, PlannedRun, resolve_figure
from exactlr.paper.provenance import state_dict_sha256
from exactlr.paper.results import is_finished, save_result
from exactlr.paper.scales import Scale, parse_scale
from exactlr.paper.store import (
    check_out_dir,
    checkpoint_path,
    manifest_path,
    read_json,
    run_path,
    write_json_atomic,
)
from exactlr.paper.training import TrainConfig, first_samples, train_run
from exactlr.progress import progress_bar

__all__ = ["Runner", "default_checkpoint_every", "execute_run", "run_figure"]

# Seed of the mini-subset draws: the data set is fixed across weight seeds, as in the
# paper (one mini-MNIST), so that seeds vary only w0 and the K_hat samples.
DATA_SEED = 0


class Runner(Protocol):
    """Does one planned run: called with :func:`execute_run`'s keyword arguments
    (``ours``, ``w0_state``, ``train``, ``test``, ``out_dir``, ``device``, ``progress``,
    ``checkpoint_every``); returns the path its result file has or will have."""

    def __call__(self, plan: PlannedRun, **inputs: Any) -> Path: ...


def default_checkpoint_every(scale: str | Scale, *, fixed_scale: bool = False) -> int:
    """Epochs between checkpoints: 5 at the ``cpu`` and ``paper`` scales, else 0 (none).

    Smoke runs and the demo take seconds, so checkpoints would cost more than they save.
    """
    return 0 if fixed_scale else parse_scale(scale).default_checkpoint_every


def _load_data(
    cfg: TrainConfig, data_dir: str | os.PathLike[str] | None, scale: Scale
) -> tuple[ArrayDataset, ArrayDataset]:
    """A run's training set (capped to ``num_train``: K_hat and L(w0) must see exactly
    the training data) and test set (capped to the scale's ``num_test``)."""
    train, test = load_dataset(cfg.dataset, subset=cfg.subset, data_dir=data_dir, seed=DATA_SEED)
    return first_samples(train, cfg.num_train), first_samples(test, scale.num_test)


def _build_w0(cfg: TrainConfig) -> torch.nn.Module:
    """The run's model at w0, drawn from a generator seeded with the run's seed."""
    generator = torch.Generator().manual_seed(cfg.seed)
    return build_model(cfg.model, dataset=cfg.dataset, init=cfg.init, generator=generator)


def _result_extra(
    plan: PlannedRun,
    cfg: TrainConfig,
    ours: Mapping[str, Any],
    finder: Mapping[str, Any] | None,
    w0_state: Mapping[str, torch.Tensor],
) -> dict[str, Any]:
    """What a result file keeps beside the run: its place in the figure, how its LR was
    obtained and the hash of w0."""
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
    return extra


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
    With ``checkpoint_every > 0`` the run checkpoints to
    :func:`exactlr.paper.store.checkpoint_path` every that many epochs and resumes from
    an existing checkpoint of the same run (also with ``checkpoint_every = 0``); the
    checkpoint is deleted once the result file is saved.

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
    if result.total_steps != ours["total_steps"]:
        raise ValueError(
            f"run {cfg.run_name()} trained T={result.total_steps} steps but its LR entry "
            f"{ours['key']!r} is for T={ours['total_steps']}; delete that entry to recompute it"
        )
    path = run_path(out_dir, cfg.run_name())
    save_result(path, result, extra=_result_extra(plan, cfg, ours, finder, w0_state))
    ckpt.unlink(missing_ok=True)  # only now: a crash before the save resumes from it
    return path


# ------------------------------------------------------------------------------ manifest


def _manifest_entry(plan: PlannedRun, out_dir: Path) -> dict[str, Any]:
    return {
        "run_name": plan.run_name,
        "path": run_path(out_dir, plan.run_name).relative_to(out_dir).as_posix(),
        "row": plan.row,
        "series": plan.series,
        "group": plan.group,
        "method": plan.method,
        "role": plan.role,
        "lr_key": plan.lr_key.to_filename(),
        "paper_ours_lr": plan.paper_ours_lr,
    }


def _merge_previous(entries: list[dict[str, Any]], path: Path) -> None:
    """Keeps the runs of earlier calls with other method sets (e.g. ``tuned``), unless
    this call plans the same method of the same row again. A paper scheduler planned
    again only as a point of the tuning grid keeps its paper role."""

    def key(e: dict[str, Any]) -> tuple[Any, ...]:
        return (e.get("row"), e.get("series"), e.get("method"))

    if not path.is_file():
        return
    try:
        previous = read_json(path, what="manifest").get("runs", [])
    except (ValueError, AttributeError):
        return  # a corrupt manifest is rewritten from this call's plans
    planned = {key(e): i for i, e in enumerate(entries)}
    for old in previous if isinstance(previous, list) else []:
        if not isinstance(old, dict):
            continue
        index = planned.get(key(old))
        if index is None:
            entries.append(old)
        elif entries[index]["group"] == "tuned" and old.get("group") != "tuned":
            entries[index] = {**entries[index], "group": old.get("group"), "role": old.get("role")}


def _write_manifest(
    out_dir: Path, spec: FigureSpec, scale: Scale, seed: int, plans: Sequence[PlannedRun]
) -> Path:
    path = manifest_path(out_dir, spec.name, scale)
    entries = [_manifest_entry(p, out_dir) for p in plans]
    _merge_previous(entries, path)
    write_json_atomic(
        path,
        {
            "figure": spec.name,
            "title": spec.title,
            "scale": scale,
            "scale_description": scale.description
            if not spec.fixed_scale
            else "fixed size (the demo)",
            "seed": seed,
            "paper_ours_lr": spec.paper_ours_lr,
            "rows": spec.rows,
            "runs": entries,
        },
    )
    return path


# ------------------------------------------------------------------------------ figure


@dataclass
class _Inputs:
    """What the runs of a figure share, loaded or computed once each."""

    data_dir: str | os.PathLike[str] | None
    scale: Scale
    out: Path
    device: torch.device
    progress: bool
    data: dict[tuple[Any, ...], tuple[ArrayDataset, ArrayDataset]] = field(default_factory=dict)
    w0: dict[tuple[Any, ...], tuple[torch.nn.Module, dict[str, torch.Tensor]]] = field(
        default_factory=dict
    )
    ours: dict[LRKey, dict[str, Any]] = field(default_factory=dict)
    finder: dict[LRKey, dict[str, Any]] = field(default_factory=dict)

    def dataset(self, cfg: TrainConfig) -> tuple[ArrayDataset, ArrayDataset]:
        key = (cfg.dataset, cfg.subset, cfg.num_train)
        if key not in self.data:
            self.data[key] = _load_data(cfg, self.data_dir, self.scale)
        return self.data[key]

    def initial(self, cfg: TrainConfig) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
        key = (cfg.model, cfg.dataset, cfg.init, cfg.seed)
        if key not in self.w0:
            model = _build_w0(cfg)
            self.w0[key] = (model, {k: v.detach().clone() for k, v in model.state_dict().items()})
        return self.w0[key]

    def lr_entry(self, plan: PlannedRun, model: torch.nn.Module, train: ArrayDataset) -> Any:
        """The ours-LR entry of ``plan`` (with ``finder`` for an LR finder run)."""
        key = plan.lr_key
        if key not in self.ours:
            self.ours[key] = ours_entry(
                key,
                plan.config,
                model,
                train,
                self.out,
                scale=self.scale,
                device=self.device,
                progress=self.progress,
            )
        if plan.group != "lr_finder":
            return self.ours[key]
        finder_key = key.finder_key()
        if finder_key not in self.finder:
            self.finder[finder_key] = finder_entry(
                key, plan.config, model, train, self.out, device=self.device
            )
        return {**self.ours[key], "finder": self.finder[finder_key]}


@contextlib.contextmanager
def _threads(num_threads: int | None) -> Iterator[None]:
    """Sets torch's CPU thread count for the block and restores it after (None: as is)."""
    if num_threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_figure(
    name: str,
    *,
    scale: str | Scale,
    out_dir: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    epochs: int | None = None,
    runner: Runner | None = None,
    checkpoint_every: int | None = None,
    methods: Sequence[str] = (FIGURE_METHODS,),
    curvature_every: int = 0,
    num_threads: int | None = None,
) -> list[Path]:
    """Runs (or resumes) every run of a figure and writes its manifest.

    Data are loaded once per setting; the model is built once per (architecture, data,
    init, seed) so every method of a row starts from the same ``w0``; alpha_ours is
    computed once per setting and cached in ``out_dir/lr/<key>.json``. Runs whose result
    file is finished are skipped, so rerunning resumes.

    Args:
        name: Figure name (see :func:`exactlr.paper.figures.figure_names`).
        scale: A :class:`~exactlr.paper.scales.Scale` or its name.
        out_dir: Results root (``runs/``, ``lr/``, ``figures/`` are created inside).
        device: Torch device for training and K_hat.
        seed: Base seed.
        data_dir: Data root (default search: ``$EXACTLR_DATA``, ``./data``, ...).
        progress: Show a progress bar over runs (and K_hat samples).
        epochs: Override every run's epoch count.
        runner: Does each run (default :func:`execute_run`, one after another in this
            process); e.g. :class:`exactlr.paper.ray_executor.RayRunner` submits them.
        checkpoint_every: Epochs between a run's checkpoints (``out_dir/checkpoints``);
            None: :func:`default_checkpoint_every` (5 at cpu/paper scale); 0: none.
        methods: Method sets to run (:data:`exactlr.paper.planning.METHOD_SETS`). The
            manifest keeps the runs of earlier calls with other sets, so that ``tuned``
            after a plain run reports both.
        curvature_every: Hessian spectral norm every this many epochs in every run.
        num_threads: torch's CPU threads while the figure runs, restored afterwards
            (``torch.set_num_threads`` is process-wide); None leaves them as they are.

    Returns:
        The result file of every run of the figure, in plan order.

    Raises:
        ValueError: Unknown figure or scale; ``out_dir`` is a file or cannot be created;
            a negative ``checkpoint_every``; ``num_threads < 1``.
        FileNotFoundError: The data files are missing.
    """
    if checkpoint_every is not None and checkpoint_every < 0:
        raise ValueError(f"checkpoint_every={checkpoint_every} must be >= 0 (0: none)")
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads={num_threads} must be at least 1 (or None)")
    spec = get_figure(name)
    scale = parse_scale(scale)
    plans = resolve_figure(
        name,
        scale,
        seed=seed,
        data_dir=data_dir,
        epochs=epochs,
        methods=methods,
        curvature_every=curvature_every,
    )
    out = check_out_dir(out_dir, create=True)
    if checkpoint_every is None:
        checkpoint_every = default_checkpoint_every(scale, fixed_scale=spec.fixed_scale)
    _write_manifest(out, spec, scale, seed, plans)
    inputs = _Inputs(data_dir, scale, out, torch.device(device), progress)
    with _threads(num_threads):
        return _run_plans(
            plans, inputs, runner or execute_run, checkpoint_every, f"{name} ({scale})"
        )


def _run_plans(
    plans: Sequence[PlannedRun],
    inputs: _Inputs,
    run: Runner,
    checkpoint_every: int,
    desc: str,
) -> list[Path]:
    """Does every plan whose result file is not finished; returns all result paths."""
    paths: list[Path] = []
    bar = progress_bar(total=len(plans), desc=desc, unit="run", enabled=inputs.progress)
    try:
        for plan in plans:
            cfg = plan.config
            path = run_path(inputs.out, plan.run_name)
            paths.append(path)
            if is_finished(path):
                bar.update(1)
                continue
            bar.set_postfix_str(f"{plan.row + ' ' if plan.row else ''}{plan.method}")
            train, test = inputs.dataset(cfg)
            model, state = inputs.initial(cfg)
            run(
                plan,
                ours=inputs.lr_entry(plan, model, train),
                w0_state=state,
                train=train,
                test=test,
                out_dir=inputs.out,
                device=inputs.device,
                progress=False,
                checkpoint_every=checkpoint_every,
            )
            bar.update(1)
    finally:
        bar.close()
    return paths
