"""``python -m critbatch.branch.worker BRANCH_DIR``: train one branch in its own process."""

import argparse
import sys

from ..errors import CritbatchError
from .sweep import run_branch_dir


def main() -> int:
    ap = argparse.ArgumentParser(prog="critbatch.branch.worker")
    ap.add_argument("branch_dir")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    try:
        run_branch_dir(a.branch_dir, a.threads)
    except CritbatchError as e:
        print(f"critbatch: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
