"""``python -m critbatch.launch.worker JOB_DIR``: run one job in this process.

Under ``torchrun --nproc-per-node N -m critbatch.launch.worker JOB_DIR`` the job is data-parallel
over N ranks. SIGTERM, SIGUSR1 or SIGUSR2 pause the job at the next step boundary with a resume
checkpoint; the worker then exits with status 128 + the signal number and running it again
continues the job. Expected mistakes exit with status 2.
"""

import argparse
import sys

from ..errors import CritbatchError
from . import Interrupted, run_job


def main() -> int:
    ap = argparse.ArgumentParser(prog="critbatch.launch.worker")
    ap.add_argument("job_dir")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    try:
        run_job(a.job_dir, a.threads, stop_on_signals=True)
    except Interrupted as e:
        print(f"critbatch: {e}; run it again to resume", file=sys.stderr)
        return 128 + e.signum
    except CritbatchError as e:
        print(f"critbatch: error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
