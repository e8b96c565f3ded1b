"""The paper's figures and how to run them: one import for the harness's entry points.

The parts live in modules with one concern each; this module gathers their public names:

- :mod:`exactlr.paper.figures`: :class:`FigureSpec`, :class:`Variation`, the table
  :data:`FIGURES`, :func:`get_figure`, :func:`figure_names`, :func:`list_figures`.
- :mod:`exactlr.paper.scales`: :class:`Scale` (smoke, cpu, paper), :func:`describe_scale`.
- :mod:`exactlr.paper.planning`: :func:`resolve_figure` -> :class:`PlannedRun`,
  :data:`METHOD_SETS`, :func:`parse_methods`.
- :mod:`exactlr.paper.lrcache`: the alpha_ours and LR range test caches (:class:`LRKey`).
- :mod:`exactlr.paper.runner`: :func:`run_figure`, :func:`execute_run`.
- :mod:`exactlr.paper.store`: the results folder's layout (:func:`manifest_path`,
  :func:`checkpoint_path`) and atomic writes.

Example:
    >>> plans = resolve_figure("fig1", "cpu")
    >>> sorted({p.role for p in plans})
    ['ours', 'scheduler']
"""

from __future__ import annotations

from exactlr.paper.figures import (
    FIGURES,
    GROUPS,
    FigureSpec,
    Variation,
    figure_names,
    get_figure,
    list_figures,
)
from exactlr.paper.lrcache import LRKey
from exactlr.paper.planning import (
    FIGURE_METHODS,
    METHOD_SETS,
    PlannedRun,
    parse_methods,
    resolve_figure,
)
from exactlr.paper.provenance import state_dict_sha256
from exactlr.paper.runner import Runner, default_checkpoint_every, execute_run, run_figure
from exactlr.paper.scales import SCALES, Scale, describe_scale
from exactlr.paper.store import checkpoint_path, manifest_path

__all__ = [
    "FIGURES",
    "FIGURE_METHODS",
    "GROUPS",
    "METHOD_SETS",
    "SCALES",
    "FigureSpec",
    "LRKey",
    "PlannedRun",
    "Runner",
    "Scale",
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
