"""Branch sweeps: the local critical batch size by branched training (Merrill et al. 2025 §3)."""

from ..analysis.search import AdaptiveSearch
from .sweep import SweepConfig, SweepResult, plan_sweep, run_branch_dir, run_sweep

__all__ = ["SweepConfig", "SweepResult", "plan_sweep", "run_sweep", "run_branch_dir", "AdaptiveSearch"]
