"""Warm workers: the local pool's processes stay up and train many jobs each, so a sweep of short
branches does not pay a process start (interpreter, torch, critbatch imports; on a GPU, CUDA start-up)
per branch.

A worker (``python -m critbatch.launch --serve``) reads one request a line on stdin — the job
directories of one unit (a job, or several trained stacked) — trains it exactly as a one-job worker
would (:func:`critbatch.launch.run_job`, with stop signals armed) and answers one JSON line on its own
channel (the process's original stdout; everything else it prints goes to stderr). Nothing carries
over between jobs that decides a number: every Trainer seeds, sets its thread count and builds its
model afresh, as the in-process launcher's sequential runs do.

Isolation as with one process per job: a job that fails with an expected error is reported and the
worker serves on; a worker that crashes or is killed fails only the job it held (its last stderr
line is the error) and the pool starts a fresh one for the rest; a worker with an unexpected
exception answers and exits, so the next job gets a clean process. A job directory is locked while
it trains, so no job is trained twice, and a killed job resumes from its checkpoint when run again.
Workers start with the caller's directory off their import path (``-P``; ``-I`` before Python 3.11),
so a file in the launch directory named like a module (``concurrent.py``) cannot replace it.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Callable

from ..errors import CritbatchError
from .jobs import Interrupted, _error_line, die_with_parent, run_job, worker_env


def python_command() -> list[str]:
    """The interpreter, started with the current directory off ``sys.path``."""
    return [sys.executable, "-P" if sys.version_info >= (3, 11) else "-I"]


def serve(threads: int) -> int:
    """The worker's loop: one unit a line on stdin, one JSON answer a line on the original stdout."""
    from ..train.stacked import run_jobs_stacked

    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the training prints goes to stderr, never into the answers
    sys.stdout = sys.stderr
    for line in sys.stdin:
        dirs = json.loads(line)["dirs"]
        try:
            if len(dirs) == 1:
                run_job(dirs[0], threads, stop_on_signals=True)
            else:
                run_jobs_stacked(dirs, threads)
            answer = {"ok": True}
        except Interrupted as e:
            print(f"critbatch: {e}; run it again to resume", file=sys.stderr, flush=True)
            channel.write(json.dumps({"ok": False, "error": str(e), "fatal": True}) + "\n")
            return 128 + e.signum
        except CritbatchError as e:
            print(f"critbatch: error: {e}", file=sys.stderr, flush=True)
            answer = {"ok": False, "error": str(e).splitlines()[0], "fatal": False}
        except Exception as e:  # noqa: BLE001 - a bug: report it, and leave the next job a clean process
            traceback.print_exc()
            channel.write(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}", "fatal": True}) + "\n")
            return 1
        channel.write(json.dumps(answer) + "\n")
    return 0


class Worker:
    """One warm worker process in pool slot ``slot`` (its GPUs, its threads)."""

    def __init__(self, slot: int, threads: int):
        self.proc = subprocess.Popen([*python_command(), "-m", "critbatch.launch", "--serve", "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=worker_env(threads, slot), preexec_fn=die_with_parent)
        self.stderr: collections.deque[str] = collections.deque(maxlen=400)
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)

    def run(self, unit: list[Path]) -> str | None:
        """Train ``unit`` in this worker; ``None`` when it finished, else the error line. A worker
        that answers with an error it cannot serve on past, or dies, is no longer alive."""
        try:
            self.proc.stdin.write(json.dumps({"dirs": [str(Path(d).resolve()) for d in unit]}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:  # it died: killed, crashed, or out of memory
            self.proc.wait()
            self._reader.join(timeout=5)
            return _error_line("".join(self.stderr)) + f" (worker exit status {self.proc.returncode})"
        answer = json.loads(line)
        if answer["ok"]:
            return None
        if not answer["fatal"]:  # an expected error: the worker serves on
            return f"critbatch: error: {answer['error']}"
        self.proc.wait()  # interrupted, or an unexpected exception: it exited
        self._reader.join(timeout=5)
        return _error_line("".join(self.stderr))

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.alive:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            self.proc.wait()
        self._reader.join(timeout=5)


def run_warm(units: list[list[Path]], jobs: int, threads: int, on_done: Callable[[Path], None]) -> list[str]:
    """Train the units on ``jobs`` warm workers (one per slot, replaced when one dies); returns the
    errors, ``job NAME failed: ...`` each."""
    todo: collections.deque[list[Path]] = collections.deque(units)
    lock = threading.Lock()
    errors: list[str] = []

    def slot_loop(slot: int) -> None:
        worker: Worker | None = None
        try:
            while True:
                with lock:
                    if not todo:
                        return
                    unit = todo.popleft()
                if worker is None or not worker.alive:
                    worker = Worker(slot, threads)
                err = worker.run(unit)
                if err is None:
                    for d in unit:
                        on_done(d)
                else:
                    with lock:
                        errors.append(f"job {unit[0].name} failed: {err}")
        finally:
            if worker is not None:
                worker.close()

    slots = [threading.Thread(target=slot_loop, args=(s,), daemon=True) for s in range(max(1, min(jobs, len(units))))]
    for t in slots:
        t.start()
    for t in slots:
        t.join()
    return errors
