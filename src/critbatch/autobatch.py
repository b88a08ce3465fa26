"""Deprecated: the closed loop lives in the package :mod:`critbatch.closed_loop` (``config``,
``policy``, ``loop``, ``plan``); import from ``critbatch.closed_loop``. This module keeps the old
import paths for one release."""

from .closed_loop import (AUTOBATCH_FORMAT, TRIGGERS, AutoBatchConfig, Decider, agreement, default_window,  # noqa: F401
                          describe, lead_limit, main_run_lead, probe_gap, run_auto_batch)
from .closed_loop.config import MIN_PROBE_STEPS  # noqa: F401

__all__ = ["AutoBatchConfig", "run_auto_batch", "describe", "default_window", "main_run_lead", "lead_limit",
           "probe_gap", "agreement", "TRIGGERS", "AUTOBATCH_FORMAT", "MIN_PROBE_STEPS", "Decider"]
