"""What a CBS curve costs against its base run, and whether the cheap search decides as the full grid
does (issue 15: "the demo's curve at <= 1.0x its base run, with the same intervals").

On a finished base run (default: the demo's, ``make demo`` first), with the demo's sweep settings:
the adaptive search (what ``critbatch demo`` runs: k = 1 branches read from the base run where it
kept the checkpoints before their cooldowns, the gallop above a pass) and a grid of every candidate
batch from k_min to ``--grid-k-max`` at every point. Prints per point the probes, the interval of
each, and the branch tokens trained over the base run's tokens. Sweeps are content-addressed: a
rerun trains nothing new, and the grid reuses the adaptive search's branches.

    python bench/curve_cost.py                      # runs/demo/base
    python bench/curve_cost.py --run RUN --grid-k-max 8 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from critbatch.branch import SweepConfig, plan_sweep, run_sweep
from critbatch.demo import DemoConfig


def sweep(run: str, d: DemoConfig, jobs: int | None, **over) -> dict:
    cfg = dict(run=run, at=d.points, window_tokens=d.window_tokens, cooldown_fraction=d.cooldown_fraction,
               eval_seqs=d.eval_seqs, jobs=jobs)
    cfg.update(over)
    return run_sweep(SweepConfig(**cfg), progress=False).curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo/base", help="a finished base run with the demo's kept checkpoints")
    ap.add_argument("--grid-k-max", type=float, default=4.0, help="the grid's largest multiplier")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--out", default=None, help="also write the comparison as JSON here")
    a = ap.parse_args()
    if not (Path(a.run) / "result.json").is_file():
        sys.exit(f"curve_cost: {a.run} is not a finished run (make demo first, or give --run)")
    d = DemoConfig()
    adaptive = sweep(a.run, d, a.jobs, search="adaptive", k_min=d.k_min, k_max=d.k_max, resolution=d.resolution)
    plan = plan_sweep(SweepConfig(run=a.run, at=d.points, window_tokens=d.window_tokens, search="adaptive",
                                  k_min=d.k_min, k_max=d.k_max))
    grid_k = [k for k in plan.candidates if k <= a.grid_k_max]
    grid = sweep(a.run, d, a.jobs, search="grid", k=grid_k)
    rows = []
    for pa, pg in zip(adaptive["points"], grid["points"]):
        rows.append({"tokens": pa["tokens"], "adaptive_ks": pa["ks"],
                     "adaptive_from_base": pa.get("from_parent_tokens"),
                     "adaptive_interval": [pa["cbs_low_seqs"], pa["cbs_high_seqs"]],
                     "grid_interval": [pg["cbs_low_seqs"], pg["cbs_high_seqs"]],
                     "grid_gaps": [round(m - pg["mean_loss"]["eval"][0], 4) for m in pg["mean_loss"]["eval"]],
                     "grid_status": pg["status"]})
    doc = {"run": a.run, "grid_ks": grid_k, "points": rows,
           "same_intervals": all(r["adaptive_interval"] == r["grid_interval"] for r in rows),
           "adaptive_cost": adaptive["cost"], "grid_cost": grid["cost"]}
    print(f"grid k: {', '.join(f'{k:g}' for k in grid_k)}")
    for r in rows:
        print(f"  {r['tokens']:>9,}: adaptive probes {r['adaptive_ks']} -> {r['adaptive_interval']}; grid "
              f"{r['grid_interval']} (gaps {r['grid_gaps']}, {r['grid_status']})")
    for name, c in (("adaptive", adaptive["cost"]), ("grid", grid["cost"])):
        print(f"  {name}: {c['branches']} branches, {c['branch_tokens']:,} trained branch tokens = "
              f"{c['branch_tokens_over_base']:.3f}x the base run's {c['base_tokens']:,}"
              + (f" ({c['tokens_from_base']:,} more read from it)" if c.get("tokens_from_base") else ""))
    print(f"  same intervals: {doc['same_intervals']}")
    if a.out:
        Path(a.out).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
