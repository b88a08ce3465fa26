"""``python -m critbatch.launch JOB_DIR``: run one job in this process (this module; ``__main__`` calls it).

Under ``torchrun --nproc-per-node N -m critbatch.launch JOB_DIR`` the job is data-parallel
over N ranks. SIGTERM, SIGUSR1 or SIGUSR2 pause the job at the next step boundary with a resume
checkpoint; the worker then exits with status 128 + the signal number and running it again
continues the job. Expected mistakes exit with status 2.

The job format is :class:`critbatch.train.JobSpec` (``job.json``); the callbacks a job names are
looked up in :data:`critbatch.registry.TRAINING_CALLBACKS`.
"""

from __future__ import annotations

import argparse
import sys

from ..dist import shutdown
from ..errors import CritbatchError
from .jobs import Interrupted, run_job


def main() -> int:
    ap = argparse.ArgumentParser(prog="critbatch.launch.worker")
    ap.add_argument("job_dir", nargs="*", help="one job; several: trained together as one stacked model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--serve", action="store_true", help="a warm worker: job directories a line on stdin "
                                                          "(critbatch.launch.warm)")
    a = ap.parse_args()
    if a.serve:
        from .warm import serve

        try:
            return serve(a.threads)
        finally:
            shutdown()
    if not a.job_dir:
        ap.error("give a job directory (or --serve)")
    try:
        if len(a.job_dir) == 1:
            run_job(a.job_dir[0], a.threads, stop_on_signals=True)
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
