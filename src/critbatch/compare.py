"""Deprecated: ``critbatch compare`` lives in :mod:`critbatch.warmup.compare`; import from
``critbatch.warmup``. This module keeps the old import paths for one release."""

from .warmup.compare import CompareConfig, build_configs, mean_train_loss, run_compare, run_dir, summarize  # noqa: F401

__all__ = ["CompareConfig", "run_compare", "build_configs", "summarize", "run_dir"]
