"""The closed loop: one training run that measures its own local CBS at probe points and raises its
batch when the measurement says it is safe (``critbatch train --auto-batch``), and the planner that
estimates what it will cost and save before a run (``critbatch plan``).

By concern: :mod:`.config` (what the loop is asked), :mod:`.policy` (the raise policy: pure functions
of verdicts and earlier decisions), :mod:`.loop` (segments, probes, decisions, the run's result) and
:mod:`.plan` (the estimate before a run).
"""

from .config import AUTOBATCH_FORMAT, TRIGGERS, AutoBatchConfig, default_window
from .loop import ClosedLoop, Decider, describe, read_spec, run_auto_batch, segment_config
from .plan import PlanConfig, estimate, measure_step_seconds, run_plan
from .plan import describe as describe_plan
from .policy import (RaiseDecision, agreement, decide_raise, futile_point, lead_limit, main_run_lead, next_point,
                     point_measurement, probe_gap, raise_streak)

__all__ = ["AutoBatchConfig", "TRIGGERS", "AUTOBATCH_FORMAT", "default_window", "ClosedLoop", "Decider", "describe",
           "run_auto_batch", "read_spec", "segment_config", "PlanConfig", "estimate", "measure_step_seconds", "run_plan",
           "describe_plan", "RaiseDecision", "agreement", "decide_raise", "futile_point", "point_measurement", "lead_limit", "main_run_lead", "next_point",
           "probe_gap", "raise_streak"]
