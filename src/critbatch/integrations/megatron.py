"""Megatron-LM's batch-size ramp-up from a critbatch schedule (megatron-core's
``RampupBatchsizeNumMicroBatchesCalculator``, which every version has; the step schedule of
``--step-batch-size-schedule`` needs megatron-core 0.18+). See :func:`critbatch.schedules.export.to_megatron_rampup`
for when a schedule can be expressed as a ramp-up."""

from __future__ import annotations

from ..errors import ConfigError
from ..schedules import BatchSchedule
from ..schedules.export import to_megatron_rampup


def rampup_arguments(schedule: BatchSchedule) -> dict:
    """``{start_global_batch_size, batch_size_increment, ramup_samples, global_batch_size}`` (the
    calculator's argument names), or a ConfigError saying why the schedule is no ramp-up."""
    args, why = to_megatron_rampup(schedule)
    if args is None:
        raise ConfigError(f"not expressible as Megatron's --rampup-batch-size: {why}")
    parts = args.split()
    start, incr, samples, final = int(parts[1]), int(parts[2]), int(parts[3]), int(parts[5])
    return {"start_global_batch_size": start, "batch_size_increment": incr, "ramup_samples": samples,
            "global_batch_size": final}


def rampup_calculator(schedule: BatchSchedule, micro_batch_size: int = 1, data_parallel_size: int = 1):
    """The real calculator for this schedule (megatron-core must be installed)."""
    try:
        from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator
    except ImportError:
        raise ConfigError("the Megatron ramp-up needs the megatron-core package") from None
    return RampupBatchsizeNumMicroBatchesCalculator(micro_batch_size=micro_batch_size,
                                                    data_parallel_size=data_parallel_size,
                                                    decrease_batch_size_if_needed=False, rank=0,
                                                    **rampup_arguments(schedule))
