"""Jobs and launchers: one training job per directory, run in-process or as worker processes.

A *job* is a directory holding ``job.json`` — a resolved :class:`TrainConfig`, an optional
checkpoint to start from (a path relative to the job directory) and trainer options — and, once
run, a normal run directory (``config.json``, ``metrics.jsonl``, ``result.json``). Branches and the
runs of a comparison are jobs; launchers differ only in where the Trainer runs, never in what it
computes, so results are identical whichever launcher ran them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

from ..config import TrainConfig, from_dict, to_dict
from ..errors import CritbatchError
from ..io import read_json, write_json_atomic

LAUNCHERS = ("inprocess", "local")
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


def run_job(job_dir: str | Path, threads: int | None = None, callbacks: Iterable = ()) -> dict | None:
    """Train one job (or return its finished result). A file lock makes a second process wait for
    the first instead of training the same job twice; a killed job resumes from its checkpoint."""
    import fcntl

    import torch

    from ..train import Trainer

    d = Path(job_dir)
    job = read_json(d / "job.json")
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (d / "result.json").is_file():
            return read_json(d / "result.json")
        old = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            cfg = from_dict(TrainConfig, job["config"])
            init = (d / job["init_from"]) if job.get("init_from") else None
            t = Trainer(cfg, d, init_from=init, progress=False, quiet=True, eval_at_start=job.get("eval_at_start", True),
                        keep_final_checkpoint=job.get("keep_final_checkpoint", True),
                        callbacks=[*_make_callbacks(job.get("callbacks", [])), *callbacks])
            return t.run()
        finally:
            torch.set_num_threads(old)


def default_jobs(threads_per_job: int = 1, device: str = "auto") -> int:
    """One job per GPU on CUDA, else one per ``threads_per_job`` cores (two one-thread branches beat
    one two-thread branch by 1.35x on the 2-core CPU; docs/LOG.md)."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.device_count()
    return max(1, (os.cpu_count() or 1) // max(1, threads_per_job))


def _worker_env(threads: int, slot: int) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    gpus = os.environ.get("CRITBATCH_GPUS")
    if gpus is None:
        try:
            import torch

            gpus = ",".join(str(i) for i in range(torch.cuda.device_count())) if torch.cuda.is_available() else ""
        except Exception:  # noqa: BLE001
            gpus = ""
    ids = [g for g in gpus.split(",") if g != ""]
    if ids:
        env["CUDA_VISIBLE_DEVICES"] = ids[slot % len(ids)]  # several jobs per GPU when jobs > GPUs
    return env


def _die_with_parent():  # pragma: no cover - runs in the child between fork and exec
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001
        pass


def run_jobs(dirs: list[Path], jobs: int, threads: int, launcher: str = "local",
             on_done: Callable[[Path], None] = lambda d: None) -> None:
    """Run job directories, ``jobs`` at a time. Finished ones are skipped; order and concurrency
    never change results."""
    if launcher not in LAUNCHERS:
        raise CritbatchError(f"launcher {launcher!r} is not one of {', '.join(LAUNCHERS)}")
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
            cmd = [sys.executable, "-m", "critbatch.launch.worker", str(d), "--threads", str(threads)]
            r = subprocess.run(cmd, env=_worker_env(threads, slot), capture_output=True, text=True,
                               preexec_fn=_die_with_parent)
            if r.returncode != 0:
                last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
                errors.append(f"job {d.name} failed: {last}")
            else:
                on_done(d)
        finally:
            with lock:
                free_slots.append(slot)

    with ThreadPoolExecutor(max_workers=jobs) as ex:
        list(ex.map(work, todo))
    if errors:
        raise CritbatchError(f"{len(errors)} job(s) failed; first: {errors[0]}")
