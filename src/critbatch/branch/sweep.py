"""Deprecated: the branch sweep lives in the package :mod:`critbatch.branch` (``config``, ``plan``,
``spec``, ``continuation``, ``curve``, ``run``); import from ``critbatch.branch``. This module keeps
the old import paths for one release."""

from . import *  # noqa: F401,F403
from . import __all__ as _public
from .config import DECIDE_BY, EARLY_STOP_MIN_SPANS, EMA_MIN_STEPS, SEARCHES, STACK_CUDA  # noqa: F401
from .curve import branch_outcome as branch_losses  # noqa: F401
from .spec import BRANCH_FORMAT  # noqa: F401

__all__ = [*_public, "branch_losses", "DECIDE_BY", "SEARCHES", "STACK_CUDA", "EARLY_STOP_MIN_SPANS", "EMA_MIN_STEPS",
           "BRANCH_FORMAT"]
