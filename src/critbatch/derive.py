"""Deprecated: ``critbatch schedule`` lives in :mod:`critbatch.warmup.derive`; import from
``critbatch.warmup``. This module keeps the old import paths for one release."""

from .warmup.derive import ScheduleConfig, write_schedule  # noqa: F401

__all__ = ["ScheduleConfig", "write_schedule"]
