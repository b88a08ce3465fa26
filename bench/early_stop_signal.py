"""Can a branch be stopped before its window ends once its decision is settled (issue 15, part 2)?

For every branch of a finished sweep, the paired training-loss gap to the point's reference branch
(the smallest k) over parts of the window: all k read the same stream from the same offset, so a
step of k·B covers exactly the reference's steps over the same sequences and the difference is
paired by data. Beside it, the gap the decision used (held-out loss at the window's end, after the
cooldown) and the branch's status. An early stop that keeps the decisions needs a gap read before
the end that already says "fail" for the failing branches and never for the passing ones.
(A k = 1 branch that started from the parent's checkpoint before its cooldown — the demo's since
issue 15's continuation — has only its cooldown's steps: its earlier parts read empty.)

    python bench/early_stop_signal.py runs/demo/base            # the demo's sweep
    python bench/early_stop_signal.py RUN --eps 0.01 --z 2
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

PARTS = [(0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]


def steps_of(branch_dir: Path) -> list[tuple[int, float]]:
    out = []
    for line in (branch_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "train/loss" in r and "eval/loss" not in r:
            out.append((r["tokens"], r["train/loss"]))
    return out


def paired_gap(ref: list[tuple[int, float]], br: list[tuple[int, float]], step_tokens: int, lo: float, hi: float):
    """Mean and standard error of (k's step loss − the reference's mean loss on the same sequences)
    over the k steps that lie in (lo, hi] tokens."""
    ds = []
    for t, v in br:
        if lo <= t - step_tokens and t <= hi:
            sub = [x for tt, x in ref if t - step_tokens < tt <= t]
            if sub:
                ds.append(v - sum(sub) / len(sub))
    n = len(ds)
    if n < 2:
        return None, None, n
    m = sum(ds) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in ds) / (n - 1))
    return m, sd / math.sqrt(n), n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", nargs="?", default="runs/demo/base")
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--z", type=float, default=2.0, help="an early 'fail' needs gap - z*se > eps")
    a = ap.parse_args()
    run = Path(a.run)
    T = json.loads((run / "config.json").read_text())["model"]["seq_len"]
    by_point: dict[int, dict[float, tuple]] = defaultdict(dict)
    for d in sorted((run / "branches").iterdir()):
        if not (d / "result.json").is_file():
            continue
        b = json.loads((d / "branch.json").read_text())
        r = json.loads((d / "result.json").read_text())
        if b["replicate"] == 0 and not r["diverged"]:
            by_point[b["point_tokens"]][b["k"]] = (b, r, steps_of(d))
    head = " | ".join(f"train gap {int(100 * f0)}–{int(100 * f1)}%" for f0, f1 in PARTS)
    print(f"| point | k | eval gap at the end | {head} | early 'fail' at 75% |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in PARTS) + " | --- |")
    wrong = right = 0
    for pt in sorted(by_point):
        ks = sorted(by_point[pt])
        ref = by_point[pt][ks[0]]
        W = ref[0]["window_tokens"]
        for k in ks[1:]:
            b, r, steps = by_point[pt][k]
            ev = r["final_eval_loss"] - ref[1]["final_eval_loss"]
            cells, early = [], None
            for f0, f1 in PARTS:
                m, se, n = paired_gap(ref[2], steps, b["batch_seqs"] * T, pt + f0 * W, pt + f1 * W)
                cells.append("—" if m is None else f"{m:+.4f} ± {se:.4f}")
                if (f0, f1) == (0.5, 0.75) and m is not None:
                    early = m - a.z * se > a.eps
            fails = ev > a.eps
            if early:
                right += fails
                wrong += not fails
            print(f"| {pt:,} | {k:g} | {ev:+.4f} ({'fail' if fails else 'within eps'}) | " + " | ".join(cells)
                  + f" | {'stop' if early else 'go on'} |")
    print(f"\nan early stop at the cooldown's start (gap − {a.z:g}·se > {a.eps:g}) would stop {right} failing and "
          f"{wrong} passing branches")


if __name__ == "__main__":
    main()
