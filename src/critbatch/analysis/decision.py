"""Local critical batch size decisions from a table of branch losses (method.md §2.5–2.6).

Input for one branch point: the grid of multipliers ``k`` (sorted ascending) and, for each, the
losses of its replicates (``inf`` for a diverged branch). Pure functions, no I/O.

* **Paper rule** (Merrill et al. 2025): k* = the largest k such that L_k <= L_k' + eps for every
  smaller grid value k'. The smallest k passes vacuously.
* **Conservative reading** (ours): the largest k such that every grid value up to it passes.
* **Statistical rule** (ours, needs >= 2 replicates): k "is worse" than a smaller k' when a one-sided
  paired t-test on the per-replicate differences L_k - L_k' rejects "mean difference <= margin" at
  the chosen confidence; the level is split over the smaller k' (Bonferroni), so the chance of
  calling an equally good k worse is at most 1 - confidence.

The interval is [k*·B, k_next·B] with k_next the next grid value above k*; when k* is the largest
grid value the CBS is only bounded below (``high`` is ``None``); when only the smallest k passes
(vacuously) the CBS may lie below the grid (``below_grid``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import ConfigError


@dataclass
class Decision:
    rule: str
    """``eps`` (the paper's rule on replicate means) or ``ttest``."""
    ks: list[float]
    passes: list[bool]
    """Per k: no worse than every smaller k (the paper's per-k condition)."""
    k_star: float
    """The paper's reading: the largest passing k."""
    k_star_conservative: float
    """The largest k whose whole prefix passes."""
    k_next: float | None
    k_next_conservative: float | None
    readings_disagree: bool
    bounded_above: bool
    """False when even the largest k passes: the CBS is only bounded below."""
    below_grid: bool
    """True when only the smallest k passes (vacuously): the CBS may be below the grid."""
    means: list[float]
    details: dict = field(default_factory=dict)

    def interval(self, base_batch_seqs: float, conservative: bool = False) -> tuple[float, float | None]:
        k, kn = (self.k_star_conservative, self.k_next_conservative) if conservative else (self.k_star, self.k_next)
        return k * base_batch_seqs, (kn * base_batch_seqs if kn is not None else None)

    def to_dict(self) -> dict:
        return asdict(self)


def _clean(losses: list[list[float]]) -> list[np.ndarray]:
    out = []
    for reps in losses:
        a = np.array([float("inf") if (x is None or not math.isfinite(x)) else float(x) for x in reps], dtype=float)
        if a.size == 0:
            raise ConfigError("every k needs at least one loss")
        out.append(a)
    return out


def _finish(rule: str, ks: list[float], passes: list[bool], means: list[float], details: dict) -> Decision:
    n = len(ks)
    paper = max(i for i in range(n) if passes[i])
    cons = 0
    while cons + 1 < n and passes[cons + 1]:
        cons += 1
    nxt = lambda i: ks[i + 1] if i + 1 < n else None  # noqa: E731
    return Decision(
        rule=rule, ks=list(ks), passes=list(passes), k_star=ks[paper], k_star_conservative=ks[cons],
        k_next=nxt(paper), k_next_conservative=nxt(cons), readings_disagree=paper != cons,
        bounded_above=paper < n - 1, below_grid=paper == 0, means=means, details=details,
    )


def _check_grid(ks: list[float], losses: list) -> None:
    if len(ks) != len(losses) or not ks:
        raise ConfigError("one loss list per k is required")
    if any(b <= a for a, b in zip(ks, ks[1:])):
        raise ConfigError(f"k grid {ks} must be strictly increasing")


def decide_eps(ks: list[float], losses: list[list[float]], eps: float = 0.01) -> Decision:
    """The paper's fixed-tolerance rule on the mean loss of each k's replicates."""
    if eps < 0 or not math.isfinite(eps):
        raise ConfigError(f"eps={eps} must be >= 0")
    _check_grid(ks, losses)
    arr = _clean(losses)
    means = [float(a.mean()) for a in arr]  # inf if any replicate diverged
    passes = []
    for i, m in enumerate(means):
        ok = math.isfinite(m) and all(m <= means[j] + eps + 1e-12 for j in range(i))  # 1e-12: float slack
        passes.append(ok or i == 0)
    return _finish("eps", ks, passes, means, {"eps": eps})


def decide_ttest(ks: list[float], losses: list[list[float]], confidence: float = 0.95, margin: float = 0.0) -> Decision:
    """One-sided paired t-tests: k fails if it is significantly worse than any smaller k.

    Replicate r of every k must share its data window (pairing removes the window's noise)."""
    if not 0.5 <= confidence < 1:
        raise ConfigError(f"confidence={confidence} must be in [0.5, 1)")
    if margin < 0:
        raise ConfigError(f"margin={margin} must be >= 0")
    _check_grid(ks, losses)
    arr = _clean(losses)
    R = {a.size for a in arr}
    if len(R) != 1 or R.pop() < 2:
        raise ConfigError("the t-test rule needs the same number (>= 2) of replicates for every k")
    means = [float(a.mean()) for a in arr]
    passes, pvals = [True], [[]]
    for i in range(1, len(ks)):
        if not np.all(np.isfinite(arr[i])):
            passes.append(False)
            pvals.append([0.0] * i)
            continue
        alpha = (1 - confidence) / i  # Bonferroni over the i smaller grid values
        row, worse = [], False
        for j in range(i):
            if not np.all(np.isfinite(arr[j])):
                row.append(1.0)  # a diverged smaller batch: nothing to be worse than
                continue
            d = arr[i] - arr[j] - margin
            p = paired_one_sided_p(d)
            row.append(p)
            worse |= p < alpha
        passes.append(not worse)
        pvals.append(row)
    return _finish("ttest", ks, passes, means, {"confidence": confidence, "margin": margin, "p_values": pvals,
                                                "correction": "bonferroni"})


def paired_one_sided_p(d: np.ndarray) -> float:
    """p-value of H0: mean(d) <= 0 against H1: mean(d) > 0 (Student t, n-1 d.o.f.)."""
    from scipy import stats

    d = np.asarray(d, dtype=float)
    n = d.size
    sd = d.std(ddof=1)
    if sd == 0:
        return 0.0 if d.mean() > 0 else 1.0
    t = d.mean() / (sd / math.sqrt(n))
    return float(stats.t.sf(t, n - 1))


def decide(ks: list[float], losses: list[list[float]], rule: str = "eps", eps: float = 0.01,
           confidence: float = 0.95, margin: float = 0.0) -> Decision:
    if rule == "eps":
        return decide_eps(ks, losses, eps)
    if rule == "ttest":
        return decide_ttest(ks, losses, confidence, margin)
    raise ConfigError(f"decision rule {rule!r} is not one of eps, ttest")
