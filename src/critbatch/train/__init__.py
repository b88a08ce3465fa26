"""Training: the loop (:mod:`.loop`), its resolved config and pure step arithmetic (:mod:`.resolve`),
its state (:mod:`.state`), callbacks (:mod:`.callbacks`), checkpoints (:mod:`.checkpoint`), jobs
(:mod:`.job`) and several runs trained as one stacked model (:mod:`.stacked`)."""

from .callbacks import Callback, make_callbacks, run_callbacks
from .checkpoint import EVAL_LOSSES_FILE, kept_checkpoints, list_checkpoints, load_checkpoint
from .job import JobSpec, write_job
from .loop import Display, RunOptions, Trainer, train
from .resolve import (StepPlan, autocast, resolve_config, resolve_data, resolved_lr_schedule, run_defaults,
                      step_plan)
from .state import EMA_ALPHA, TrainerState, ema_update

__all__ = ["Callback", "Trainer", "Display", "RunOptions", "TrainerState", "train", "resolve_config", "resolve_data",
           "resolved_lr_schedule", "run_defaults", "step_plan", "StepPlan", "autocast", "ema_update", "EMA_ALPHA",
           "JobSpec", "write_job", "make_callbacks", "run_callbacks", "list_checkpoints", "kept_checkpoints",
           "load_checkpoint", "EVAL_LOSSES_FILE"]
