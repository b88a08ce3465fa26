"""Which schedule for the whole run keeps the small batch's loss with fewer optimizer steps? The study
of docs/LOG.md ("a schedule for the whole run", issue 22), one command, resumable.

For each corpus and size (the demo's 1M tokens, and 2M), from the demo's start batch (2 sequences,
its LR by the sqrt rule from the preset's 3e-3 at 8): the demo's base run and adaptive cooldown-probe
sweep (seed 0, points at 2%, 6%, 20% and 60% of the run), then three schedules derived from that sweep
for the whole run (the pretraining tokens and a linear LR decay of 10.24% of them after it):

- ``warmup``: the measured envelope, the decay at the final batch (``--decay anneal``);
- ``seesaw``: the same, then Seesaw's doublings inside the decay (``--decay seesaw``, 2 doublings);
- ``late-switch``: the start batch through the stable phase, the warmup's final batch for the decay;

each trained against the small- and large-batch controls with 3 seeds (initialisation and data order;
``critbatch compare --schedules``). Reported: the held-out loss gap to the small-batch control before
and after the decay (mean ± s.e. over seeds), optimizer steps saved (the decay's included, as the
paper's Table 1) and the tokens the sweep spent measuring.

    OMP_NUM_THREADS=1 python bench/warmup_decay_study.py --out runs/warmup-decay-study
    python bench/warmup_decay_study.py --out runs/warmup-decay-study --corpora sotu --sizes 1m --seeds 0
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

SIZES = {"1m": 1_000_000, "2m": 2_000_000}
SCHEDULES = {"warmup": {"decay": "anneal"}, "seesaw": {"decay": "seesaw", "decay_doublings": 2},
             "late-switch": {"decay": "late-switch"}}


def cell(out: Path, corpus: str, size: str, seeds: list[int], b0: int, jobs: int) -> dict:
    from critbatch import presets
    from critbatch.branch import SweepConfig, continuation_checkpoints, describe_point, run_sweep
    from critbatch.config import merge, to_dict
    from critbatch.data import prepare
    from critbatch.demo import DemoConfig
    from critbatch.io import write_json_atomic
    from critbatch.train import train
    from critbatch.warmup import CompareConfig, ScheduleConfig, run_compare, write_schedule

    N = SIZES[size]
    anneal = int(round(0.1024 * N / 64)) * 64
    d = DemoConfig()
    data = out / f"data-{corpus}"
    if not (data / "meta.json").is_file():
        prepare(data, corpus=corpus, tokenizer="bytes", quiet=True)
    base = presets.get("demo")
    T = base.model.seq_len
    points = [int(f * N) for f in (0.02, 0.06, 0.2, 0.6)]
    window = d.window_tokens * N // 1_000_000
    keep = continuation_checkpoints(points, window, d.cooldown_fraction, b0 * T)
    cfg = merge(base, {"data": {"path": str(data)}, "batch_seqs": b0, "total_tokens": N,
                       "optim": {"lr": base.optim.lr * math.sqrt(b0 / base.batch_seqs)},
                       "checkpoint_tokens": points + keep})
    c = out / f"{corpus}-{size}"
    t0 = time.time()
    train(cfg, c / "base", progress=False)
    sw = run_sweep(SweepConfig(run=str(c / "base"), at=points, window_tokens=window, search="adaptive", k_min=d.k_min,
                               k_max=d.k_max, cooldown_fraction=d.cooldown_fraction, early_stop_gap=d.early_stop_gap,
                               eval_seqs=d.eval_seqs, launcher="inprocess", threads_per_branch=1), progress=False)
    scheds = {}
    for name, opts in SCHEDULES.items():
        doc, _ = write_schedule(ScheduleConfig(sweep=str(sw.sweep_dir), out=str(c / f"{name}.json"), start_seqs=b0,
                                               total_tokens=N + anneal, decay_tokens=anneal, **opts))
        scheds[name] = [[p["start_tokens"], p["batch_seqs"]] for p in doc["phases"]]
    cfg_file = c / "compare-config.json"
    write_json_atomic(cfg_file, to_dict(merge(cfg, {"checkpoint_tokens": []})))
    comp = run_compare(CompareConfig(out=str(c / "compare"), schedule=str(c / "warmup.json"), config=str(cfg_file),
                                     total_tokens=N, anneal_tokens=anneal, seeds=seeds, jobs=jobs, launcher="local",
                                     schedules={n: str(c / f"{n}.json") for n in SCHEDULES if n != "warmup"}),
                       progress=False)
    rows = {}
    for name, r in comp["runs"].items():
        g = r.get("gap_to_small") or {}
        rows[name] = {"schedule": r["batch_schedule"], "steps_saved_pct": r["steps_saved_pct"],
                      "gap_before": g.get("final_eval_loss"), "gap_after": g.get("anneal_eval_loss"),
                      "eval_before": r["final_eval_loss"], "eval_after": r.get("anneal_eval_loss")}
    return {"corpus": corpus, "size": size, "tokens": N, "decay_tokens": anneal, "start_seqs": b0,
            "points": [describe_point(p) for p in sw.curve["points"]], "schedules": scheds,
            "measurement_tokens": sw.curve["cost"]["branch_tokens"],
            "measurement_over_run": sw.curve["cost"]["branch_tokens"] / (N + anneal), "runs": rows,
            "seconds": time.time() - t0}


def fmt(g) -> str:
    if not g:
        return "—"
    return f"{g['mean']:+.4f}" + (f" ± {g['se']:.4f}" if g.get("se") is not None else "")


def table(results: dict) -> str:
    lines = ["| corpus, tokens | schedule | batch (sequences @ tokens) | gap before decay | gap after decay | steps saved |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key, r in sorted(results.items()):
        for name, row in r["runs"].items():
            if name == "small":
                continue
            sched = " → ".join(f"{b}" + (f"@{t // 1000}k" if t else "") for t, b in row["schedule"])
            lines.append(f"| {r['corpus']}, {r['tokens'] // 1000}k + {r['decay_tokens'] // 1000}k decay | {name} | "
                         f"{sched} | {fmt(row['gap_before'])} | {fmt(row['gap_after'])} | {row['steps_saved_pct']:.0f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import torch

    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/warmup-decay-study")
    ap.add_argument("--corpora", default="sotu,shakespeare")
    ap.add_argument("--sizes", default="1m,2m")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--b0", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=1)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "study.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for size in a.sizes.split(","):
        for corpus in a.corpora.split(","):
            r = cell(out, corpus, size, [int(s) for s in a.seeds.split(",")], a.b0, a.jobs)
            results[f"{corpus}-{size}"] = r
            path.write_text(json.dumps(results, indent=1))
            (out / "study.md").write_text(table(results))
            print(table({k: v for k, v in results.items() if k == f"{corpus}-{size}"}), flush=True)


if __name__ == "__main__":
    main()
