"""Jobs and launchers: one training job per directory, run in-process, as worker processes, or on Slurm.

A *job* is a directory holding ``job.json`` (:class:`critbatch.train.JobSpec`: a resolved
:class:`TrainConfig`, an optional checkpoint to start from, trainer options and named callbacks)
and, once run, a normal run directory (``config.json``, ``metrics.jsonl``, ``result.json``).
Branches and the runs of a comparison are jobs; launchers differ only in where the Trainer runs,
never in what it computes, so results are identical whichever launcher ran them.

Launchers (:data:`LAUNCHERS`, a registry): ``inprocess`` (sequential, in this process); ``local`` (a
pool of worker processes: one job per GPU through ``CUDA_VISIBLE_DEVICES``, several per GPU when
``jobs`` exceeds the GPUs, or CPU processes); ``slurm`` (a submitit job array; see
:mod:`critbatch.launch.slurm`); ``submitit-local`` (the same submitit code path on this machine).
With ``nproc_per_job`` > 1 every job is itself data-parallel: ``torchrun --standalone`` in the local
pool, that many Slurm tasks on Slurm.
"""

from ..train import make_callbacks, write_job
from .jobs import (LAUNCHERS, Interrupted, check_nproc, check_single_process, default_jobs, inprocess_threads, run_job,
                   usable_cores, visible_gpus, worker_env)
from .pool import Launch, Launcher, check_launch, run_jobs

run_named = run_job
"""Deprecated name of :func:`run_job` (which now builds a job's named callbacks itself)."""

__all__ = ["LAUNCHERS", "Launcher", "Launch", "Interrupted", "run_job", "run_named", "run_jobs", "write_job",
           "make_callbacks", "default_jobs", "inprocess_threads", "usable_cores", "visible_gpus", "worker_env",
           "check_launch", "check_nproc", "check_single_process"]
