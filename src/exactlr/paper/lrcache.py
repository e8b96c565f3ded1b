"""The LR caches: alpha_ours and the LR range test, one file per setting.

``alpha_ours = sqrt(2 L(w0) / (K_hat T))`` is computed once per setting (data, model,
init, batch size, epochs, seed, K_hat samples: an :class:`LRKey`) and kept in
``out_dir/lr/<key>.json``; figures that vary only the horizon T (fig12-15) share one
K_hat estimate, since only alpha depends on T. The LR range test's suggestion does not
depend on T or the K_hat samples and is kept in ``out_dir/lr_finder/<key>.json``.

Keys are typed: an :class:`LRKey` renders its file name with :meth:`LRKey.to_filename`
and is stored in the entry as ``setting`` (its fields), so entries are matched by value,
never by parsing file names. Every entry records its provenance (the data's identity,
w0's hash, the code version). An entry is used only when it is valid for the plan: its
key, setting and provenance match, and its ``lr`` is the formula's for its own K_hat,
L(w0) and T; any other file (truncated, edited, made from other data) is named in one
log line, moved to ``out_dir/aside/`` and recomputed. Stray files are ignored.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from exactlr.data import ArrayDataset, make_batches
from exactlr.paper.lrfinder import lr_range_test
from exactlr.paper.provenance import provenance_mismatch
from exactlr.paper.runconfig import TrainConfig
from exactlr.paper.scales import Scale
from exactlr.paper.store import (
    finder_cache_path,
    load_or_set_aside,
    lr_cache_path,
    read_json,
    write_json_atomic,
)
from exactlr.stepsize import exact_step_size, suggest_lr

__all__ = ["LRKey", "finder_entry", "ours_entry"]


@dataclass(frozen=True)
class LRKey:
    """The setting an LR cache entry belongs to.

    ``epochs`` is None for the K_hat estimate shared across horizons, and ``num_samples``
    None too for the LR range test (which uses neither).
    """

    dataset: str
    subset: str
    num_train: int | None
    model: str
    init: str
    batch_size: int | None
    epochs: int | None
    seed: int
    num_samples: int | None
    data_seed: int = 0

    @classmethod
    def of(cls, cfg: TrainConfig, num_samples: int) -> LRKey:
        """The key of a run's alpha_ours. Adam's eps is not in it: the practical rule
        drops delta^2 = gamma^2 / rho^2, so the LR does not depend on rho (the paper's
        fig16 legend shows 0.015 for every rho)."""
        return cls(
            dataset=cfg.dataset,
            subset=cfg.subset,
            num_train=cfg.num_train,
            model=cfg.model,
            init=cfg.init,
            batch_size=cfg.batch_size,
            epochs=cfg.epochs,
            seed=cfg.seed,
            num_samples=num_samples,
            data_seed=cfg.data_seed,
        )

    def smoothness_key(self) -> LRKey:
        """The key without the horizon: K_hat and L(w0) do not depend on T."""
        return dataclasses.replace(self, epochs=None)

    def finder_key(self) -> LRKey:
        """The LR range test's key: without the horizon and the K_hat samples."""
        return dataclasses.replace(self, epochs=None, num_samples=None)

    def to_filename(self) -> str:
        """File-name-safe text, e.g.
        ``mnist-mini-n2000__fc3x1000__paper__bfull__e30__seed0__k5``."""
        data = f"{self.dataset}-{self.subset}" + (f"-n{self.num_train}" if self.num_train else "")
        batch = "full" if self.batch_size is None else str(self.batch_size)
        name = f"{data}__{self.model}__{self.init}__b{batch}"
        if self.epochs is not None:
            name += f"__e{self.epochs}"
        name += f"__seed{self.seed}"
        if self.num_samples is not None:
            name += f"__k{self.num_samples}"
        if self.data_seed != 0:
            name += f"__data{self.data_seed}"
        return name

    def to_dict(self) -> dict[str, Any]:
        """The fields, as stored in an entry's ``setting``."""
        return dataclasses.asdict(self)


