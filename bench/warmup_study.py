"""Batch-size warmup on the tiny preset: the numbers of docs/LOG.md ("batch-size warmup on the tiny
preset"). Derives the schedule from the eval-decided full-grid sweep of bench/branch_study.py and
runs the comparison (2M tokens + a 200k-token anneal, eval on 1024 held-out sequences).

    python bench/branch_study.py --out runs/bench-branch       # first: the base run and its sweeps
    python bench/warmup_study.py --study runs/bench-branch     # about 5 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    from critbatch.compare import CompareConfig, markdown_table, run_compare
    from critbatch.io import read_json, write_json_atomic
    from critbatch.schedules.derive import derive_schedule
    from critbatch.schedules.export import schedule_document

    ap = argparse.ArgumentParser()
    ap.add_argument("--study", default="runs/bench-branch")
    ap.add_argument("--total-tokens", type=int, default=2_000_000)
    ap.add_argument("--anneal-tokens", type=int, default=200_000)
    a = ap.parse_args()
    base = Path(a.study) / "base"
    sweeps = [p.parent for p in sorted((base / "sweeps").glob("*/cbs.json"))
              if (c := read_json(p))["search"] == "grid" and c["decide_by"] == "eval" and c["replicates"] == 1
              and len(c["points"][0]["ks"]) > 1]
    if not sweeps:
        raise SystemExit(f"no eval-decided grid sweep under {base}; run bench/branch_study.py first")
    curve = read_json(sweeps[0] / "cbs.json")
    d = derive_schedule(curve, curve["points"][0]["base_batch_seqs"], rule=curve["lr_rule"],
                        until_tokens=a.total_tokens + a.anneal_tokens)
    out = Path(a.study)
    write_json_atomic(out / "schedule.json", schedule_document(d.schedule, notes=d.notes, extrapolated=d.extrapolated))
    print("schedule:", [(t, b) for t, b in d.schedule.phases], d.notes)
    comp = run_compare(CompareConfig(out=str(out / "compare"), schedule=str(out / "schedule.json"), preset="tiny",
                                     total_tokens=a.total_tokens, anneal_tokens=a.anneal_tokens, eval_seqs=1024))
    print(markdown_table(comp))
    print(json.dumps({"wall_time_s": comp["wall_time_s"]}))


if __name__ == "__main__":
    main()
