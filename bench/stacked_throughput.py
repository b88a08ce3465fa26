"""Branches of one shape trained one after another vs together as one stacked model
(``critbatch.train.stacked``): tokens/s of each path on the same branch jobs.

A short parent run of the ``demo`` preset (or ``--preset``) keeps a checkpoint; ``--n`` branch jobs
(replicates of k = 1, each its own window of the stream, cooldown windows as in a sweep) are written
twice, once trained alone in turn (``run_job``) and once stacked (``run_jobs_stacked``); the JSON says
tokens/s of both, their ratio, and the largest difference of their final held-out losses.

    OMP_NUM_THREADS=1 python bench/stacked_throughput.py --n 4 --threads 1
    python bench/stacked_throughput.py --device cuda --n 16 --preset small --window 262144
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def main() -> None:
    from critbatch import presets
    from critbatch.branch import SweepConfig, plan_sweep
    from critbatch.branch import branch_spec
    from critbatch.config import TrainConfig, from_dict, merge
    from critbatch.data import prepare
    from critbatch.io import read_json, write_json_atomic
    from critbatch.launch import run_job, write_job
    from critbatch.train import train
    from critbatch.train.stacked import run_jobs_stacked

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/stacked-bench")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--n", type=int, default=4, help="branches")
    ap.add_argument("--window", type=int, default=32768, help="tokens per branch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    data = prepare(out / "data", corpus="sotu", tokenizer="bytes", quiet=True)
    base = presets.get(a.preset)
    T = base.model.seq_len
    start = 64 * base.batch_seqs * T
    cfg = merge(base, {"data": {"path": str(data)}, "total_tokens": 2 * start, "checkpoint_tokens": [start],
                       "eval_seqs": 256, "eval_interval_tokens": 0, "device": a.device,
                       "model": {"vocab_size": None}})
    train(cfg, out / "parent", progress=False, quiet=True)
    shutil.copytree(out / "parent", out / "parent2")
    sets = []
    for name in ("parent", "parent2"):
        plan = plan_sweep(SweepConfig(run=str(out / name), at=[start], k=[1.0], window_tokens=a.window,
                                      replicates=a.n, launcher="inprocess", device=a.device))
        dirs = []
        for r in range(a.n):
            spec = branch_spec(plan, plan.points[0], 1.0, r)
            d = out / name / "jobs" / spec.id
            write_job(d, from_dict(TrainConfig, spec.config), out / name / spec.ckpt, eval_at_start=False,
                      keep_final_checkpoint=False)
            dirs.append(d)
        sets.append(dirs)
    t0 = time.perf_counter()
    for d in sets[0]:
        run_job(d, a.threads)
    alone_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_jobs_stacked(sets[1], a.threads)
    stacked_s = time.perf_counter() - t0
    tokens = sum(read_json(d / "result.json")["tokens"] - read_json(d / "result.json")["start_tokens"] for d in sets[0])
    diff = max(abs(read_json(x / "result.json")["final_eval_loss"] - read_json(y / "result.json")["final_eval_loss"])
               for x, y in zip(*sets))
    res = {"preset": a.preset, "device": a.device, "threads": a.threads, "branches": a.n, "window_tokens": a.window,
           "branch_batch_seqs": base.batch_seqs, "tokens": tokens,
           "alone_tokens_per_s": tokens / alone_s, "stacked_tokens_per_s": tokens / stacked_s,
           "speedup": alone_s / stacked_s, "max_final_eval_diff": diff,
           "paths": sorted({read_json(d / "result.json").get("trained", "alone") for d in sets[1]})}
    write_json_atomic(out / "stacked_throughput.json", res)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
