"""Jobs and launchers: one training job per directory, run in-process, as worker processes, or on Slurm.

A *job* is a directory holding ``job.json`` — a resolved :class:`TrainConfig`, an optional
checkpoint to start from (a path relative to the job directory) and trainer options — and, once
run, a normal run directory (``config.json``, ``metrics.jsonl``, ``result.json``). Branches and the
runs of a comparison are jobs; launchers differ only in where the Trainer runs, never in what it
computes, so results are identical whichever launcher ran them.

Launchers (``LAUNCHERS``): ``inprocess`` (sequential, in this process); ``local`` (a pool of worker
processes: one job per GPU through ``CUDA_VISIBLE_DEVICES``, several per GPU when ``jobs`` exceeds
the GPUs, or CPU processes); ``slurm`` (a submitit job array; see :mod:`critbatch.launch.slurm`);
``submitit-local`` (the same submitit code path on this machine). With ``nproc_per_job`` > 1 every
job is itself data-parallel: ``torchrun --standalone`` in the local pool, that many Slurm tasks on Slurm.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Callable, Iterable

from ..config import TrainConfig, from_dict, to_dict
from ..errors import ConfigError, CritbatchError
from ..io import read_json, write_json_atomic

LAUNCHERS = ("inprocess", "local", "slurm", "submitit-local")
CALLBACKS = ("gns",)


def write_job(job_dir: str | Path, config: TrainConfig, init_from: str | Path | None = None, *,
              eval_at_start: bool = True, keep_final_checkpoint: bool = True, callbacks: Iterable[str] = ()) -> Path:
    """Create ``job_dir/job.json`` (once: an existing one is left as it is)."""
    d = Path(job_dir)
    if (d / "job.json").is_file():
        return d
    for c in callbacks:
        if c not in CALLBACKS:
            raise CritbatchError(f"unknown job callback {c!r}; accepted: {', '.join(CALLBACKS)}")
    d.mkdir(parents=True, exist_ok=True)
    rel = None if init_from is None else os.path.relpath(Path(init_from).resolve(), d.resolve())
    write_json_atomic(d / "job.json", {"config": to_dict(config), "init_from": rel, "eval_at_start": eval_at_start,
                                       "keep_final_checkpoint": keep_final_checkpoint, "callbacks": list(callbacks)})
    return d


def _make_callbacks(names: Iterable[str]) -> list:
    out = []
    for n in names:
        if n == "gns":
            from ..gns import NoiseScaleCallback

            out.append(NoiseScaleCallback())
    return out


class Interrupted(CritbatchError):
    """A job paused on a stop signal (preemption, time limit): its resume checkpoint is written and
    running it again continues from there."""

    def __init__(self, job_dir: Path, signum: int, tokens: int):
        self.job_dir, self.signum, self.tokens = job_dir, signum, tokens
        name = signal.Signals(signum).name
        super().__init__(f"job {job_dir.name} stopped by {name} at {tokens:,} tokens (resume checkpoint saved)")


def run_job(job_dir: str | Path, threads: int | None = None, callbacks: Iterable = (),
            stop_on_signals: bool = False) -> dict | None:
    """Train one job (or return its finished result). A file lock makes a second process wait for
    the first instead of training the same job twice; a killed job resumes from its checkpoint.

    Under torchrun every rank calls this: rank 0 holds the lock and the others wait for it at a
    barrier. ``stop_on_signals`` (workers, Slurm tasks): SIGTERM/SIGUSR1/SIGUSR2 pause the job at
    the next step boundary with a resume checkpoint, and :class:`Interrupted` is raised."""
    import fcntl

    import torch

    from ..dist import barrier, init_distributed
    from ..train import Trainer
    from ..train.loop import resolve_device

    d = Path(job_dir)
    job = read_json(d / "job.json")
    cfg = from_dict(TrainConfig, job["config"])
    info = init_distributed(resolve_device(cfg.device).type)  # a single process without torchrun
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
            init = (d / job["init_from"]) if job.get("init_from") else None
            t = Trainer(cfg, d, init_from=init, progress=False, quiet=True, eval_at_start=job.get("eval_at_start", True),
                        keep_final_checkpoint=job.get("keep_final_checkpoint", True),
                        callbacks=[*_make_callbacks(job.get("callbacks", [])), *callbacks],
                        stop_on_signals=stop_on_signals)
            result = t.run()
            if result is None and t.stop_signal is not None:
                raise Interrupted(d, t.stop_signal, t.tokens)
            return result
        finally:
            torch.set_num_threads(old)


def default_jobs(threads_per_job: int = 1, device: str = "auto") -> int:
    """One job per GPU on CUDA, else one per ``threads_per_job`` cores (two one-thread branches beat
    one two-thread branch by 1.35x on the 2-core CPU; docs/LOG.md)."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.device_count()
    return max(1, (os.cpu_count() or 1) // max(1, threads_per_job))


def visible_gpus() -> list[str]:
    """The GPUs the local pool hands out: ``CRITBATCH_GPUS`` (comma-separated ids), else those this
    process sees (its ``CUDA_VISIBLE_DEVICES``, so a pool started on GPUs 2,3 stays on them)."""
    gpus = os.environ.get("CRITBATCH_GPUS")
    if gpus is None:
        try:
            import torch

            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except Exception:  # noqa: BLE001
            n = 0
        seen = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
        gpus = ",".join(seen[:n] if len(seen) >= n and n else [str(i) for i in range(n)])
    return [g for g in gpus.split(",") if g != ""]


def _worker_env(threads: int, slot: int, nproc: int = 1) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    ids = visible_gpus()
    if ids:  # slot s gets GPUs s·n .. s·n+n-1 (mod the GPUs): several jobs per GPU when jobs·n > GPUs
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[(slot * nproc + i) % len(ids)] for i in range(nproc))
    return env


