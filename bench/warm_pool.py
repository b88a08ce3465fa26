"""What the local launcher adds to a sweep's training time (issue 25 item 2: "a sweep's wall time with
the local launcher <= 1.3x the sum of its branches' training times", side by side with in process).

On a finished base run (default: the demo's, ``make demo`` first), the demo's sweep (adaptive search,
cooldown probes, early stopping) is trained twice from fresh copies of the run — in process, and
through the local pool of warm workers, each with one job at a time and one thread — and for each the
sweep's wall time is set against the sum of its branches' own training times (``cbs.json``'s
``cost.branch_seconds``, each branch's ``result.json`` wall time), and against that sum with their
held-out evaluation at the window's end, which every branch needs for its decision
(``cost.branch_eval_seconds``, each branch's ``eval_time_s``): what is left is the sweep's own
overhead (start-up, checkpoints, planning). Both train the same branches to the same numbers (the
bench checks).

With ``--jobs N`` the local pool runs N branches at once, one thread each, as the demo's sweep does
(``--jobs demo``: the demo's default, one job per usable core); the in-process path always trains one
branch at a time. With several jobs the wall time is set against the same sums, so the ratio also
shows what the pool's concurrency buys.

    python bench/warm_pool.py                          # runs/demo/base, one job
    python bench/warm_pool.py --jobs demo              # the local pool as the demo runs it
    python bench/warm_pool.py --run RUN --out bench-warm.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    from critbatch.branch import SweepConfig, run_sweep
    from critbatch.demo import DemoConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo/base", help="a finished base run with the demo's kept checkpoints")
    ap.add_argument("--out", default=None, help="also write the figures as JSON here")
    ap.add_argument("--jobs", default="1", help="branches the local pool trains at once: a number, or 'demo' for "
                    "the demo's default (one per usable core)")
    a = ap.parse_args()
    if a.jobs == "demo":
        from critbatch.launch import default_jobs

        jobs = default_jobs(1, "cpu")
    elif a.jobs.isdigit() and int(a.jobs) >= 1:
        jobs = int(a.jobs)
    else:
        sys.exit(f"warm_pool: --jobs {a.jobs!r} must be a positive number or 'demo'")
    if not (Path(a.run) / "result.json").is_file():
        sys.exit(f"warm_pool: {a.run} is not a finished run (make demo first, or give --run)")
    d = DemoConfig()
    rows, curves = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for launcher in ("inprocess", "local"):
            run = Path(tmp) / launcher
            shutil.copytree(a.run, run, ignore=shutil.ignore_patterns("branches", "sweeps"))
            t0 = time.perf_counter()
            res = run_sweep(SweepConfig(run=str(run), at=d.points, window_tokens=d.window_tokens, search="adaptive",
                                        k_min=d.k_min, k_max=d.k_max, cooldown_fraction=d.cooldown_fraction,
                                        early_stop_gap=d.early_stop_gap, eval_seqs=d.eval_seqs,
                                        jobs=1 if launcher == "inprocess" else jobs,
                                        threads_per_branch=1, launcher=launcher), progress=False)
            wall = time.perf_counter() - t0
            c = res.curve["cost"]
            ev = c.get("branch_eval_seconds", 0.0)
            rows[launcher] = {"wall_s": wall, "branch_seconds": c["branch_seconds"], "branch_eval_seconds": ev,
                              "branches": c["branches"], "jobs": 1 if launcher == "inprocess" else jobs, "wall_over_branches": wall / c["branch_seconds"],
                              "wall_over_branches_with_eval": wall / (c["branch_seconds"] + ev)}
            curves[launcher] = [p["losses"] for p in res.curve["points"]]
    doc = {"run": a.run, "jobs": jobs, "rows": rows, "same_numbers": curves["inprocess"] == curves["local"]}
    for name, r in rows.items():
        print(f"{name:>9} ({r['jobs']} at once): {r['branches']} branches, wall {r['wall_s']:.1f} s for {r['branch_seconds']:.1f} s of "
              f"branch training = {r['wall_over_branches']:.2f}x; with their final evaluation "
              f"({r['branch_eval_seconds']:.1f} s) {r['wall_over_branches_with_eval']:.2f}x")
    print(f"same numbers: {doc['same_numbers']}")
    if a.out:
        Path(a.out).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
