"""``python -m critbatch.launch.worker JOB_DIR``: run one job in this process."""

import argparse
import sys

from ..errors import CritbatchError
from . import run_job


def main() -> int:
    ap = argparse.ArgumentParser(prog="critbatch.launch.worker")
    ap.add_argument("job_dir")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    try:
        run_job(a.job_dir, a.threads)
    except CritbatchError as e:
        print(f"critbatch: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