def _die_with_parent(sig: int = signal.SIGKILL):  # pragma: no cover - runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001
        pass


def _die_with_parent_term():  # pragma: no cover - torchrun forwards SIGTERM to its ranks, which checkpoint
    _die_with_parent(signal.SIGTERM)


def _error_line(stderr: str) -> str:
    lines = [x.strip() for x in stderr.strip().splitlines() if x.strip()]
    ours = [x for x in lines if x.startswith("critbatch:")]  # under torchrun, before its own report
    return (ours or lines or ["(no output)"])[-1]


def run_jobs(dirs: list[Path], jobs: int, threads: int, launcher: str = "local",
             on_done: Callable[[Path], None] = lambda d: None, *, nproc_per_job: int = 1,
             slurm: dict | None = None) -> None:
    """Run job directories, ``jobs`` at a time. Finished ones are skipped; order and concurrency
    never change results. ``nproc_per_job`` ranks train each job (data-parallel); ``slurm``:
    :class:`critbatch.launch.slurm.SlurmConfig` options of the ``slurm``/``submitit-local`` launchers."""
    if launcher not in LAUNCHERS:
        raise CritbatchError(f"launcher {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    check_nproc(nproc_per_job, launcher)
    todo = [d for d in dirs if not (d / "result.json").is_file()]
    for d in dirs:
        if d not in todo:
            on_done(d)
    if not todo:
        return
    if launcher == "inprocess":
        for d in todo:
            run_job(d, threads)
            on_done(d)
        return
    if launcher in ("slurm", "submitit-local"):
        from .slurm import run_submitit

        run_submitit(todo, jobs, threads, launcher, on_done, nproc_per_job, slurm)
        return
    import subprocess
    import sys
    import threading
    from concurrent.futures import ThreadPoolExecutor

    free_slots = list(range(jobs))
    lock = threading.Lock()
    errors: list[str] = []

    def work(d: Path) -> None:
        with lock:
            slot = free_slots.pop(0)
        try:
            cmd = ["-m", "critbatch.launch.worker", str(d), "--threads", str(threads)]
            if nproc_per_job > 1:  # a data-parallel job: torchrun on a free port of its own
                cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_job}", *cmd]
            r = subprocess.run([sys.executable, *cmd], env=_worker_env(threads, slot, nproc_per_job),
                               capture_output=True, text=True,
                               preexec_fn=_die_with_parent if nproc_per_job == 1 else _die_with_parent_term)
            if r.returncode != 0:
                errors.append(f"job {d.name} failed: {_error_line(r.stderr)}")
            else:
                on_done(d)
        finally:
            with lock:
                free_slots.append(slot)

    with ThreadPoolExecutor(max_workers=jobs) as ex:
        list(ex.map(work, todo))
    if errors:
        raise CritbatchError(f"{len(errors)} job(s) failed; first: {errors[0]}")


def check_launch(launcher: str, nproc_per_job: int = 1, slurm: dict | None = None) -> None:
    """Everything about where jobs run that can be checked before anything is written."""
    if launcher not in LAUNCHERS:
        raise ConfigError(f"launcher {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    check_nproc(nproc_per_job, launcher)
    from .slurm import check_slurm_here, slurm_config

    slurm_config(slurm)
    if launcher == "slurm":
        check_slurm_here()


def check_nproc(nproc_per_job: int, launcher: str) -> None:
    """Refuse a rank count the launcher cannot provide (before anything is written)."""
    if not isinstance(nproc_per_job, int) or nproc_per_job < 1:
        raise ConfigError(f"nproc_per_job={nproc_per_job!r} must be a whole number >= 1")
    if nproc_per_job > 1 and launcher == "inprocess":
        raise ConfigError(f"nproc_per_job={nproc_per_job} needs launcher local, slurm or submitit-local; "
                          f"'inprocess' runs one process")


def check_single_process(what: str) -> None:
    """Sweeps and comparisons orchestrate jobs from one process; their jobs are what runs data-parallel."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise ConfigError(f"{what} runs as one process, not under torchrun (WORLD_SIZE={world}); to train each job "
                          f"on N ranks give it nproc_per_job=N (--nproc-per-job N)")
