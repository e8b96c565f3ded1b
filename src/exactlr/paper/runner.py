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
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from exactlr.data import ArrayDataset, load_dataset, resolve_data_dirs
from exactlr.models import build_model
from exactlr.paper.figures import FigureSpec, get_figure
from exactlr.paper.lrcache import LRKey, finder_entry, ours_entry
from exactlr.paper.planning import FIGURE_METHODS, PlannedRun, resolve_figure
from exactlr.paper.provenance import DataIdentity, provenance, state_dict_sha256
from exactlr.paper.results import load_result, plan_mismatch, save_result
from exactlr.paper.scales import Scale, parse_scale
from exactlr.paper.stopping import raise_if_stop_requested
from exactlr.paper.store import (
    check_out_dir,
    checkpoint_path,
    load_or_set_aside,
    manifest_path,
    read_json,
    run_path,
    write_json_atomic,
)
from exactlr.paper.training import TrainConfig, first_samples, train_run
from exactlr.progress import progress_bar

__all__ = ["Runner", "default_checkpoint_every", "execute_run", "run_figure"]

log = logging.getLogger("exactlr")


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
    the training data) and test set (capped to the scale's ``num_test``), drawn with the
    run's ``data_seed``."""
    train, test = load_dataset(
        cfg.dataset, subset=cfg.subset, data_dir=data_dir, seed=cfg.data_seed
    )
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
    provenance: Mapping[str, Any] | None = None,
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
        provenance: What the run is made from (data identity, w0, code), recorded in
            its result file (:func:`exactlr.paper.provenance.provenance`).

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
    save_result(
        path,
        result,
        extra=_result_extra(plan, cfg, ours, finder, w0_state),
        provenance=dict(provenance) if provenance is not None else None,
    )
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
    path = manifest_path(out_dir, spec.name, scale, seed)
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
class _Prepared:
    """A plan's inputs: its data, w0, ours-LR entry and the provenance its result needs."""

    train: ArrayDataset
    test: ArrayDataset
    state: dict[str, torch.Tensor]
    ours: dict[str, Any]
    provenance: dict[str, Any]


@dataclass
class _Inputs:
    """What the runs of a figure share, loaded or computed once each."""

    data_dir: str | os.PathLike[str] | None
    scale: Scale
    out: Path
    device: torch.device
    progress: bool
    data: dict[tuple[Any, ...], tuple[ArrayDataset, ArrayDataset, DataIdentity]] = field(
        default_factory=dict
    )
    w0: dict[tuple[Any, ...], tuple[torch.nn.Module, dict[str, torch.Tensor], str]] = field(
        default_factory=dict
    )
    ours: dict[LRKey, dict[str, Any]] = field(default_factory=dict)
    finder: dict[LRKey, dict[str, Any]] = field(default_factory=dict)

    def dataset(self, plan: PlannedRun) -> tuple[ArrayDataset, ArrayDataset, DataIdentity]:
        cfg = plan.config
        key = (cfg.dataset, cfg.subset, cfg.num_train, cfg.data_seed, plan.synthetic_fallback)
        if key not in self.data:
            train, test = _load_data(cfg, self.data_dir, self.scale)
            identity = DataIdentity.of(
                train,
                test,
                dataset=cfg.dataset,
                subset=cfg.subset,
                synthetic_fallback=plan.synthetic_fallback,
            )
            self.data[key] = (train, test, identity)
        return self.data[key]

    def initial(self, cfg: TrainConfig) -> tuple[torch.nn.Module, dict[str, torch.Tensor], str]:
        key = (cfg.model, cfg.dataset, cfg.init, cfg.seed)
        if key not in self.w0:
            model = _build_w0(cfg)
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.w0[key] = (model, state, state_dict_sha256(state))
        return self.w0[key]

    def prepare(self, plan: PlannedRun) -> _Prepared:
        """The plan's inputs; the ours-LR (and range test) entries from a valid cache
        file or computed."""
        train, test, identity = self.dataset(plan)
        model, state, w0_sha = self.initial(plan.config)
        record = provenance(identity, w0_sha)
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
                provenance=record,
            )
        ours = self.ours[key]
        if plan.group == "lr_finder":
            finder_key = key.finder_key()
            if finder_key not in self.finder:
                self.finder[finder_key] = finder_entry(
                    key, plan.config, model, train, self.out, device=self.device, provenance=record
                )
            ours = {**ours, "finder": self.finder[finder_key]}
        return _Prepared(train, test, state, ours, record)


