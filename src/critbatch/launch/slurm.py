"""Jobs on Slurm through submitit (``launcher="slurm"``), or through submitit's local executor
(``launcher="submitit-local"``: the same code path on one machine, for tests and for trying it out).

Each job directory becomes one task of a Slurm job array. A task runs :func:`critbatch.launch.run_job`
with stop signals armed: when Slurm preempts it or its time limit nears (submitit asks for USR2
``signal_delay_s`` before the limit; SIGTERM and SIGUSR1 are handled alike), the Trainer finishes the
step it is in, writes a resume checkpoint into the job directory and returns; the task then asks
submitit to requeue it, and the requeued task resumes from that checkpoint. Results are the same as
from any other launcher.

With ``nproc_per_job`` > 1 a job is one Slurm allocation of that many tasks on one node (one per
rank, ``gpus_per_task`` GPUs each); every task reads its rank from Slurm through
``submitit.helpers.TorchDistributedEnvironment`` and the Trainer joins the process group as it does
under torchrun.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config import from_dict
from ..dist import shutdown
from ..errors import ConfigError, CritbatchError
from ..train.early_stop import STOPPED_FILE
from .jobs import Interrupted, run_job, visible_gpus


@dataclass
class SlurmConfig:
    """Resources of one job (a branch, or a run of a comparison) on Slurm."""

    partition: str | None = None
    """Slurm partition (``--partition``); ``None``: the cluster's default."""
    account: str | None = None
    """Account to charge (``--account``)."""
    qos: str | None = None
    """Quality of service (``--qos``)."""
    constraint: str | None = None
    """Node features (``--constraint``), e.g. ``h100``."""
    time_min: int = 60
    """Wall-clock limit of one job in minutes. A job that reaches it saves a resume checkpoint and is
    requeued (at most ``max_requeues`` times); a branch needs only its window, so keep this short."""
    gpus_per_task: int = 1
    """GPUs per rank (``0``: CPU-only jobs). A job has ``nproc_per_job`` ranks."""
    cpus_per_task: int = 8
    """CPU cores per rank (data loading is light; these are for the host side of the step)."""
    mem_gb: int | None = None
    """Memory per job in GB (``--mem``); ``None``: the partition's default."""
    array_parallelism: int = 64
    """Jobs of the array running at once (``--array=...%N``)."""
    max_requeues: int = 3
    """How often a job that hit its time limit is requeued (preemptions always requeue)."""
    jobs_per_task: int = 1
    """Jobs one task of the array trains one after another in one process: short branches then pay one
    process start (and CUDA start-up, and queue wait) for several. A requeued task skips the jobs it
    finished and resumes the one it was in. Give ``time_min`` for all of them. Single-rank jobs only."""
    signal_delay_s: int = 120
    """Seconds before the time limit at which the job is told to checkpoint (USR2)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run in the job before Python starts (``module load ...``, ``source .venv/bin/activate``)."""
    folder: str | None = None
    """Where submitit keeps its scripts, pickles and logs; ``None``: ``submitit/`` beside the jobs
    (``RUN/submitit`` for a sweep, ``OUT/submitit`` for a comparison)."""
    additional: dict[str, str] = field(default_factory=dict)
    """Further ``#SBATCH`` options, e.g. ``{"reservation": "mine", "exclude": "node12"}``."""


def slurm_config(value: SlurmConfig | dict | None) -> SlurmConfig:
    """A :class:`SlurmConfig` from a config-file dict (unknown keys are errors naming them)."""
    if isinstance(value, SlurmConfig):
        cfg = value
    else:
        try:
            cfg = from_dict(SlurmConfig, value or {}, "slurm")
        except ConfigError as e:
            raise ConfigError(str(e).replace("config key", "slurm option")) from None
    for name in ("time_min", "cpus_per_task", "array_parallelism", "signal_delay_s", "jobs_per_task"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"slurm.{name}={getattr(cfg, name)} must be >= 1")
    if cfg.gpus_per_task < 0 or cfg.max_requeues < 0:
        raise ConfigError(f"slurm.gpus_per_task={cfg.gpus_per_task} and slurm.max_requeues={cfg.max_requeues} "
                          f"must be >= 0")
    return cfg


def executor_parameters(cfg: SlurmConfig, nproc_per_job: int) -> dict:
    """submitit ``update_parameters`` keywords for one job of ``nproc_per_job`` ranks on one node."""
    p = {"name": "critbatch", "timeout_min": cfg.time_min, "nodes": 1, "tasks_per_node": nproc_per_job,
         "cpus_per_task": cfg.cpus_per_task, "gpus_per_node": cfg.gpus_per_task * nproc_per_job,
         "slurm_array_parallelism": cfg.array_parallelism, "slurm_signal_delay_s": cfg.signal_delay_s}
    if cfg.mem_gb is not None:
        p["mem_gb"] = cfg.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(cfg, key):
            p[f"slurm_{key}"] = getattr(cfg, key)
    if cfg.setup:
        p["slurm_setup"] = list(cfg.setup)
    if cfg.additional:
        p["slurm_additional_parameters"] = dict(cfg.additional)
    return p


def check_slurm_here() -> None:
    """The ``slurm`` launcher submits with sbatch and runs tasks with srun: refuse early without them."""
    import shutil

    if shutil.which("srun") is None or shutil.which("sbatch") is None:
        raise CritbatchError("launcher 'slurm' needs a Slurm cluster (no srun/sbatch on PATH here); use 'local' or "
                             "'submitit-local'")


