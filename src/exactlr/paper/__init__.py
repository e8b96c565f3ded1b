"""The paper's reproduction harness: figures, scales, schedules, training, results, reports.

Built on the core library (``exactlr.curvature``, ``exactlr.smoothness``,
``exactlr.stepsize``, ``exactlr.models``, ``exactlr.data``); nothing in the core imports
from here.

Module map (each module imports only those above it):

- ``store``: the results folder's layout, atomic writes, strict JSON, ``--out`` checks.
- ``provenance``: hashes of weights and data, the code version.
- ``schedules``: the compared methods (ours, schedulers, constants, parameter-free).
- ``runconfig``: ``TrainConfig`` (with T = epochs x steps per epoch), metrics, outcome.
- ``passes``: a full-data pass, an optimizer step, Adam's Gamma_t.
- ``training``: one run (``train_run``), with checkpoints.
- ``stacked``, ``grid``: K runs from one w0 in one pass (``train_grid``).
- ``lrfinder``: the LR range test.
- ``results``: result files and manifests (save, load, validate).
- ``scales``, ``figures``: the scales as a typed object; the paper's figure table.
- ``lrcache``: the alpha_ours and LR range test caches with typed keys.
- ``planning``: a figure at a scale as planned runs (``resolve_figure``).
- ``runner``: ``run_figure`` and ``execute_run``; ``ray_executor``: the same on Ray.
- ``markdown``, ``report``, ``plotting``: verdict tables and drawings from the files.
- ``experiments``: one import for the entry points above.
"""
