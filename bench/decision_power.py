"""Operating characteristics of the non-inferiority rule (``--rule noninf``) on synthetic paired data
with the gap planted: how often a batch k passes, fails or is undetermined for a true gap of 0, ε
and 2ε, by replicates R and by the per-branch noise sd (window noise shared by all k of a replicate
cancels in the pairing). The numbers of docs/LOG.md ("decisions under noise").

    python bench/decision_power.py [--trials 4000]
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np


def rates(gap: float, R: int, sd: float, trials: int, rng, eps: float = 0.01) -> dict:
    from critbatch.analysis.decision import decide_noninf

    out = {"pass": 0, "fail": 0, "undetermined": 0}
    for _ in range(trials):
        win = rng.normal(0, 0.05, size=R)
        a = 3.0 + win + rng.normal(0, sd, R)
        b = 3.0 + win + gap + rng.normal(0, sd, R)
        out[decide_noninf([1, 2], [list(a), list(b)], eps=eps).status[1]] += 1
    return {k: v / trials for k, v in out.items()}


def main() -> None:
    from scipy.stats import nct
    from scipy.stats import t as student

    from critbatch.analysis.decision import needed_samples

    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=4000)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    eps = 0.01
    rows = []
    for sd in (0.003, 0.005, 0.01):
        for R in (2, 3, 5, 8, 16):
            r0, r1, r2 = (rates(g, R, sd, a.trials, rng) for g in (0.0, eps, 2 * eps))
            sigma_d = math.sqrt(2) * sd
            power = 1 - nct.cdf(student.ppf(0.95, R - 1), R - 1, eps * math.sqrt(R) / sigma_d)
            rows.append({"sd": sd, "R": R, "pass_at_0": r0["pass"], "power_at_0_analytic": float(power),
                         "undetermined_at_0": r0["undetermined"], "fail_at_0": r0["fail"],
                         "pass_at_eps": r1["pass"], "fail_at_eps": r1["fail"],
                         "pass_at_2eps": r2["pass"], "fail_at_2eps": r2["fail"],
                         "replicates_for_80pct_at_0": needed_samples(sigma_d, 0.0, eps, 0.95)})
    print("| branch sd | R | pass at gap 0 (analytic) | undetermined at 0 | pass at ε | pass at 2ε | fail at 2ε | R for 80% |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['sd']} | {r['R']} | {r['pass_at_0']:.3f} ({r['power_at_0_analytic']:.3f}) | "
              f"{r['undetermined_at_0']:.3f} | {r['pass_at_eps']:.3f} | {r['pass_at_2eps']:.4f} | "
              f"{r['fail_at_2eps']:.3f} | {r['replicates_for_80pct_at_0']} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