def _finished(path: Path, plan: PlannedRun, prepared: _Prepared, out: Path) -> bool:
    """Whether ``path`` holds this plan's result; a file that does not (unreadable, of
    another config, LR, T, data or w0) is named in one log line and set aside."""
    if not path.is_file():
        return False
    ours = prepared.ours
    finder = ours.get("finder")
    cfg = plan.resolve(float(ours["lr"]), float(finder["lr"]) if finder else None)
    data = load_or_set_aside(
        path,
        out,
        load_result,
        lambda data: plan_mismatch(
            data, cfg, prepared.provenance, cfg.total_steps(len(prepared.train))
        ),
        what="result",
        redo="rerunning it",
    )
    return data is not None


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
    computed once per setting and cached in ``out_dir/lr/<key>.json``. A run whose
    result file matches its plan (config and LR, T, the data's hashes and w0's: see
    :func:`exactlr.paper.results.plan_mismatch`) is skipped, so rerunning resumes; a
    file that does not match is named in a log line, moved to ``out_dir/aside/`` and
    the run redone. The manifest is written once every run has its result, so a figure
    whose runs failed leaves none to report on.

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
        FileNotFoundError: The data files are missing (at smoke scale: a given
            ``data_dir`` without them; the synthetic set stands in only without one).
    """
    _check_counts(checkpoint_every, num_threads)
    spec = get_figure(name)
    scale = parse_scale(scale)
    checkpoint_every = _checkpoint_every(checkpoint_every, scale, spec, runner)
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
    if any(p.synthetic_fallback for p in plans):
        _say_synthetic(spec)
    inputs = _Inputs(data_dir, scale, out, torch.device(device), progress)
    with _threads(num_threads):
        paths = _run_plans(
            plans, inputs, runner or execute_run, checkpoint_every, f"{name} ({scale})"
        )
        wait = getattr(runner, "wait", None)
        if callable(wait):  # an executor that only submitted the runs: collect them
            wait()
    # Only now: a figure whose runs failed leaves no manifest to report on.
    _write_manifest(out, spec, scale, seed, plans)
    return paths


def _check_counts(checkpoint_every: int | None, num_threads: int | None) -> None:
    if checkpoint_every is not None and checkpoint_every < 0:
        raise ValueError(f"checkpoint_every={checkpoint_every} must be >= 0 (0: none)")
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads={num_threads} must be at least 1 (or None)")


def _say_synthetic(spec: FigureSpec) -> None:
    """One log line: the smoke scale runs on the synthetic set (no data folder found)."""
    log.info(
        "no data folder given and none with %s found (searched: %s): %s runs on the "
        "synthetic set instead (recorded in every result)",
        spec.dataset,
        ", ".join(str(d) for d in resolve_data_dirs(None)),
        spec.name,
    )


def _checkpoint_every(
    requested: int | None, scale: Scale, spec: FigureSpec, runner: Runner | None
) -> int:
    """The epochs between checkpoints: as requested, else the scale's default; 0 for an
    executor whose runs cannot keep checkpoints (it refuses an explicit request)."""
    local = getattr(runner, "supports_checkpoints", True)
    if requested is not None:
        if requested > 0 and not local:
            raise ValueError(
                f"checkpoint_every={requested}: this executor's runs train in temporary "
                "folders, so they cannot keep checkpoints; use 0 or the local executor"
            )
        return requested
    if not local:
        log.info("checkpoints are off: the executor's runs train in temporary folders")
        return 0
    return default_checkpoint_every(scale, fixed_scale=spec.fixed_scale)


def _run_plans(
    plans: Sequence[PlannedRun],
    inputs: _Inputs,
    run: Runner,
    checkpoint_every: int,
    desc: str,
) -> list[Path]:
    """Does every plan without a matching result file; returns all result paths."""
    paths: list[Path] = []
    bar = progress_bar(total=len(plans), desc=desc, unit="run", enabled=inputs.progress)
    try:
        for plan in plans:
            path = run_path(inputs.out, plan.run_name)
            paths.append(path)
            prepared = inputs.prepare(plan)
            if _finished(path, plan, prepared, inputs.out):
                bar.update(1)
                continue
            bar.set_postfix_str(f"{plan.row + ' ' if plan.row else ''}{plan.method}")
            run(
                plan,
                ours=prepared.ours,
                w0_state=prepared.state,
                train=prepared.train,
                test=prepared.test,
                out_dir=inputs.out,
                device=inputs.device,
                progress=False,
                checkpoint_every=checkpoint_every,
                provenance=prepared.provenance,
            )
            bar.update(1)
            raise_if_stop_requested()  # a stop asked for during the run's last epoch
    finally:
        bar.close()
    return paths
