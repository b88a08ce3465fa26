"""Run many job directories: in this process, as a pool of worker processes (one job per GPU, or
per CPU core), or through submitit on Slurm. Order and concurrency never change results."""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, CritbatchError
from ..train.stacked import run_jobs_stacked, stacks
from .jobs import LAUNCHERS, _error_line, check_nproc, die_with_parent, die_with_parent_term, worker_env
from .slurm import check_slurm_here, run_submitit, slurm_config
from .worker import run_named


def run_jobs(dirs: list[Path], jobs: int, threads: int, launcher: str = "local",
             on_done: Callable[[Path], None] = lambda d: None, *, nproc_per_job: int = 1,
             slurm: dict | None = None, stack: int = 1) -> None:
    """Run job directories, ``jobs`` at a time. Finished ones are skipped; order and concurrency
    never change results. ``nproc_per_job`` ranks train each job (data-parallel); ``slurm``:
    :class:`critbatch.launch.slurm.SlurmConfig` options of the ``slurm``/``submitit-local`` launchers.
    ``stack`` > 1: jobs of one shape train together, up to that many in one stacked model
    (:mod:`critbatch.train.stacked`; in process and in the local pool, one process per stack, with
    one rank; their numbers agree with training alone to float rounding)."""
    if launcher not in LAUNCHERS:
        raise CritbatchError(f"launcher {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    check_nproc(nproc_per_job, launcher)
    todo = [d for d in dirs if not (d / "result.json").is_file()]
    for d in dirs:
        if d not in todo:
            on_done(d)
    if not todo:
        return
    units = stacks(todo, stack) if stack > 1 and nproc_per_job == 1 and launcher in ("inprocess", "local") \
        else [[d] for d in todo]
    if launcher == "inprocess":
        for unit in units:
            if len(unit) == 1:
                run_named(unit[0], threads)
            else:
                run_jobs_stacked(unit, threads)
            for d in unit:
                on_done(d)
        return
    if launcher in ("slurm", "submitit-local"):
        run_submitit(todo, jobs, threads, launcher, on_done, nproc_per_job, slurm)
        return
    free_slots = list(range(jobs))
    lock = threading.Lock()
    errors: list[str] = []

    def work(unit: list[Path]) -> None:
        with lock:
            slot = free_slots.pop(0)
        d = unit[0]
        try:
            cmd = ["-m", "critbatch.launch", *map(str, unit), "--threads", str(threads)]
            if nproc_per_job > 1:  # a data-parallel job: torchrun on a free port of its own
                cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_job}", *cmd]
            r = subprocess.run([sys.executable, *cmd], env=worker_env(threads, slot, nproc_per_job),
                               capture_output=True, text=True,
                               preexec_fn=die_with_parent if nproc_per_job == 1 else die_with_parent_term)
            if r.returncode != 0:
                errors.append(f"job {d.name} failed: {_error_line(r.stderr)}")
            else:
                for x in unit:
                    on_done(x)
        finally:
            with lock:
                free_slots.append(slot)

    with ThreadPoolExecutor(max_workers=jobs) as ex:
        list(ex.map(work, units))
    if errors:
        raise CritbatchError(f"{len(errors)} job(s) failed; first: {errors[0]}")


def check_launch(launcher: str, nproc_per_job: int = 1, slurm: dict | None = None) -> None:
    """Everything about where jobs run that can be checked before anything is written."""
    if launcher not in LAUNCHERS:
        raise ConfigError(f"launcher {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    check_nproc(nproc_per_job, launcher)
    slurm_config(slurm)
    if launcher == "slurm":
        check_slurm_here()


