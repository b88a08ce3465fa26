"""Where does the demo's start batch sit against its CBS, and what does a warmup from below it do?
(issue 22: "a start batch below the CBS"). One command, resumable.

For each start batch B0 (LR at B0 by the sqrt rule from the demo preset's 3e-3 at 8 sequences), on
the embedded corpus: the demo's base run from B0, its adaptive cooldown-probe sweep at the demo's
points, the warmup derived from it, and that warmup against the small- and large-batch controls
with the demo's anneal (one seed: a first look; the study of record is bench/warmup_decay_study.py).

    OMP_NUM_THREADS=1 python bench/start_batch.py --out runs/start-batch --b0 2,4
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path


def main() -> None:
    import torch

    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    from critbatch import presets
    from critbatch.branch import SweepConfig, continuation_checkpoints, describe_point, run_sweep
    from critbatch.config import merge, to_dict
    from critbatch.data import prepare
    from critbatch.demo import DemoConfig
    from critbatch.io import write_json_atomic
    from critbatch.train import train
    from critbatch.warmup import CompareConfig, ScheduleConfig, run_compare, write_schedule

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/start-batch")
    ap.add_argument("--b0", default="2,4")
    ap.add_argument("--corpus", default="sotu")
    ap.add_argument("--total-tokens", type=int, default=1_000_000)
    a = ap.parse_args()
    out = Path(a.out)
    d = DemoConfig()
    data = out / f"data-{a.corpus}"
    if not (data / "meta.json").is_file():
        prepare(data, corpus=a.corpus, tokenizer="bytes", quiet=True)
    results = {}
    for b0 in [int(x) for x in a.b0.split(",")]:
        base = presets.get("demo")
        T = base.model.seq_len
        lr = base.optim.lr * math.sqrt(b0 / base.batch_seqs)
        keep = continuation_checkpoints(d.points, d.window_tokens, d.cooldown_fraction, b0 * T)
        cfg = merge(base, {"data": {"path": str(data)}, "batch_seqs": b0, "optim": {"lr": lr},
                           "total_tokens": a.total_tokens, "checkpoint_tokens": d.points + keep})
        cell = out / f"{a.corpus}-b{b0}"
        t0 = time.time()
        train(cfg, cell / "base", progress=False)
        sw = run_sweep(SweepConfig(run=str(cell / "base"), at=d.points, window_tokens=d.window_tokens, search="adaptive",
                                   k_min=d.k_min, k_max=d.k_max, cooldown_fraction=d.cooldown_fraction,
                                   early_stop_gap=d.early_stop_gap, eval_seqs=d.eval_seqs, launcher="inprocess",
                                   threads_per_branch=1), progress=False)
        doc, _ = write_schedule(ScheduleConfig(sweep=str(sw.sweep_dir), out=str(cell / "schedule.json"),
                                               start_seqs=b0, until_tokens=a.total_tokens))
        res = {"b0": b0, "lr": lr, "points": [describe_point(p) for p in sw.curve["points"]],
               "schedule": [[p["start_tokens"], p["batch_seqs"]] for p in doc["phases"]],
               "sweep_cost": sw.curve["cost"]["branch_tokens_over_base"]}
        if len([p for p in doc["phases"] if p["start_tokens"] < a.total_tokens]) > 1:
            cfg_file = cell / "compare-config.json"
            write_json_atomic(cfg_file, to_dict(merge(cfg, {"checkpoint_tokens": []})))
            comp = run_compare(CompareConfig(out=str(cell / "compare"), schedule=str(cell / "schedule.json"),
                                             config=str(cfg_file), total_tokens=a.total_tokens,
                                             anneal_tokens=d.anneal_tokens, jobs=1, launcher="inprocess"),
                               progress=False)
            runs = comp["runs"]
            res["gaps"] = {n: {k: (runs[n].get("gap_to_small") or {}).get(k) for k in ("final_eval_loss", "anneal_eval_loss")}
                           for n in ("warmup", "large")}
            res["steps_saved_pct"] = {n: runs[n]["steps_saved_pct"] for n in ("warmup", "large")}
        res["seconds"] = time.time() - t0
        results[b0] = res
        write_json_atomic(out / f"{a.corpus}-results.json", results)
        print(json.dumps(res, indent=1, default=str), flush=True)


if __name__ == "__main__":
    main()
