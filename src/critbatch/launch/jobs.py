"""One job: a directory holding ``job.json``, trained by :func:`run_job`; and what the launchers share
(device slots, thread settings, the checks made before anything is written)."""

from __future__ import annotations

import fcntl
import os
import signal
from pathlib import Path
from typing import Iterable

import torch

from ..dist import barrier, init_distributed, resolve_device
from ..errors import ConfigError, CritbatchError
from ..registry import Registry
from ..io import read_json
from ..train import JobSpec
from ..train.early_stop import STOPPED_FILE

LAUNCHERS = Registry("launcher")
"""Launchers by name (:class:`critbatch.launch.pool.Launcher`; registered in :mod:`critbatch.launch.pool`)."""


class Interrupted(CritbatchError):
    """A job paused on a stop signal (preemption, time limit): its resume checkpoint is written and
    running it again continues from there."""

    def __init__(self, job_dir: Path, signum: int, tokens: int):
        self.job_dir, self.signum, self.tokens = job_dir, signum, tokens
        name = signal.Signals(signum).name
        super().__init__(f"job {job_dir.name} stopped by {name} at {tokens:,} tokens (resume checkpoint saved)")


def run_job(job_dir: str | Path, threads: int | None = None, callbacks: Iterable = (),
            stop_on_signals: bool = False) -> dict | None:
    """Train one job (or return its finished result) with the callbacks its job.json names, then
    ``callbacks`` (instances), then an early stop when the directory holds a stop rule
    (:meth:`critbatch.train.JobSpec.trainer`). A file lock makes a second process wait for the first
    instead of training the same job twice; a killed job resumes from its checkpoint.

    Under torchrun every rank calls this: rank 0 holds the lock and the others wait for it at a
    barrier. ``stop_on_signals`` (workers, Slurm tasks): SIGTERM/SIGUSR1/SIGUSR2 pause the job at
    the next step boundary with a resume checkpoint, and :class:`Interrupted` is raised. A job that
    stops early writes ``stopped.json`` and returns ``None``."""
    d = Path(job_dir)
    job = JobSpec.read(d)
    info = init_distributed(resolve_device(job.train_config().device).type)  # a single process without torchrun
    with open(d / ".lock", "w") as lock:
        if info.is_main:
            fcntl.flock(lock, fcntl.LOCK_EX)
        barrier(info)  # every rank decides after rank 0 holds the lock
        if (d / "result.json").is_file():
            return read_json(d / "result.json")
        old = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            if info.is_main:
                (d / STOPPED_FILE).unlink(missing_ok=True)  # it trains on: an earlier stop no longer holds
            t = job.trainer(d, callbacks, stop_on_signals=stop_on_signals)
            result = t.run()
            if result is None and t.stop_signal is not None:
                raise Interrupted(d, t.stop_signal, t.tokens)
            return result
        finally:
            torch.set_num_threads(old)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; ``os.cpu_count()`` counts the machine's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def inprocess_threads() -> int:
    """Threads for a run trained in this process: ``OMP_NUM_THREADS`` when the user set it, else the
    usable cores. More threads than free cores makes OpenMP spin against the other work: a demo step
    ran 1.6 s instead of 0.02 s with two threads beside one busy core (docs/LOG.md)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return usable_cores()


def default_jobs(threads_per_job: int = 1, device: str = "auto") -> int:
    """One job per GPU on CUDA, else one per ``threads_per_job`` cores (two one-thread branches beat
    one two-thread branch by 1.35x on the 2-core CPU; docs/LOG.md)."""
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.device_count()
    return max(1, usable_cores() // max(1, threads_per_job))


def visible_gpus() -> list[str]:
    """The GPUs the local pool hands out: ``CRITBATCH_GPUS`` (comma-separated ids), else those this
    process sees (its ``CUDA_VISIBLE_DEVICES``, so a pool started on GPUs 2,3 stays on them)."""
    gpus = os.environ.get("CRITBATCH_GPUS")
    if gpus is None:
        try:
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except Exception:  # noqa: BLE001
            n = 0
        seen = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
        gpus = ",".join(seen[:n] if len(seen) >= n and n else [str(i) for i in range(n)])
    return [g for g in gpus.split(",") if g != ""]


def worker_env(threads: int, slot: int, nproc: int = 1) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    ids = visible_gpus()
    if ids:  # slot s gets GPUs s·n .. s·n+n-1 (mod the GPUs): several jobs per GPU when jobs·n > GPUs
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[(slot * nproc + i) % len(ids)] for i in range(nproc))
    return env


def die_with_parent(sig: int = signal.SIGKILL):  # pragma: no cover - runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001
        pass


def die_with_parent_term():  # pragma: no cover - torchrun forwards SIGTERM to its ranks, which checkpoint
    die_with_parent(signal.SIGTERM)


def _error_line(stderr: str) -> str:
    lines = [x.strip() for x in stderr.strip().splitlines() if x.strip()]
    ours = [x for x in lines if x.startswith("critbatch:")]  # under torchrun, before its own report
    return (ours or lines or ["(no output)"])[-1]


def check_nproc(nproc_per_job: int, launcher: str) -> None:
    """Refuse a rank count the launcher cannot provide (before anything is written)."""
    if not isinstance(nproc_per_job, int) or nproc_per_job < 1:
        raise ConfigError(f"nproc_per_job={nproc_per_job!r} must be a whole number >= 1")
    if nproc_per_job > 1 and launcher in LAUNCHERS and not LAUNCHERS[launcher].multi_rank:
        names = [n for n in LAUNCHERS if LAUNCHERS[n].multi_rank]
        able = ", ".join(names[:-1]) + (" or " if len(names) > 1 else "") + names[-1]
        raise ConfigError(f"nproc_per_job={nproc_per_job} needs launcher {able}; '{launcher}' runs one process")


def check_single_process(what: str) -> None:
    """Sweeps and comparisons orchestrate jobs from one process; their jobs are what runs data-parallel."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise ConfigError(f"{what} runs as one process, not under torchrun (WORLD_SIZE={world}); to train each job "
                          f"on N ranks give it nproc_per_job=N (--nproc-per-job N)")
