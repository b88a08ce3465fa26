"""``python -m critbatch.launch JOB_DIR``: run one job in this process (this module; ``__main__`` calls it).

Under ``torchrun --nproc-per-node N -m critbatch.launch JOB_DIR`` the job is data-parallel
over N ranks. SIGTERM, SIGUSR1 or SIGUSR2 pause the job at the next step boundary with a resume
checkpoint; the worker then exits with status 128 + the signal number and running it again
continues the job. Expected mistakes exit with status 2.

The job format lives here too: :func:`write_job` writes ``job.json`` (a resolved config, where to
start from, trainer options and the names of callbacks from :data:`CALLBACKS`) and
:func:`run_named` runs it with those callbacks — the one place that maps a name to a callback, for
every launcher (in-process, worker processes, Slurm tasks).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Iterable


from ..config import TrainConfig, to_dict
from ..dist import shutdown
from ..errors import ConfigError, CritbatchError
from ..gns.online import NoiseScaleCallback
from ..io import read_json, write_json_atomic
from .jobs import Interrupted, run_job

CALLBACKS = {"gns": NoiseScaleCallback}
"""Callbacks a job may name in job.json (``critbatch compare --gns`` asks for the noise scale)."""


def write_job(job_dir: str | Path, config: TrainConfig, init_from: str | Path | None = None, *,
              eval_at_start: bool = True, keep_final_checkpoint: bool = True, callbacks: Iterable[str] = (),
              init_loss_ema: float | None = None) -> Path:
    """Create ``job_dir/job.json`` (once: an existing one is left as it is)."""
    d = Path(job_dir)
    if (d / "job.json").is_file():
        return d
    for c in callbacks:
        if c not in CALLBACKS:
            raise ConfigError(f"unknown job callback {c!r}; accepted: {', '.join(CALLBACKS)}")
    d.mkdir(parents=True, exist_ok=True)
    rel = None if init_from is None else os.path.relpath(Path(init_from).resolve(), d.resolve())
    write_json_atomic(d / "job.json", {"config": to_dict(config), "init_from": rel, "eval_at_start": eval_at_start,
                                       "keep_final_checkpoint": keep_final_checkpoint, "callbacks": list(callbacks),
                                       "init_loss_ema": init_loss_ema})
    return d


def make_callbacks(names: Iterable[str]) -> list:
    unknown = [n for n in names if n not in CALLBACKS]
    if unknown:
        raise ConfigError(f"unknown job callback {unknown[0]!r}; accepted: {', '.join(CALLBACKS)}")
    return [CALLBACKS[n]() for n in names]


def run_named(job_dir: str | Path, threads: int | None = None, *, extra: Iterable = (),
              stop_on_signals: bool = False) -> dict | None:
    """Run a job with the callbacks its job.json names (plus ``extra`` instances)."""
    names = read_json(Path(job_dir) / "job.json").get("callbacks", [])
    return run_job(job_dir, threads, [*make_callbacks(names), *extra], stop_on_signals=stop_on_signals)


def main() -> int:
    ap = argparse.ArgumentParser(prog="critbatch.launch.worker")
    ap.add_argument("job_dir", nargs="+", help="one job; several: trained together as one stacked model")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    try:
        if len(a.job_dir) == 1:
            run_named(a.job_dir[0], a.threads, stop_on_signals=True)
        else:
            from ..train.stacked import run_jobs_stacked

            run_jobs_stacked(a.job_dir, a.threads)
    except Interrupted as e:
        print(f"critbatch: {e}; run it again to resume", file=sys.stderr)
        return 128 + e.signum
    except CritbatchError as e:
        print(f"critbatch: error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
