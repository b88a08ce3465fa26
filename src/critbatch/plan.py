"""Deprecated: ``critbatch plan`` lives in :mod:`critbatch.closed_loop.plan`; import from
``critbatch.closed_loop``. This module keeps the old import paths for one release."""

from .closed_loop.plan import PlanConfig, describe, estimate, measure_step_seconds, run_plan  # noqa: F401

__all__ = ["PlanConfig", "estimate", "measure_step_seconds", "run_plan", "describe"]
