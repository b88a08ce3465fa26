"""Branch sweeps on the tiny preset and the embedded corpus, on this CPU: the numbers of docs/LOG.md.

1. a base run with kept checkpoints;
2. noise: R replicate branches at k = 1 on different data windows at every point — the spread of
   the held-out eval loss against the EMA training loss (which one should decide), and the real
   false-"worse" rate of the t-test rule on pairs of replicate groups at the same k;
3. the full-grid sweep (eps rule) and the adaptive search over the same range: intervals, tokens,
   wall time, and whether the CBS matched;
4. (--ttest) a replicated sweep decided by the t-test.

    python bench/branch_study.py --out runs/bench-branch [--ttest]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    from critbatch import presets
    from critbatch.analysis.decision import decide_ttest
    from critbatch.branch import SweepConfig, run_sweep
    from critbatch.branch import describe_point
    from critbatch.config import merge
    from critbatch.train import train

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench-branch")
    ap.add_argument("--total-tokens", default="2M")
    ap.add_argument("--at", default="20k,100k,400k,1.6M")
    ap.add_argument("--window", default="100k")
    ap.add_argument("--k", default="0.5,1,2,4,8,16,32")
    ap.add_argument("--noise-replicates", type=int, default=16)
    ap.add_argument("--eval-seqs", type=int, default=1024)
    ap.add_argument("--ttest", action="store_true")
    a = ap.parse_args()
    from critbatch.units import parse_count, parse_count_list

    out = Path(a.out)
    at = parse_count_list(a.at)
    window = parse_count(a.window)
    ks = [float(x) for x in a.k.split(",")]
    report: dict = {}

    t0 = time.time()
    cfg = merge(presets.get("tiny"), {"total_tokens": parse_count(a.total_tokens), "checkpoint_tokens": at,
                                      "eval_seqs": a.eval_seqs})
    base = train(cfg, out / "base", progress=False)
    report["base"] = {"seconds": time.time() - t0, "final_eval_loss": base["final_eval_loss"],
                      "tokens_per_s": base["tokens_per_s"]}
    print(f"base run: {base['tokens']:,} tokens, eval {base['final_eval_loss']:.4f}, {time.time() - t0:.0f}s")

    # ---- 2. noise of the two metrics, and the real calibration of the t-test ----
    t0 = time.time()
    R = a.noise_replicates
    noise = run_sweep(SweepConfig(run=str(out / "base"), at=at, k=[1.0], window_tokens=window, replicates=R,
                                  rule="eps", eval_seqs=a.eval_seqs), progress=False).curve
    report["noise"] = {"seconds": time.time() - t0, "replicates": R, "points": []}
    print(f"\nnoise: k=1, {R} data windows per point ({time.time() - t0:.0f}s)")
    false_worse = trials = 0
    for p in noise["points"]:
        ev = np.array(p["losses"]["eval"][0])
        tr = np.array(p["losses"]["train-ema"][0])
        rec = {"tokens": p["tokens"], "eval_sd": float(ev.std(ddof=1)), "train_ema_sd": float(tr.std(ddof=1)),
               "eval_range": float(ev.max() - ev.min()), "train_ema_range": float(tr.max() - tr.min())}
        report["noise"]["points"].append(rec)
        print(f"  at {p['tokens']:>9,}: eval sd {rec['eval_sd']:.4f} (range {rec['eval_range']:.4f})   "
              f"train-ema sd {rec['train_ema_sd']:.4f} (range {rec['train_ema_range']:.4f})")
        # random splits of the R windows into two disjoint groups of 3 (replicate pairs at the same
        # k): how often does the 95% t-test call the second group "worse"?
        x = np.array(p["losses"]["eval"][0])
        rng = np.random.default_rng(0)
        for _ in range(5000):
            idx = rng.permutation(R)[:6]
            d = decide_ttest([1, 2], [list(x[idx[:3]]), list(x[idx[3:]])], confidence=0.95)
            false_worse += not d.passes[1]
            trials += 1
    report["noise"]["ttest_false_worse_rate"] = false_worse / trials
    report["noise"]["ttest_trials"] = trials
    print(f"  t-test (3 vs 3 replicates, same k, 95%): false 'worse' in {false_worse}/{trials} "
          f"= {false_worse / trials:.1%} of group splits")

    # ---- 3. full grid vs adaptive ----
    for decide_by in ("eval", "train-ema"):
        t0 = time.time()
        grid = run_sweep(SweepConfig(run=str(out / "base"), at=at, k=ks, window_tokens=window, decide_by=decide_by,
                                     eval_seqs=a.eval_seqs), progress=False).curve
        report[f"grid_{decide_by}"] = {"seconds": time.time() - t0, "cost": grid["cost"],
                                       "points": [_brief(p) for p in grid["points"]], "fit": grid["fit"]}
        print(f"\nfull grid k={a.k}, decided by {decide_by} (eps 0.01): {time.time() - t0:.0f}s, "
              f"{grid['cost']['branch_tokens']:,} branch tokens")
        for p in grid["points"]:
            print(f"  at {p['tokens']:>9,}: {describe_point(p)}")
    t0 = time.time()
    ada = run_sweep(SweepConfig(run=str(out / "base"), at=at, k=ks, window_tokens=window, search="adaptive",
                                k_min=1, k_max=ks[-1], resolution=1, eval_seqs=a.eval_seqs), progress=False).curve
    full = report["grid_eval"]
    report["adaptive"] = {"seconds": time.time() - t0, "cost": ada["cost"], "points": [_brief(p) for p in ada["points"]]}
    print(f"\nadaptive (k_min 1, k_max {ks[-1]:g}, resolution 1), eval: {time.time() - t0:.0f}s, "
          f"{ada['cost']['branch_tokens']:,} branch tokens against {ada['cost']['full_grid_branch_tokens']:,} for the "
          f"full integer grid 1..{ks[-1]:g}")
    for p, g in zip(ada["points"], full["points"]):
        print(f"  at {p['tokens']:>9,}: {describe_point(p)}  | probed k={p['ks']}  | power-of-two grid said "
              f"[{g['cbs_low_seqs']}, {g['cbs_high_seqs']}]")

    if a.ttest:
        t0 = time.time()
        tt = run_sweep(SweepConfig(run=str(out / "base"), at=at, k=ks, window_tokens=window, replicates=3,
                                   rule="ttest", eval_seqs=a.eval_seqs), progress=False).curve
        report["ttest"] = {"seconds": time.time() - t0, "cost": tt["cost"], "points": [_brief(p) for p in tt["points"]]}
        print(f"\nt-test sweep (3 replicates, 95%): {time.time() - t0:.0f}s")
        for p in tt["points"]:
            print(f"  at {p['tokens']:>9,}: {describe_point(p)}")
    (out / "study.json").write_text(json.dumps(report, indent=2, default=lambda x: None))
    print(f"\nwritten {out / 'study.json'}")


def _brief(p: dict) -> dict:
    return {k: p[k] for k in ("tokens", "cbs_low_seqs", "cbs_high_seqs", "readings_disagree", "bounded_above",
                              "below_grid", "ks", "passes", "mean_loss", "branch_tokens", "branch_seconds")}


if __name__ == "__main__":
    main()
