"""Does stopping settled branches early keep a curve's intervals, and what does it save (issue 15:
"an option to stop it early, tested against full windows on the same points for identical CBS
intervals")?

On a private copy of a finished base run (default: the demo's, ``make demo`` first; its branches and
sweeps are not copied), with the demo's sweep settings, for the adaptive search and for a grid of
every candidate batch up to ``--grid-k-max``: first the sweep with ``early_stop_gap``, then the
same sweep with full windows, which continues every stopped branch to its window's end. Prints per
point the statuses and intervals of both and which branches stopped, and the branch tokens each
trained. Sweeps are content-addressed: a rerun on the same ``--work`` trains nothing new.

    python bench/early_stop_cost.py                          # runs/demo/base, gap 2 x eps
    python bench/early_stop_cost.py --run RUN --gap 0.015 --work /tmp/es-work --out es.json
    python bench/early_stop_cost.py --corpus shakespeare --work runs/es-shk   # trains the demo's base run on it first
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from critbatch.branch import SweepConfig, plan_sweep, run_sweep
from critbatch.demo import DemoConfig


def sweep(run: Path, d: DemoConfig, jobs: int | None, **over) -> dict:
    cfg = dict(run=str(run), at=d.points, window_tokens=d.window_tokens, cooldown_fraction=d.cooldown_fraction,
               eval_seqs=d.eval_seqs, jobs=jobs)
    cfg.update(over)
    return run_sweep(SweepConfig(**cfg), progress=False).curve


def demo_base(corpus: str, out: Path) -> Path:
    """The demo's base run (its model, batch, checkpoints) on another embedded corpus, in bytes."""
    from critbatch.data.prepare import prepare
    from critbatch.demo import _train_config
    from critbatch.train import train

    data = out / "data"
    if not (data / "meta.json").is_file():
        prepare(data, corpus=corpus, tokenizer="bytes", quiet=True)
    train(_train_config(DemoConfig(), data), out / "base", progress=False, quiet=True)
    return out / "base"


def compare(name: str, early: dict, full: dict) -> dict:
    rows = []
    for pe, pf in zip(early["points"], full["points"]):
        rows.append({"tokens": pe["tokens"], "ks": pe["ks"], "status_early": pe["status"], "status_full": pf["status"],
                     "interval_early": [pe["cbs_low_seqs"], pe["cbs_high_seqs"]],
                     "interval_full": [pf["cbs_low_seqs"], pf["cbs_high_seqs"]],
                     "full_gaps": [None if m is None else round(m - pf["mean_loss"]["eval"][0], 4)
                                   for m in pf["mean_loss"]["eval"]],
                     "stopped": {f"{k:g}": reps[0] for k, reps in zip(pe["ks"], pe["stopped_early"]) if reps[0]}})
    ce, cf = early["cost"], full["cost"]
    out = {"search": name, "points": rows, "same_intervals": all(r["interval_early"] == r["interval_full"] for r in rows),
           "same_statuses": all(r["status_early"] == r["status_full"] for r in rows),
           "branch_tokens_early": ce["branch_tokens"], "branch_tokens_full": cf["branch_tokens"],
           "stopped": ce["stopped_early"], "saved_tokens": ce["early_stop_saved_tokens"],
           "base_tokens": ce["base_tokens"], "over_base_early": ce["branch_tokens_over_base"],
           "over_base_full": cf["branch_tokens_over_base"]}
    print(f"{name}:")
    for r in rows:
        st = "; ".join(f"k={k} stopped at {x['tokens']:,} (gap {x['gap_mean']:+.4f} ± {x['gap_se']:.4f}, "
                       f"{x['spans']} spans)" for k, x in r["stopped"].items())
        print(f"  {r['tokens']:>9,}: k {r['ks']} full gaps {r['full_gaps']} {r['status_full']} -> "
              f"{r['interval_full']}; early {r['interval_early']}" + (f"; {st}" if st else ""))
    print(f"  branch tokens {ce['branch_tokens']:,} early-stopped vs {cf['branch_tokens']:,} full "
          f"({out['over_base_early']:.3f}x vs {out['over_base_full']:.3f}x the base run); {ce['stopped_early']} "
          f"stopped, {out['saved_tokens']:,} tokens saved; same intervals: {out['same_intervals']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo/base", help="a finished base run with the demo's kept checkpoints")
    ap.add_argument("--work", default="runs/early-stop-cost", help="where the private copy of the base run goes")
    ap.add_argument("--gap", type=float, default=None, help="early_stop_gap (default: 2 x the sweep's eps)")
    ap.add_argument("--grid-k-max", type=float, default=4.0, help="the grid's largest multiplier")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--out", default=None, help="also write the comparison as JSON here")
    ap.add_argument("--corpus", default=None, help="train the demo's base run on this embedded corpus in --work first")
    a = ap.parse_args()
    if a.corpus is not None:
        a.run = str(demo_base(a.corpus, Path(a.work) / "corpus-base"))
    if not (Path(a.run) / "result.json").is_file():
        sys.exit(f"early_stop_cost: {a.run} is not a finished run (make demo first, or give --run)")
    d = DemoConfig()
    eps = SweepConfig(run="", at=[]).eps  # the demo's sweep decides at the default eps
    gap = a.gap if a.gap is not None else 2 * eps
    run = Path(a.work) / "base"
    if not run.exists():
        shutil.copytree(a.run, run, ignore=shutil.ignore_patterns("branches", "sweeps"))
    ad = dict(search="adaptive", k_min=d.k_min, k_max=d.k_max, resolution=d.resolution)
    plan = plan_sweep(SweepConfig(run=str(run), at=d.points, window_tokens=d.window_tokens, **ad))
    gr = dict(search="grid", k=[k for k in plan.candidates if k <= a.grid_k_max])
    doc = {"run": a.run, "gap": gap, "eps": eps, "results": []}
    for over in (ad, gr):  # the early-stopping sweep first: the full one then continues its stopped branches
        early = sweep(run, d, a.jobs, early_stop_gap=gap, **over)
        full = sweep(run, d, a.jobs, **over)
        doc["results"].append(compare(over["search"], early, full))
    if a.out:
        Path(a.out).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
