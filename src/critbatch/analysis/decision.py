"""Local critical batch size decisions from a table of branch losses (docs/method.md §2 and §6).

Input for one branch point: the grid of multipliers ``k`` (sorted ascending) and, for each, the
losses of its replicates (``inf`` for a diverged branch); replicate r of every k reads the same
data window, so differences between two k are *paired*. Optionally ``diff_se[i][j]``: the standard
error of the mean difference L_i − L_j that the replicates cannot see — the sampling error of the
fixed held-out set, which every replicate shares (computed from per-sequence eval losses).
Pure functions, no I/O.

Every k gets one of three statuses against every smaller k' (the smallest k is the reference and
passes vacuously; a diverged branch fails its k under every rule, and when the reference itself
diverged nothing can be compared, so every k and the point as a whole are undetermined, with the
reason in ``undetermined_reason``):

* ``pass`` — the data show L_k ≤ L_k' + ε for every smaller k';
* ``fail`` — the data show L_k > L_k' + ε for some smaller k';
* ``undetermined`` — neither: the noise is too large for this ε, and ``replicates_needed`` (or,
  with one replicate, ``eval_seqs_needed``) says how much more data would settle it.

Rules:

* ``eps`` — Merrill et al. 2025: a point reading on the replicate means, pass iff
  mean_k ≤ mean_k' + ε for all k' < k. With ``diff_se`` (the held-out set's sampling error) a
  comparison whose reading would flip within ``z·se`` of ε is undetermined. With one replicate the
  noise of the data window is not measured at all; the decision says so.
* ``noninf`` — non-inferiority (ours, needs ≥ 2 replicates): per smaller k' the paired differences
  d_r = L_k,r − L_k',r give an upper confidence bound UCB = d̄ + t·se; k passes iff UCB ≤ ε for
  every k' (an intersection–union test: the chance of passing a k whose true gap to some k' is ε or
  more is at most 1 − confidence, no multiplicity correction needed); it fails iff for some k' the
  lower bound d̄ − t'·se exceeds ε, at Bonferroni level (1 − confidence)/(number of smaller k), so
  an equally good k is called worse at most 1 − confidence of the time; otherwise undetermined.
  se² = sd²/R + diff_se² (replicate noise plus the held-out set's shared sampling error).

Readings: the paper's k* is the largest passing k; the conservative k* the largest k whose whole
prefix passes. The interval is [k*·B, k_next·B] with k_next the smallest k above k* that *fails*
(undetermined k in between widen it); with no failing k above, the CBS is bounded below only
(``high`` is ``None``). When only the reference k passes, the CBS may lie below the grid.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from ..errors import ConfigError
from ..registry import Registry

PASS, FAIL, UNDETERMINED = "pass", "fail", "undetermined"
POWER = 0.8
"""Power assumed when saying how many replicates would settle an undetermined k."""


@dataclass
class Decision:
    rule: str
    """``eps`` (the paper's point reading on replicate means) or ``noninf``."""
    ks: list[float]
    status: list[str]
    """Per k: ``pass``, ``fail`` or ``undetermined`` (see the module docstring)."""
    passes: list[bool]
    """Per k: status is ``pass``."""
    k_star: float
    """The paper's reading: the largest passing k."""
    k_star_conservative: float
    """The largest k whose whole prefix passes."""
    k_next: float | None
    """The smallest k above ``k_star`` that fails; ``None``: none does (bounded below only)."""
    k_next_conservative: float | None
    readings_disagree: bool
    bounded_above: bool
    """False when no k above k* was shown to fail: the CBS is only bounded below."""
    below_grid: bool
    """True when only the smallest k passes (vacuously): the CBS may be below the grid."""
    means: list[float]
    undetermined: list[float] = field(default_factory=list)
    """The k whose status is undetermined."""
    replicates_needed: list[int | None] = field(default_factory=list)
    """Per k: paired replicates that would settle an undetermined k at the rule's confidence with
    80% power, from the measured variance and mean gap (``None``: settled, or not estimable)."""
    details: dict = field(default_factory=dict)
    undetermined_reason: str | None = None
    """Set when the whole point is undetermined (the reference k diverged): why."""

    def interval(self, base_batch_seqs: float, conservative: bool = False) -> tuple[float, float | None]:
        k, kn = (self.k_star_conservative, self.k_next_conservative) if conservative else (self.k_star, self.k_next)
        return k * base_batch_seqs, (kn * base_batch_seqs if kn is not None else None)

    @property
    def settled(self) -> bool:
        """No k between k* and k_next (or above k*, when unbounded) is undetermined."""
        if self.undetermined_reason:
            return False
        hi = self.k_next if self.k_next is not None else math.inf
        return not any(self.k_star < k < hi for k in self.undetermined)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["settled"] = self.settled
        return d


def _clean(losses: list[list[float]]) -> list[np.ndarray]:
    out = []
    for reps in losses:
        a = np.array([float("inf") if (x is None or not math.isfinite(x)) else float(x) for x in reps], dtype=float)
        if a.size == 0:
            raise ConfigError("every k needs at least one loss")
        out.append(a)
    return out


def _reference_diverged(rule: str, ks: list[float], means: list[float], details: dict) -> Decision:
    """The smallest k diverged: there is no reference to compare with, so no k passes or fails and
    the point is undetermined as a whole (a diverged branch is never evidence that a larger batch
    is as good)."""
    n = len(ks)
    reason = (f"the smallest batch (k={ks[0]:g}) diverged, so no batch can be compared with it; lower the base "
              f"learning rate or branch from a later checkpoint")
    return Decision(
        rule=rule, ks=list(ks), status=[UNDETERMINED] * n, passes=[False] * n, k_star=ks[0],
        k_star_conservative=ks[0], k_next=None, k_next_conservative=None, readings_disagree=False,
        bounded_above=False, below_grid=False, means=means, undetermined=list(ks), replicates_needed=[None] * n,
        details=details, undetermined_reason=reason)


def finish_decision(rule: str, ks: list[float], status: list[str], means: list[float], needed: list[int | None],
                    details: dict) -> Decision:
    """The :class:`Decision` from each k's status (``pass``, ``fail``, ``undetermined``) against the
    smaller k: both readings and the interval; a diverged reference makes the point undetermined.
    Every rule ends here, a rule registered from outside included."""
    n = len(ks)
    if not math.isfinite(means[0]):
        return _reference_diverged(rule, ks, means, details)
    status = [PASS] + list(status[1:])  # the reference passes vacuously
    passes = [s == PASS for s in status]
    paper = max(i for i in range(n) if passes[i])
    cons = 0
    while cons + 1 < n and passes[cons + 1]:
        cons += 1

    def first_fail_above(i: int) -> float | None:
        return next((ks[j] for j in range(i + 1, n) if status[j] == FAIL), None)

    return Decision(
        rule=rule, ks=list(ks), status=status, passes=passes, k_star=ks[paper], k_star_conservative=ks[cons],
        k_next=first_fail_above(paper), k_next_conservative=first_fail_above(cons), readings_disagree=paper != cons,
        bounded_above=first_fail_above(paper) is not None, below_grid=paper == 0, means=means,
        undetermined=[k for k, s in zip(ks, status) if s == UNDETERMINED], replicates_needed=needed, details=details,
    )


def _check_grid(ks: list[float], losses: list) -> None:
    if len(ks) != len(losses) or not ks:
        raise ConfigError("one loss list per k is required")
    if any(b <= a for a, b in zip(ks, ks[1:])):
        raise ConfigError(f"k grid {ks} must be strictly increasing")


def _check_confidence(confidence: float) -> None:
    if not (isinstance(confidence, (int, float)) and 0.5 <= confidence < 1):
        raise ConfigError(f"confidence={confidence} must be in [0.5, 1)")


def _check_eps(eps: float) -> None:
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ConfigError(f"eps={eps} must be a number >= 0")


def _se_table(diff_se, n: int) -> np.ndarray:
    if diff_se is None:
        return np.zeros((n, n))
    a = np.array([[0.0 if v is None else float(v) for v in row] for row in diff_se], dtype=float)
    if a.shape != (n, n) or np.any(~np.isfinite(a)) or np.any(a < 0):
        raise ConfigError(f"diff_se must be an {n}x{n} table of standard errors >= 0")
    return a


def paired_eval_noise(per_seq: list[list]) -> tuple[list[list[float]], list[list[float]]]:
    """The held-out set's sampling error of every mean difference L_i − L_j.

    ``per_seq[i][r]``: the per-sequence eval losses of k_i's replicate r on the shared held-out set
    (``None`` if unknown, e.g. diverged). Per sequence s, δ_s = mean_r(ℓ_i,r,s − ℓ_j,r,s); returns
    (se, sd) tables with se = sd(δ)/√n — paired, so what the two models share cancels. Unknown
    pairs get 0 (no information, the rule reads them as exact)."""
    n_k = len(per_seq)
    se = [[0.0] * n_k for _ in range(n_k)]
    sd = [[0.0] * n_k for _ in range(n_k)]
    for i in range(n_k):
        for j in range(n_k):
            if i == j:
                continue
            a, b = per_seq[i], per_seq[j]
            if not a or not b or len(a) != len(b) or any(x is None for x in (*a, *b)):
                continue
            A, B = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
            if A.shape != B.shape or A.shape[-1] < 2:
                continue
            delta = (A - B).mean(axis=0)
            s = float(delta.std(ddof=1))
            sd[i][j], se[i][j] = s, s / math.sqrt(delta.size)
    return se, sd


@functools.lru_cache(maxsize=4096)
def t_quantile(p: float, df: int) -> float:
    """Student t quantile (cached: the decisions and the sample-size search ask for few distinct ones;
    scipy.special's function, bit-identical to ``scipy.stats.t.ppf`` without its per-call overhead)."""
    from scipy.special import stdtrit

    return float(stdtrit(df, p))


def needed_samples(sd: float, gap: float, eps: float, confidence: float, power: float = POWER) -> int | None:
    """The smallest n whose one-sided t bound settles "is the true gap within ε?" with the given
    power when the true gap is the measured one: power(n) = 1 − F_nct(t_conf,n−1; n−1, |ε − gap|·√n/sd)
    (docs/method.md §6 gives the normal approximation n ≈ ((z_α + z_β)·sd / |ε − gap|)², where the
    search for the exact n starts; power grows with n, so it walks from there to the boundary)."""
    from scipy.special import ndtri, nctdtr  # = scipy.stats norm.ppf, nct.cdf bit for bit, ~15x faster a call

    if not (math.isfinite(sd) and math.isfinite(gap)) or sd <= 0 or abs(eps - gap) < 1e-15:
        return None
    delta = abs(eps - gap) / sd

    def pw(n: int) -> float:
        return float(1 - nctdtr(n - 1, delta * math.sqrt(n), t_quantile(confidence, n - 1)))

    guess = ((ndtri(confidence) + ndtri(power)) / delta) ** 2
    if not math.isfinite(guess) or guess > 10**8:
        return None
    n = max(2, math.ceil(guess))
    if pw(n) >= power:  # walk down to the smallest n that still has the power
        while n > 2 and pw(n - 1) >= power:
            n -= 1
        return n
    lo, step = n, 1  # gallop up past the boundary, then bisect: the smallest n in (lo, hi] with the power
    while pw(lo + step) < power:
        lo, step = lo + step, step * 2
        if lo > 10**8:
            return None
    hi = lo + step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if pw(mid) < power else (lo, mid)
    return hi


def decide_eps(ks: list[float], losses: list[list[float]], eps: float = 0.01, *, diff_se=None,
               confidence: float = 0.95, diff_sd=None) -> Decision:
    """The paper's fixed-tolerance rule on the mean loss of each k's replicates.

    ``diff_se``/``diff_sd``: the held-out set's sampling error of each mean difference and the sd of
    its per-sequence differences; a comparison within ``z·se`` of ε is then undetermined and
    ``details['eval_seqs_needed']`` says how many held-out sequences would settle it."""
    from scipy.special import ndtri  # scipy.stats norm.ppf, bit for bit

    _check_eps(eps)
    _check_confidence(confidence)
    _check_grid(ks, losses)
    arr = _clean(losses)
    se = _se_table(diff_se, len(ks))
    sd = _se_table(diff_sd, len(ks)) if diff_sd is not None else None
    z = float(ndtri(confidence))
    means = [float(a.mean()) for a in arr]  # inf if any replicate diverged
    status, eval_needed = [PASS], [None]
    for i, m in enumerate(means[1:], start=1):
        if not math.isfinite(m):
            status.append(FAIL)
            eval_needed.append(None)
            continue
        s, need = PASS, None
        for j in range(i):
            if not math.isfinite(means[j]):
                continue  # a diverged smaller batch: nothing to compare with
            d = m - means[j]
            lo, hi = d - z * se[i, j], d + z * se[i, j]
            if lo > eps + 1e-12:
                s = FAIL
                need = None
                break
            if hi > eps + 1e-12:  # 1e-12: float slack; lo <= eps < hi needs se > 0
                s = UNDETERMINED
                if sd is not None:
                    need = max(need or 0, needed_samples(sd[i, j], d, eps, confidence) or 0) or None
        status.append(s)
        eval_needed.append(need if s == UNDETERMINED else None)
    R = min(a.size for a in arr)
    details = {"eps": eps, "confidence": confidence, "replicates": R, "eval_seqs_needed": eval_needed,
               "uncertainty": ("the data window's noise is not measured with one replicate (a point reading, as in "
                               "the paper); use --replicates >= 2 and --rule noninf for a stated confidence")
               if R < 2 else "replicate means; the replicates' spread is not used by this rule"}
    if diff_se is not None:
        details["diff_se"] = se.tolist()
    return finish_decision("eps", ks, status, means, [None] * len(ks), details)


def decide_noninf(ks: list[float], losses: list[list[float]], eps: float = 0.01, confidence: float = 0.95, *,
                  diff_se=None) -> Decision:
    """Non-inferiority over paired replicates: pass iff UCB(L_k − L_k') ≤ ε for every smaller k'."""

    _check_eps(eps)
    _check_confidence(confidence)
    _check_grid(ks, losses)
    arr = _clean(losses)
    R = {a.size for a in arr}
    if len(R) != 1 or (R := R.pop()) < 2:
        raise ConfigError("the noninf rule needs the same number (>= 2) of replicates for every k")
    se_eval = _se_table(diff_se, len(ks))
    means = [float(a.mean()) for a in arr]
    alpha = 1 - confidence
    t_pass = t_quantile(confidence, R - 1)
    status, needed, ucb_rows, lcb_rows = [PASS], [None], [[]], [[]]
    for i in range(1, len(ks)):
        if not np.all(np.isfinite(arr[i])):
            status.append(FAIL)
            needed.append(None)
            ucb_rows.append([math.inf] * i)
            lcb_rows.append([math.inf] * i)
            continue
        t_fail = t_quantile(1 - alpha / i, R - 1)  # Bonferroni over the i smaller grid values
        all_within, any_worse, need, ucbs, lcbs = True, False, None, [], []
        for j in range(i):
            if not np.all(np.isfinite(arr[j])):  # a diverged smaller batch: nothing to compare with
                ucbs.append(None)
                lcbs.append(None)
                continue
            d = arr[i] - arr[j]
            mean, sd = float(d.mean()), float(d.std(ddof=1))
            se = math.sqrt(sd ** 2 / R + se_eval[i, j] ** 2)
            ucb, lcb = mean + t_pass * se, mean - t_fail * se
            ucbs.append(ucb)
            lcbs.append(lcb)
            if lcb > eps:
                any_worse = True
            if ucb > eps:
                all_within = False
                n = needed_samples(math.sqrt(sd ** 2 + R * se_eval[i, j] ** 2), mean, eps, confidence)
                need = None if n is None else max(need or 0, n)
        s = FAIL if any_worse else (PASS if all_within else UNDETERMINED)
        status.append(s)
        needed.append(need if s == UNDETERMINED else None)
        ucb_rows.append(ucbs)
        lcb_rows.append(lcbs)
    details = {"eps": eps, "confidence": confidence, "replicates": R, "ucb": ucb_rows, "lcb": lcb_rows,
               "fail_correction": "bonferroni", "power_for_replicates_needed": POWER}
    if diff_se is not None:
        details["diff_se"] = se_eval.tolist()
    return finish_decision("noninf", ks, status, means, needed, details)


@dataclass(frozen=True)
class DecisionRule:
    """A decision rule: ``decide(ks, losses, eps, confidence, diff_se=..., diff_sd=...)`` returns the
    :class:`Decision` (build it with :func:`finish_decision` from per-k statuses); ``min_replicates``:
    the replicates per k it needs."""

    decide: Callable[..., Decision]
    min_replicates: int = 1
    description: str = ""


RULES = Registry("decision rule")
"""Decision rules by name; ``SweepConfig.rule`` and ``AutoBatchConfig.rule`` take their values from here."""
RULES.register("eps", DecisionRule(
    lambda ks, losses, eps, confidence, *, diff_se=None, diff_sd=None:
        decide_eps(ks, losses, eps, diff_se=diff_se, diff_sd=diff_sd, confidence=confidence),
    description="the paper's fixed tolerance on the replicate means"))
RULES.register("noninf", DecisionRule(
    lambda ks, losses, eps, confidence, *, diff_se=None, diff_sd=None:
        decide_noninf(ks, losses, eps, confidence, diff_se=diff_se),
    min_replicates=2, description="non-inferiority over paired replicates"))


def decide(ks: list[float], losses: list[list[float]], rule: str = "eps", eps: float = 0.01,
           confidence: float = 0.95, *, diff_se=None, diff_sd=None) -> Decision:
    """The decision of the rule named ``rule`` (:data:`RULES`)."""
    if rule == "ttest":
        raise ConfigError("rule 'ttest' was replaced by 'noninf' (non-inferiority: k passes only when the data show "
                          "it within eps of the smaller batches)")
    if rule not in RULES:
        raise ConfigError(f"decision rule {rule!r} is not one of {', '.join(RULES)}")
    return RULES[rule].decide(ks, losses, eps, confidence, diff_se=diff_se, diff_sd=diff_sd)