def make_executor(launcher: str, folder: Path, cfg: SlurmConfig, nproc_per_job: int):
    import submitit

    if launcher == "slurm":
        check_slurm_here()
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=cfg.max_requeues)
        ex.update_parameters(**executor_parameters(cfg, nproc_per_job))
        return ex
    ex = submitit.LocalExecutor(folder=folder, max_num_timeout=cfg.max_requeues)
    gpus = cfg.gpus_per_task * nproc_per_job if _cuda_count() else 0
    ex.update_parameters(timeout_min=cfg.time_min, tasks_per_node=nproc_per_job, gpus_per_node=gpus,
                         signal_delay_s=cfg.signal_delay_s, **({"setup": list(cfg.setup)} if cfg.setup else {}))
    return ex


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class JobTask:
    """What one submitit task runs: a job directory, with stop signals armed. Checkpointable: on
    requeue submitit calls it again with the same directory, and the Trainer resumes from there."""

    def __init__(self, threads: int):
        self.threads = threads

    def __call__(self, job_dir: str | list[str]) -> dict | None:
        import submitit

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # one rank per task; the Trainer joins through env://
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        dirs = [job_dir] if isinstance(job_dir, str) else list(job_dir)
        try:
            failed = []
            for d in dirs:  # several jobs a task: one after another (a finished one returns at once)
                try:
                    result = run_job(d, self.threads, stop_on_signals=True)
                except CritbatchError as e:
                    if isinstance(e, Interrupted) or len(dirs) == 1:
                        raise
                    print(f"critbatch: error: job {Path(d).name}: {e}", file=sys.stderr, flush=True)
                    failed.append(Path(d).name)
            if failed:
                raise CritbatchError(f"{len(failed)} of {len(dirs)} jobs of this task failed: {', '.join(failed)}")
            return result
        except Interrupted as e:
            print(f"critbatch: {e}; asking submitit to requeue it", file=sys.stderr, flush=True)
            # submitit's own preemption handler (restored when the Trainer returned): it dumps
            # checkpoint()'s resubmission, requeues the job and exits; on ranks > 0 it returns.
            handler = signal.getsignal(env._usr_sig())
            if callable(handler):
                handler(e.signum, None)
                return None
            raise
        except CritbatchError as e:  # an expected failure: one line in the task's log, as the CLI prints it
            if len(dirs) == 1:
                print(f"critbatch: error: {e}", file=sys.stderr, flush=True)
            raise
        finally:
            shutdown()

    def checkpoint(self, job_dir: str | list[str]):
        """The requeued task: the same directory (the Trainer resumes from its resume checkpoint)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, job_dir)


def _last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    mine = [x for x in lines if x.startswith("critbatch:")]
    return (mine or lines or ["(no output)"])[-1].strip()


def run_submitit(dirs: list[Path], jobs: int, threads: int, launcher: str, on_done: Callable[[Path], None],
                 nproc_per_job: int = 1, slurm: SlurmConfig | dict | None = None) -> None:
    """Run job directories through submitit and wait for them. On Slurm they are one job array
    (``slurm.array_parallelism`` at once); with the local executor at most ``jobs`` run at once."""
    cfg = slurm_config(slurm)
    folder = Path(cfg.folder) if cfg.folder else Path(dirs[0]).resolve().parent.parent / "submitit"
    ex = make_executor(launcher, folder, cfg, nproc_per_job)
    task = JobTask(threads)
    errors: list[str] = []

    def finish(job, unit: list[Path]) -> None:
        try:
            job.results()  # every task's (one per rank); raises if one failed
        except Exception as e:  # noqa: BLE001 - a failed task is reported, the others go on
            try:
                log = job.stderr() or ""
            except Exception:  # noqa: BLE001
                log = ""
            detail = _last_line(log) if "critbatch:" in log else _last_line(str(e))
        else:
            detail = "the job ended without a result"
        for d in unit:  # each job of the task: finished (or stopped early), or failed with the task's error
            if (d / "result.json").is_file() or (d / STOPPED_FILE).is_file():
                on_done(d)
            else:
                errors.append(f"job {d.name} failed: {detail} (log: {job.paths.stderr})")

    per = cfg.jobs_per_task if nproc_per_job == 1 else 1
    units = [list(dirs[i:i + per]) for i in range(0, len(dirs), per)]

    def arg(unit: list[Path]):
        return str(unit[0]) if len(unit) == 1 else [str(d) for d in unit]

    if launcher == "slurm":
        submitted = list(zip(ex.map_array(task, [arg(u) for u in units]), units))
        pending = dict(enumerate(submitted))
        while pending:
            for i, (job, unit) in list(pending.items()):
                if job.done():
                    finish(job, unit)
                    del pending[i]
            if pending:
                time.sleep(10)
    else:  # a sliding window of `jobs`; like the local pool, slot s gets GPUs s·n .. s·n+n-1 (mod the GPUs)
        ids = visible_gpus() if _cuda_count() else []
        n_gpus = cfg.gpus_per_task * nproc_per_job
        queue, running, free = list(units), [], list(range(max(1, jobs)))
        while queue or running:
            while queue and free:
                unit, slot = queue.pop(0), free.pop(0)
                if ids and n_gpus and all(g.isdigit() for g in ids):
                    ex.update_parameters(visible_gpus=[int(ids[(slot * n_gpus + i) % len(ids)]) for i in range(n_gpus)])
                running.append((ex.submit(task, arg(unit)), unit, slot))
            for item in list(running):
                if item[0].done():
                    finish(item[0], item[1])
                    running.remove(item)
                    free.append(item[2])
            time.sleep(0.2)
    if errors:
        raise CritbatchError(f"{len(errors)} job(s) failed; first: {errors[0]}")


__all__ = ["SlurmConfig", "slurm_config", "executor_parameters", "run_submitit", "JobTask"]
