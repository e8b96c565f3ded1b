"""The paper's reproduction harness: figures, scales, schedules, training, results, reports.

Built on the core library (``exactlr.curvature``, ``exactlr.smoothness``,
``exactlr.stepsize``, ``exactlr.models``, ``exactlr.data``); nothing in the core imports
from here.
"""
