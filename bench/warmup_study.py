"""Does the derived batch-size warmup keep the small-batch control's loss, and what explains a gap?
The study of docs/LOG.md ("warmup study"), reproducible in one command and resumable.

For each corpus (embedded SOTU, Shakespeare) and size (the demo's 1M tokens, a 2M-token run):

1. a base run (the demo preset, seed 0) with kept checkpoints, and an adaptive branch sweep at them
   (the demo's sweep settings), so the CBS is measured once, as the paper did;
2. warmup schedules derived from that sweep by several threshold rules (``variants``), plus the
   schedule the older derivation produced (the fit, not capped by the measurements);
3. each schedule against the small- and large-batch controls for every seed (init and data order),
   pretraining then an LR anneal, with Adam's betas either unchanged or following the SDE rule.

Every training run is content-addressed (``OUT/pool/<config hash>``), so runs shared by variants
(the small-batch control) train once and an interrupted study resumes where it stopped.

    python bench/warmup_study.py --out runs/warmup-study                      # all cells
    python bench/warmup_study.py --out runs/warmup-study --corpora sotu --sizes demo --variants measured
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

SIZES = {
    # the demo: 1M tokens, checkpoints log-spaced x3, the demo's sweep
    "demo": {"total_tokens": 1_000_000, "points": [20_000, 60_000, 200_000, 600_000], "anneal_tokens": 102_400},
    # 2M tokens: the branch study's points
    "2m": {"total_tokens": 2_000_000, "points": [20_000, 100_000, 400_000, 1_600_000], "anneal_tokens": 204_800},
    # 2M tokens with a denser end: where the CBS grows late, a point between lets the warmup step earlier
    "2m5": {"total_tokens": 2_000_000, "points": [20_000, 100_000, 400_000, 800_000, 1_600_000],
            "anneal_tokens": 204_800},
}

# name -> (schedule derivation, comparison options)
VARIANTS = {
    "measured": ({"source": "measured"}, {}),
    "fit": ({"source": "fit"}, {}),
    "measured-safety2": ({"source": "measured", "safety": 2.0}, {}),
    "fit-uncapped": ({"legacy_fit": True}, {}),
    "measured-anneal2x": ({"source": "measured"}, {"anneal_mult": 2}),
    "measured-anneal-steps": ({"source": "measured"}, {"anneal_in_steps": True}),
    "measured-sde": ({"source": "measured"}, {"adam_rule": "sde-beta2"}),
    "measured-sde-full": ({"source": "measured"}, {"adam_rule": "sde"}),
    "measured-lr-none": ({"source": "measured"}, {"lr_rule": "none"}),
    "measured-window2x": ({"source": "measured", "window_mult": 2}, {}),
    "conservative": ({"source": "measured", "reading": "conservative"}, {}),
}


def legacy_fit_schedule(curve: dict, start: int, until: int) -> list[list[int]]:
    """The derivation before the measured cap: doublings where the censored fit reaches the next
    batch, uncapped (what the demo used when the warmup trailed the control)."""
    T = curve["seq_len"]
    fit = curve["fit"]
    b_max, t_s, c = fit["b_max"] / T, fit["t_s"], fit["c"]
    phases, b = [[0, start]], start
    while True:
        nb = 2 * b
        if nb >= b_max:
            break
        t = t_s * (nb / (b_max - nb)) ** (1 / c)
        if t >= until:
            break
        tok = max(int(math.ceil(t / T)) * T, phases[-1][0] + T)
        phases.append([tok, nb])
        b = nb
    return phases


def main() -> None:
    from critbatch import presets
    from critbatch.branch import SweepConfig, run_sweep
    from critbatch.branch import describe_point
    from critbatch.warmup import CompareConfig, build_configs, summarize
    from critbatch.analysis.comparison import table
    from critbatch.config import config_hash, merge, to_dict
    from critbatch.data import prepare
    from critbatch.errors import ConfigError
    from critbatch.io import read_json, write_json_atomic, write_text_atomic
    from critbatch.launch import run_jobs, write_job
    from critbatch.analysis.schedule import derive_schedule
    from critbatch.train import train

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/warmup-study")
    ap.add_argument("--corpora", default="sotu,shakespeare")
    ap.add_argument("--sizes", default="demo,2m")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--eval-seqs", type=int, default=None, help="default: the demo preset's")
    ap.add_argument("--window", type=int, default=98_304)
    ap.add_argument("--cooldown", type=float, default=0.25,
                    help="branch cooldown fraction of the sweep the schedules come from (0: the paper's plain branches)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    out = Path(a.out)
    seeds = [int(s) for s in a.seeds.split(",")]
    pool = out / "pool"
    results = read_json(out / "study.json") if (out / "study.json").is_file() else {}

    for corpus in a.corpora.split(","):
        data = prepare(out / f"data-{corpus}", corpus=corpus, tokenizer="bytes", quiet=True) \
            if not (out / f"data-{corpus}" / "meta.json").is_file() else out / f"data-{corpus}"
        for size in a.sizes.split(","):
            S = SIZES[size]
            cell = out / f"{corpus}-{size}"
            over = {"data": {"path": str(data)}, "total_tokens": S["total_tokens"], "checkpoint_tokens": S["points"]}
            if a.eval_seqs:
                over["eval_seqs"] = a.eval_seqs
            base_cfg = merge(presets.get("demo"), over)
            t0 = time.time()
            train(base_cfg, cell / "base", progress=False)
            sweep = run_sweep(SweepConfig(run=str(cell / "base"), at=S["points"], window_tokens=a.window,
                                          search="adaptive", k_min=0.5, k_max=32.0, jobs=a.jobs,
                                          cooldown_fraction=a.cooldown), progress=False)
            curve = sweep.curve
            print(f"[{corpus}-{size}] base + sweep {time.time() - t0:.0f}s")
            for p in curve["points"]:
                print(f"    {p['tokens']:>9,}: {describe_point(p)}")
            cfg_file = cell / "train-config.json"
            write_json_atomic(cfg_file, to_dict(merge(base_cfg, {"checkpoint_tokens": []})))
            B0, N = base_cfg.batch_seqs, S["total_tokens"]
            for vname in a.variants.split(","):
                derive, cmp = dict(VARIANTS[vname][0]), VARIANTS[vname][1]
                src = curve
                if derive.get("window_mult"):  # the same sweep with longer windows
                    src = run_sweep(SweepConfig(run=str(cell / "base"), at=S["points"],
                                                window_tokens=a.window * derive.pop("window_mult"), search="adaptive",
                                                k_min=0.5, k_max=32.0, jobs=a.jobs, cooldown_fraction=a.cooldown),
                                    progress=False).curve
                    for p in src["points"]:
                        print(f"    window x2 {p['tokens']:>9,}: {describe_point(p)}")
                if derive.pop("reading", None) == "conservative":  # the largest k whose whole prefix passed
                    src = {**src, "points": [{**p, "cbs_low_seqs": p["conservative_low_seqs"]} for p in src["points"]]}
                if derive.get("legacy_fit"):
                    phases = legacy_fit_schedule(src, B0, N)
                else:
                    d = derive_schedule(src, B0, rule=src["lr_rule"], until_tokens=N, **derive)
                    phases = [list(p) for p in d.schedule.phases]
                tag = vname + (f"-cool{round(100 * a.cooldown)}" if a.cooldown else "")
                key = f"{corpus}-{size}-{tag}"
                if len([p for p in phases if p[0] < N]) < 2:
                    print(f"  {vname}: no batch change before {N:,} tokens; skipped")
                    results[key] = {"schedule": phases, "skipped": "no batch change"}
                    continue
                anneal = S["anneal_tokens"] * cmp.get("anneal_mult", 1)
                steps = anneal // (B0 * base_cfg.model.seq_len) if cmp.get("anneal_in_steps") else 0
                vcfg = cfg_file
                if cmp.get("lr_rule"):
                    vcfg = cell / f"train-config-lr-{cmp['lr_rule']}.json"
                    write_json_atomic(vcfg, to_dict(merge(base_cfg, {"checkpoint_tokens": [],
                                                                     "optim": {"lr_rule": cmp["lr_rule"]}})))
                cc = CompareConfig(out=str(cell / "compare" / tag), schedule=",".join(f"{t}:{b}" for t, b in phases),
                                   config=str(vcfg), total_tokens=N, anneal_tokens=0 if steps else anneal,
                                   anneal_steps=steps, seeds=seeds, adam_rule=cmp.get("adam_rule"), launcher="local")
                try:
                    configs, _, facts = build_configs(cc)
                except ConfigError as e:
                    print(f"  {vname}: refused: {e}")
                    results[key] = {"schedule": phases, "skipped": f"refused: {e}"}
                    continue
                cdir = Path(cc.out)
                jobs = []
                for seed, per in configs.items():
                    for name, c in per.items():
                        d = pool / config_hash(to_dict(c), 16)
                        write_job(d, c)
                        link = cdir / "runs" / f"s{seed}" / name
                        link.parent.mkdir(parents=True, exist_ok=True)
                        target = os.path.relpath(d, link.parent)
                        if link.is_symlink() and os.readlink(link) != target:
                            link.unlink()  # made for another config (an older version of the code)
                        if not link.is_symlink():
                            os.symlink(target, link)
                        jobs.append(d)
                t1 = time.time()
                run_jobs(sorted(set(jobs)), a.jobs, 1, "local")
                comp = summarize(cdir, facts, configs)
                write_json_atomic(cdir / "comparison.json", comp)
                head, rows, note = table(comp)
                md = "| " + " | ".join(head) + " |\n" + "|" + " --- |" * len(head) + "\n" + \
                     "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n\n" + note + "\n"
                write_text_atomic(cdir / "comparison.md", md)
                w, lg = comp["runs"]["warmup"], comp["runs"]["large"]
                g = w["gap_to_small"]
                res = {"schedule": phases, "variant": vname, "cooldown": a.cooldown, "seeds": seeds,
                       "gap_eval": g["final_eval_loss"], "gap_eval_anneal": g["anneal_eval_loss"],
                       "gap_train": g["final_train_loss"], "steps_saved_pct": w["steps_saved_pct"],
                       "large_gap_eval": lg["gap_to_small"]["final_eval_loss"],
                       "large_gap_eval_anneal": lg["gap_to_small"]["anneal_eval_loss"],
                       "small_eval": comp["runs"]["small"]["final_eval_loss"],
                       "small_eval_anneal": comp["runs"]["small"]["anneal_eval_loss"],
                       "anneal": {"tokens_per_run": facts["anneal_tokens_per_run"], "steps": steps},
                       "adam_rule": facts["adam_rule"], "seconds": time.time() - t1}
                results[key] = res
                write_json_atomic(out / "study.json", results)
                print(f"  {vname}: {' -> '.join(f'{b}@{t:,}' for t, b in phases)}  gap {fmt(res['gap_eval'])} "
                      f"after anneal {fmt(res['gap_eval_anneal'])}  steps saved {res['steps_saved_pct']:.0f}%  "
                      f"({time.time() - t1:.0f}s)")
    rows = [study_row(k, v) for k, v in results.items()]
    write_text_atomic(out / "study.md", "| cell | schedule (seqs @ tokens) | eval gap | gap after anneal | steps saved "
                      "| large: gap | large: after anneal |\n|" + " --- |" * 7 + "\n" + "\n".join(rows) + "\n")
    print((out / "study.md").read_text())


def fmt(g: dict | None) -> str:
    if not g:
        return "—"
    return f"{g['mean']:+.4f}" + (f" ± {g['se']:.4f}" if g.get("se") is not None else "")


def study_row(key: str, v: dict) -> str:
    sched = " → ".join(f"{b}" + (f" @{t // 1000}k" if t else "") for t, b in v["schedule"])
    if v.get("skipped"):
        return f"| {key} | {sched} | — | — | — | — | — |"
    return (f"| {key} | {sched} | {fmt(v['gap_eval'])} | {fmt(v['gap_eval_anneal'])} | {v['steps_saved_pct']:.0f}% | "
            f"{fmt(v['large_gap_eval'])} | {fmt(v['large_gap_eval_anneal'])} |")


if __name__ == "__main__":
    main()