def _finite_positive(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _entry_problem(
    entry: Any, key: LRKey, provenance: dict[str, Any], total_steps: int | None
) -> str | None:
    """Why a cache entry cannot be used for ``key`` (None if it can).

    It must name this key, hold this key's setting and this plan's provenance (data,
    w0), and numbers that agree: ``lr`` a finite positive number and, for alpha_ours,
    ``lr = exact_step_size(initial_loss, k_hat, total_steps)`` with the planned T.
    """
    if not isinstance(entry, dict):
        return "is not a JSON object"
    if entry.get("key") != key.to_filename() or entry.get("setting") != key.to_dict():
        return "belongs to another setting"
    mismatch = provenance_mismatch(entry.get("provenance"), provenance)
    if mismatch is not None:
        return mismatch
    if not _finite_positive(entry.get("lr")):
        return f"has lr={entry.get('lr')!r}, not a finite positive number"
    if total_steps is None:
        return None
    if entry.get("total_steps") != total_steps:
        return f"has total_steps={entry.get('total_steps')!r}, the plan has {total_steps}"
    return _formula_problem(entry, total_steps)


def _formula_problem(entry: dict[str, Any], total_steps: int) -> str | None:
    """Whether the entry's lr is the formula's for its own K_hat, L(w0) and T."""
    k_hat, initial_loss = entry.get("k_hat"), entry.get("initial_loss")
    if not (_finite_positive(k_hat) and _finite_positive(initial_loss)):
        return f"has k_hat={k_hat!r}, initial_loss={initial_loss!r}"
    expected = exact_step_size(initial_loss, k_hat, total_steps)
    if not math.isclose(entry["lr"], expected, rel_tol=1e-9):
        return f"has lr={entry['lr']!r} but its K_hat, L(w0) and T give {expected!r}"
    return None


def _cached(
    path: Path, out_dir: Path, key: LRKey, provenance: dict[str, Any], total_steps: int | None
) -> dict[str, Any] | None:
    """The valid entry at ``path``, or None: a missing file, or an invalid one, which is
    named in one log line and set aside (``out_dir/aside``) to be recomputed."""
    return load_or_set_aside(
        path,
        out_dir,
        functools.partial(read_json, what="LR cache entry"),
        lambda entry: _entry_problem(entry, key, provenance, total_steps),
        what="LR cache entry",
        redo="recomputing it",
    )


def _shared_estimate(
    out_dir: Path, key: LRKey, provenance: dict[str, Any]
) -> dict[str, Any] | None:
    """A valid entry of another horizon with the same K_hat setting and provenance.

    Unreadable files, files of other settings and stray files are skipped.
    """
    folder = lr_cache_path(out_dir, "x").parent
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            entry = read_json(path, what="LR cache entry")
        except ValueError:
            continue
        setting = entry.get("setting") if isinstance(entry, dict) else None
        if not isinstance(setting, dict) or not isinstance(setting.get("epochs"), int):
            continue
        try:
            other = LRKey(**setting)
        except TypeError:
            continue
        if other.smoothness_key() != key.smoothness_key():
            continue
        steps = entry.get("total_steps")
        if isinstance(steps, int) and _entry_problem(entry, other, provenance, steps) is None:
            return entry
    return None


def ours_entry(
    key: LRKey,
    cfg: TrainConfig,
    model: torch.nn.Module,
    train: ArrayDataset,
    out_dir: Path,
    *,
    scale: Scale,
    device: torch.device,
    progress: bool,
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """alpha_ours for ``key``'s setting, from the cache file or computed and cached.

    A cache file is used only if it is valid for this plan (see :func:`_entry_problem`);
    otherwise it is named in a log line, set aside and recomputed.

    Args:
        key: The setting (:meth:`LRKey.of` of the run's config).
        cfg: A run of the setting (data, batch size, epochs, seed).
        model: The model at w0.
        train: The training data (already capped to ``num_train``).
        out_dir: Results root.
        scale: The figure's scale (K_hat's solver options).
        device: Where K_hat is estimated.
        progress: Show a bar over the K_hat samples.
        provenance: What the entry must come from (data identity, w0, code).

    Returns:
        The entry: ``lr``, ``k_hat``, ``initial_loss``, ``total_steps`` (T), ...
    """
    path = lr_cache_path(out_dir, key.to_filename())
    total_steps = cfg.total_steps(len(train))
    entry = _cached(path, out_dir, key, provenance, total_steps)
    if entry is not None:
        return entry
    shared = _shared_estimate(out_dir, key, provenance)
    if shared is not None:
        entry = dict(shared)
        entry.update(
            key=key.to_filename(),
            setting=key.to_dict(),
            lr=exact_step_size(shared["initial_loss"], shared["k_hat"], total_steps),
            total_steps=total_steps,
            epochs=cfg.epochs,
            reused_from=shared["key"],
        )
    else:
        entry = _estimate(key, cfg, model, train, scale=scale, device=device, progress=progress)
        entry["provenance"] = provenance
    write_json_atomic(path, entry)
    return entry


def _estimate(
    key: LRKey,
    cfg: TrainConfig,
    model: torch.nn.Module,
    train: ArrayDataset,
    *,
    scale: Scale,
    device: torch.device,
    progress: bool,
) -> dict[str, Any]:
    """Computes alpha_ours with :func:`exactlr.stepsize.suggest_lr` (K_hat and L(w0))."""
    batches = make_batches(train.to(device), cfg.batch_size)
    total_steps = cfg.total_steps(len(train))
    start = time.perf_counter()
    suggestion = suggest_lr(
        copy.deepcopy(model).to(device),
        F.cross_entropy,
        batches,
        total_steps=total_steps,
        num_samples=key.num_samples,
        generator=torch.Generator().manual_seed(cfg.seed + 1),
        progress=progress,
        options=scale.spectral_options,
    )
    est = suggestion.estimate
    return {
        "key": key.to_filename(),
        "lr": suggestion.lr,
        "k_hat": suggestion.k_hat,
        "initial_loss": suggestion.initial_loss,
        "total_steps": total_steps,
        "epochs": cfg.epochs,
        "batches_per_epoch": len(batches),
        "num_train": len(train),
        "num_samples": key.num_samples,
        "samples": list(est.samples),
        "running_max": list(est.running_max),
        "records": [dataclasses.asdict(r) for r in est.records],
        "variant": est.variant,
        "seconds": time.perf_counter() - start,
        "device": str(device),
        "setting": key.to_dict(),
    }


def finder_entry(
    key: LRKey,
    cfg: TrainConfig,
    model: torch.nn.Module,
    train: ArrayDataset,
    out_dir: Path,
    *,
    device: torch.device,
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """The LR range test's suggestion for ``key``'s setting (:meth:`LRKey.finder_key`),
    from a valid ``out_dir/lr_finder/<key>.json`` or computed and cached there."""
    key = key.finder_key()
    path = finder_cache_path(out_dir, key.to_filename())
    entry = _cached(path, out_dir, key, provenance, None)
    if entry is not None:
        return entry
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
        "key": key.to_filename(),
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
        "setting": key.to_dict(),
        "provenance": provenance,
    }
    write_json_atomic(path, entry)
    return entry
