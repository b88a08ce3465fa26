"""Batch-size warmup: derived from a CBS curve (:mod:`.derive`, ``critbatch schedule``) and compared
against small- and large-batch controls (:mod:`.compare`, ``critbatch compare``)."""

from .compare import CompareConfig, build_configs, mean_train_loss, run_compare, run_dir, summarize
from .derive import ScheduleConfig, write_schedule

__all__ = ["ScheduleConfig", "write_schedule", "CompareConfig", "run_compare", "build_configs", "summarize", "run_dir", "mean_train_loss"]
