"""Run many job directories through a launcher: in this process, as a pool of worker processes (one
job per GPU, or per CPU core), or through submitit on Slurm. Order and concurrency never change
results.

Launchers are registered in :data:`LAUNCHERS` (a :class:`critbatch.registry.Registry`); the
``launcher`` fields of the sweep, comparison and closed-loop configs take their values from it.
A :class:`Launcher` trains a list of unfinished job directories (:class:`Launch` says how many at
once, with how many threads and ranks each) and checks, before anything is written, what it can be
asked. Adding one is one ``LAUNCHERS.register(name, Launcher(...))``.
"""

from __future__ import annotations

import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import CritbatchError
from ..train.stacked import run_jobs_stacked, stacks
from .jobs import LAUNCHERS, _error_line, check_nproc, die_with_parent_term, run_job, worker_env
from .slurm import check_slurm_here, run_submitit, slurm_config
from .warm import python_command, run_warm


@dataclass
class Launch:
    """How a launcher runs its jobs."""

    jobs: int
    """Jobs at once."""
    threads: int
    """CPU threads of each job."""
    on_done: Callable[[Path], None]
    """Called with each job directory once it finished."""
    nproc_per_job: int = 1
    """Data-parallel ranks of each job."""
    slurm: dict | None = None
    """Options of the submitit launchers (:class:`critbatch.launch.slurm.SlurmConfig`)."""
    stack: int = 1
    """Jobs of one shape trained together as one stacked model, up to this many (launchers that can)."""


@dataclass(frozen=True)
class Launcher:
    """One way to run jobs."""

    run: Callable[[list[Path], Launch], None]
    """Train the (unfinished) job directories; raise CritbatchError naming the first that failed."""
    check: Callable[[int, dict | None], None] = lambda nproc_per_job, slurm: None
    """Refuse, before anything is written, what it cannot do (ranks per job, Slurm options)."""
    multi_rank: bool = True
    """Can train a job on several ranks (``nproc_per_job`` > 1)."""
    stacks: bool = False
    """Can train jobs of one shape stacked (``stack`` > 1)."""
    description: str = ""


def run_jobs(dirs: list[Path], jobs: int, threads: int, launcher: str = "local",
             on_done: Callable[[Path], None] = lambda d: None, *, nproc_per_job: int = 1,
             slurm: dict | None = None, stack: int = 1) -> None:
    """Run job directories, ``jobs`` at a time, through the launcher named ``launcher``. Finished ones
    are skipped; order and concurrency never change results. ``nproc_per_job`` ranks train each job
    (data-parallel); ``slurm``: :class:`critbatch.launch.slurm.SlurmConfig` options of the
    ``slurm``/``submitit-local`` launchers. ``stack`` > 1: jobs of one shape train together, up to that
    many in one stacked model (:mod:`critbatch.train.stacked`; launchers that can stack, with one
    rank; their numbers agree with training alone to float rounding)."""
    if launcher not in LAUNCHERS:
        raise CritbatchError(f"launcher {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    impl: Launcher = LAUNCHERS[launcher]
    check_nproc(nproc_per_job, launcher)
    todo = [d for d in dirs if not (d / "result.json").is_file()]
    for d in dirs:
        if d not in todo:
            on_done(d)
    if todo:
        impl.run(todo, Launch(jobs, threads, on_done, nproc_per_job, slurm, stack))


def units_of(todo: list[Path], how: Launch) -> list[list[Path]]:
    """The jobs grouped into what trains together: stacks where stacking is asked for, else one each."""
    if how.stack > 1 and how.nproc_per_job == 1:
        return stacks(todo, how.stack)
    return [[d] for d in todo]


def _inprocess(todo: list[Path], how: Launch) -> None:
    for unit in units_of(todo, how):
        if len(unit) == 1:
            run_job(unit[0], how.threads)
        else:
            run_jobs_stacked(unit, how.threads)
        for d in unit:
            how.on_done(d)


def _local(todo: list[Path], how: Launch) -> None:
    """A pool of ``jobs`` worker processes on this machine (GPU slots through ``CUDA_VISIBLE_DEVICES``):
    warm workers that train many jobs each (:mod:`critbatch.launch.warm`); a job of several ranks
    under ``torchrun --standalone``, a process group per job."""
    units = units_of(todo, how)
    if how.nproc_per_job == 1:
        errors = run_warm(units, how.jobs, how.threads, how.on_done)
    else:
        errors = _torchrun_each(units, how)
    if errors:
        raise CritbatchError(f"{len(errors)} job(s) failed; first: {errors[0]}")


def _torchrun_each(units: list[list[Path]], how: Launch) -> list[str]:
    free_slots = list(range(how.jobs))
    lock = threading.Lock()
    errors: list[str] = []

    def work(unit: list[Path]) -> None:
        with lock:
            slot = free_slots.pop(0)
        d = unit[0]
        try:  # a data-parallel job: torchrun on a free port of its own
            cmd = [*python_command(), "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={how.nproc_per_job}", "-m", "critbatch.launch", *(str(Path(x).resolve()) for x in unit),
                   "--threads", str(how.threads)]
            env = {**worker_env(how.threads, slot, how.nproc_per_job), "PYTHONSAFEPATH": "1"}  # the ranks, too
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=die_with_parent_term)
            if r.returncode != 0:
                errors.append(f"job {d.name} failed: {_error_line(r.stderr)}")
            else:
                for x in unit:
                    how.on_done(x)
        finally:
            with lock:
                free_slots.append(slot)

    with ThreadPoolExecutor(max_workers=how.jobs) as ex:
        list(ex.map(work, units))
    return errors


def _submitit(name: str) -> Callable[[list[Path], Launch], None]:
    def run(todo: list[Path], how: Launch) -> None:
        run_submitit(todo, how.jobs, how.threads, name, how.on_done, how.nproc_per_job, how.slurm)
    return run


def _check_slurm(nproc_per_job: int, slurm: dict | None) -> None:
    slurm_config(slurm)
    check_slurm_here()


LAUNCHERS.register("inprocess", Launcher(_inprocess, multi_rank=False, stacks=True,
                                         description="sequential, in this process"))
LAUNCHERS.register("local", Launcher(_local, stacks=True, description="a pool of worker processes on this machine"))
LAUNCHERS.register("slurm", Launcher(_submitit("slurm"), check=_check_slurm, description="a submitit job array on Slurm"))
LAUNCHERS.register("submitit-local", Launcher(_submitit("submitit-local"), check=lambda n, s: slurm_config(s),
                                              description="submitit's executor on this machine"))


def check_launch(launcher: str, nproc_per_job: int = 1, slurm: dict | None = None) -> None:
    """Everything about where jobs run that can be checked before anything is written."""
    LAUNCHERS.check(launcher, "launcher")
    check_nproc(nproc_per_job, launcher)
    slurm_config(slurm)
    LAUNCHERS[launcher].check(nproc_per_job, slurm)
