"""Every figure in one go, and what a results folder already holds.

:func:`all_jobs` is the plan of ``exactlr run all``: every figure of the paper (and
appendix C.5) at base seed 0, plus the seed replicates of the robustness check
(:data:`REPLICATE_SEEDS`: fig1 and fig6 on seeds 1 and 2), as ``(figure, seed)`` pairs in
the order they run. :func:`scales_found` and :func:`seeds_found` read which scales and
seeds of a figure a results folder holds (from its manifests), and :func:`pick_scale`
chooses the scale when the user gave none.

Example:
    >>> all_jobs()[:2]
    [('fig1', 0), ('fig1', 1)]
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from exactlr.paper.figures import figure_names
from exactlr.paper.scales import SCALES

__all__ = ["REPLICATE_SEEDS", "all_jobs", "pick_scale", "scales_found", "seeds_found"]

#: Figures whose verdicts are checked on more than one base seed, and those seeds.
REPLICATE_SEEDS: dict[str, tuple[int, ...]] = {"fig1": (0, 1, 2), "fig6": (0, 1, 2)}

_MANIFEST = re.compile(r"(?P<scale>[a-z]+)(?:-seed(?P<seed>\d+))?")


def all_jobs(seeds: Sequence[int] | None = None) -> list[tuple[str, int]]:
    """The ``(figure, base seed)`` pairs of ``exactlr run all``, in running order.

    Args:
        seeds: Run every figure with these seeds; None: seed 0, and for the figures of
            :data:`REPLICATE_SEEDS` their seeds.
    """
    jobs = []
    for name in figure_names(include_demo=False):
        figure_seeds = seeds if seeds is not None else REPLICATE_SEEDS.get(name, (0,))
        jobs += [(name, seed) for seed in figure_seeds]
    return jobs


def _manifests(out_dir: str | os.PathLike[str], figure: str) -> list[tuple[str, int]]:
    """``(scale, seed)`` of every manifest of ``figure`` in ``out_dir/figures``."""
    folder = Path(out_dir) / "figures"
    found = []
    for path in sorted(folder.glob(f"{figure}-*.json")) if folder.is_dir() else []:
        match = _MANIFEST.fullmatch(path.stem[len(figure) + 1 :])
        if match and match["scale"] in SCALES:
            found.append((match["scale"], int(match["seed"] or 0)))
    return found


def scales_found(out_dir: str | os.PathLike[str], figure: str) -> list[str]:
    """The scales at which ``out_dir`` holds runs of ``figure``, smallest first."""
    present = {scale for scale, _ in _manifests(out_dir, figure)}
    return [s for s in SCALES if s in present]


def seeds_found(out_dir: str | os.PathLike[str], figure: str, scale: str) -> list[int]:
    """The base seeds with which ``out_dir`` holds runs of ``figure`` at ``scale``."""
    return sorted(seed for s, seed in _manifests(out_dir, figure) if s == scale)


def pick_scale(out_dir: str | os.PathLike[str], figure: str) -> str:
    """The scale of ``figure``'s results in ``out_dir`` when there is exactly one.

    Raises:
        ValueError: No results of the figure, or results at several scales (naming them).
    """
    found = scales_found(out_dir, figure)
    if not found:
        raise ValueError(
            f"no results of {figure} in {out_dir}; run `exactlr run {figure} --scale SCALE "
            f"--out {out_dir}` first"
        )
    if len(found) > 1:
        raise ValueError(
            f"{out_dir} holds {figure} at several scales ({', '.join(found)}); pass --scale"
        )
    return found[0]
