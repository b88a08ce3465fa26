"""Branch sweeps: the local critical batch size by branched training (Merrill et al. 2025 §3).

The package by concern — :mod:`.config` (what a sweep is asked), :mod:`.plan` (checked and resolved
against the parent run before anything is written), :mod:`.spec` (one branch: its config, id and
job directory), :mod:`.continuation` (the part of a branch the parent already trained),
:mod:`.curve` (deciding each point and writing ``cbs.json``) and :mod:`.run` (training the branches:
:func:`run_sweep`, the one entry point every caller uses).
"""

from ..analysis.describe import describe_point
from ..analysis.search import AdaptiveSearch
from .config import STACK_CUDA, SweepConfig
from .continuation import (agreeing_steps, continuation_checkpoints, continuation_tokens, cooldown_tokens,
                           last_step_before_cooldown, parent_continuation)
from .curve import branch_outcome, build_curve, decide_point, write_curve
from .plan import BranchPoint, SweepPlan, plan_sweep
from .run import SweepResult, choose_stack, run_branch_dir, run_sweep
from .spec import BranchSpec, branch_config, branch_spec, ensure_branch

__all__ = ["SweepConfig", "SweepPlan", "SweepResult", "BranchPoint", "BranchSpec", "plan_sweep", "run_sweep",
           "run_branch_dir", "branch_spec", "branch_config", "ensure_branch", "branch_outcome", "build_curve",
           "decide_point", "write_curve", "choose_stack", "describe_point", "continuation_checkpoints",
           "last_step_before_cooldown", "cooldown_tokens", "agreeing_steps", "continuation_tokens",
           "parent_continuation", "AdaptiveSearch", "STACK_CUDA"]
