"""Does the closed loop (``train --auto-batch``) keep the small-batch control's loss with fewer steps,
and what do its probes cost? The study of docs/LOG.md ("closed loop"), one command, resumable.

For each corpus, size and seed (init and data order):

1. the closed-loop run (the demo preset, probes at log-spaced points, act on the branch probe);
2. its realised schedule replayed by ``compare`` against the small- and large-batch controls of the
   same seed, with the anneal (the replay's pretraining is the closed-loop run itself, bit for bit:
   the same config, seed and stream);
3. gap to the small-batch control (mean ± SE over seeds), steps saved, probe tokens ÷ run tokens,
   and what the noise-scale and norm-test triggers would have decided.

    python bench/closed_loop_study.py --out runs/closed-loop-study
    python bench/closed_loop_study.py --out runs/closed-loop-study --sizes demo --seeds 0
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

SIZES = {"demo": {"total_tokens": 1_000_000, "anneal_tokens": 102_400},
         "2m": {"total_tokens": 2_000_000, "anneal_tokens": 204_800},
         "4m": {"total_tokens": 4_000_000, "anneal_tokens": 409_600}}


def mean_se(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    se = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) if len(xs) > 1 else None
    return m, se


def fmt(m, se):
    return "—" if m is None else (f"{m:+.4f}" + (f" ± {se:.4f}" if se is not None else ""))


def main() -> None:
    from critbatch import presets
    from critbatch.analysis.triggers import log_spaced_points
    from critbatch.closed_loop import AutoBatchConfig, run_auto_batch
    from critbatch.warmup import CompareConfig, run_compare
    from critbatch.config import merge, to_dict
    from critbatch.data import prepare
    from critbatch.io import read_json, read_jsonl, write_json_atomic, write_text_atomic

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/closed-loop-study")
    ap.add_argument("--corpora", default="sotu")
    ap.add_argument("--sizes", default="demo,2m")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--window", type=int, default=None, help="probe window in tokens (default: the closed loop's)")
    ap.add_argument("--window-fraction", type=float, default=0.25)
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--confirm", type=int, default=2, help="consecutive passing probe points before a raise (the "
                    "closed loop's default, 2; 1 in the LOG's first closed-loop studies)")
    ap.add_argument("--confirm-factor", type=float, default=None,
                    help="probe an unconfirmed raise again at this factor x its point (default: at the next scheduled point)")
    ap.add_argument("--eps-budget", type=float, default=None, help="one tolerance for the run's raises together")
    ap.add_argument("--first-probe-fraction", type=float, default=1 / 16)
    ap.add_argument("--measurement-budget", type=float, default=None,
                    help="the loop's measurement budget, a fraction of the run (default: none, as the LOG's earlier cells)")
    ap.add_argument("--last-probe-fraction", type=float, default=None,
                    help="probe only at the log-spaced points up to this fraction of the run (default: all below its end)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--loop-only", action="store_true", help="run the closed loops alone (their decisions and "
                    "measurement), without the comparison against the controls")
    ap.add_argument("--b0", type=int, default=8, help="start batch in sequences (the LR follows the sqrt rule from "
                    "the preset's at 8; the demo starts at 2)")
    a = ap.parse_args()
    out = Path(a.out)
    results = read_json(out / "study.json") if (out / "study.json").is_file() else {}
    for corpus in a.corpora.split(","):
        data = out / f"data-{corpus}"
        if not (data / "meta.json").is_file():
            prepare(data, corpus=corpus, tokenizer="bytes", quiet=True)
        for size in a.sizes.split(","):
            S = SIZES[size]
            N = S["total_tokens"]
            for seed in [int(s) for s in a.seeds.split(",")]:
                variant = ((f"w{a.window}" if a.window else f"f{a.window_fraction:g}") + f"-first{a.first_probe_fraction:g}"
                           + (f"-eps{a.eps:g}" if a.eps != 0.01 else "") + (f"-confirm{a.confirm}" if a.confirm > 1 else "")
                           + (f"-cf{a.confirm_factor:g}" if a.confirm_factor else "")
                           + (f"-budget{a.eps_budget:g}" if a.eps_budget is not None else "")
                           + (f"-b{a.b0}" if a.b0 != 8 else "")
                           + (f"-last{a.last_probe_fraction:g}" if a.last_probe_fraction is not None else "")
                           + (f"-mb{a.measurement_budget:g}" if a.measurement_budget is not None else ""))
                key = f"{corpus}-{size}-{variant}-s{seed}"
                cell = out / key
                base = presets.get("demo")
                cfg = merge(base, {"data": {"path": str(data), "order_seed": seed}, "seed": seed,
                                   "total_tokens": N, "checkpoint_tokens": [], "batch_seqs": a.b0,
                                   "optim": {"lr": base.optim.lr * math.sqrt(a.b0 / base.batch_seqs)}})
                first = int(N * a.first_probe_fraction)
                probe_at = (None if a.last_probe_fraction is None else
                            [p for p in log_spaced_points(N, first, 2.0) if p <= a.last_probe_fraction * N])
                auto = AutoBatchConfig(first_probe_tokens=first, probe_at=probe_at, window_tokens=a.window,
                                       window_fraction=a.window_fraction, eps=a.eps, confirm=a.confirm,
                                       confirm_factor=a.confirm_factor, eps_budget=a.eps_budget, jobs=a.jobs,
                                       measurement_budget=a.measurement_budget)
                t0 = time.time()
                r = run_auto_batch(cfg, auto, cell / "loop")
                loop_s = time.time() - t0
                res = {"corpus": corpus, "size": size, "variant": variant, "seed": seed, "schedule": r["schedule"], "steps": r["steps"],
                       "small_steps": r["small_control_steps"], "steps_saved_pct": r["steps_saved_pct"],
                       "probe_fraction": r["probe_fraction"], "measurement_fraction": r["measurement_fraction"],
                       "probe_kept_tokens": r.get("probe_kept_tokens", 0),
                       "loop_eval": r["final_eval_loss"], "agreement": r["agreement"], "loop_seconds": loop_s,
                       "decisions": [{"tokens": d["tokens"], "batch": d["batch_before"], "verdicts": d["verdicts"],
                                      "losses": d["probe"]["eval_losses"] if d.get("probe") else None}
                                     for d in read_jsonl(cell / "loop" / "decisions.jsonl")]}
                cfg_file = cell / "train-config.json"
                write_json_atomic(cfg_file, to_dict(merge(cfg, {"seed": 0, "data": {"order_seed": 0}})))
                if a.loop_only:
                    res.update(gap_eval=None, gap_eval_anneal=None, replay_equals_loop=None, large_gap_eval=None)
                elif len(r["schedule"]) > 1:
                    comp = run_compare(CompareConfig(out=str(cell / "compare"), schedule=str(cell / "loop" / "schedule.json"),
                                                     config=str(cfg_file), total_tokens=N, anneal_tokens=S["anneal_tokens"],
                                                     seeds=[seed], jobs=a.jobs,  # the replay anneals the loop's own run
                                                     prefix_runs=[str(cell / "loop" / r["segments"][-1])]),
                                       progress=False)
                    w, sm = comp["runs"]["warmup"], comp["runs"]["small"]
                    res.update(gap_eval=w["final_eval_loss"] - sm["final_eval_loss"],
                               gap_eval_anneal=w["anneal_eval_loss"] - sm["anneal_eval_loss"],
                               replay_equals_loop=w["final_eval_loss"] == r["final_eval_loss"],
                               large_gap_eval=comp["runs"]["large"]["final_eval_loss"] - sm["final_eval_loss"])
                else:  # no raise: the closed-loop run is the small-batch control
                    res.update(gap_eval=0.0, gap_eval_anneal=0.0, replay_equals_loop=None, large_gap_eval=None)
                results[key] = res
                write_json_atomic(out / "study.json", results)
                gaps = ("" if res["gap_eval"] is None else
                        f"  gap {res['gap_eval']:+.4f} / {res['gap_eval_anneal']:+.4f}")
                print(f"[{key}] {' -> '.join(f'{b}@{t:,}' for t, b in r['schedule'])}{gaps}  steps saved "
                      f"{r['steps_saved_pct']:.0f}%  measurement {100 * r['measurement_fraction']:.1f}% of the run  "
                      f"({loop_s:.0f}s)", flush=True)
    rows = ["| corpus, size | schedules (per seed) | gap before anneal | gap after anneal | steps saved | measurement ÷ run | gns agrees | norm agrees |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    cells = sorted({(v["corpus"], v["size"], v.get("variant", "")) for v in results.values()})
    for corpus, size, variant in cells:
        vs = [v for v in results.values() if (v["corpus"], v["size"], v.get("variant", "")) == (corpus, size, variant)]
        sch = "; ".join(" → ".join(f"{b}" + (f"@{t // 1000}k" if t else "") for t, b in v["schedule"]) for v in vs)
        ag = {n: (sum(v["agreement"][n]["agree"] for v in vs), sum(v["agreement"][n]["points"] for v in vs))
              for n in ("gns", "norm")}
        rows.append(f"| {corpus}, {size}, {variant} ({len(vs)} seeds) | {sch} | {fmt(*mean_se([v['gap_eval'] for v in vs]))} | "
                    f"{fmt(*mean_se([v['gap_eval_anneal'] for v in vs]))} | "
                    f"{mean_se([v['steps_saved_pct'] for v in vs])[0]:.0f}% | "
                    f"{100 * mean_se([v.get('measurement_fraction', v['probe_fraction']) for v in vs])[0]:.1f}% | "
                    f"{ag['gns'][0]}/{ag['gns'][1]} | {ag['norm'][0]}/{ag['norm'][1]} |")
    write_text_atomic(out / "study.md", "\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
