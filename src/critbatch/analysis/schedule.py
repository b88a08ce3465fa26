"""Batch-size warmup derived from a CBS curve (docs/method.md §4; the paper read its thresholds off
a plot).

**The rule: a derived schedule never exceeds what a measured point allows.** A branch point p at
t_p allows the batch low(p) — the lower end of its CBS interval, the largest batch shown to pass
(0 when only the reference batch passed). The CBS is taken to be non-decreasing in tokens, so a
later point's lower bound caps an earlier one. The allowed batch at token t is

    A(t) = min { low(p) : t_p >= t_last(t) },   t_last(t) = the last measured point at or before t,

a non-decreasing step function that rises only at measured points; before the first point only the
start batch B0 is allowed, and after the last point A holds its last value (nothing is
extrapolated). Starting at B0, the batch steps up at the first token count where
``safety × next batch ≤ A(t)`` — and, with ``source='fit'``, also ``≤`` the censored fit C(t), which
can only delay a step, never bring it forward. The next batch is the largest doubling of the
current one that the bound allows (the paper's rule), or, with a granularity g (micro-batch ×
data-parallel ranks), the largest multiple of g. The base LR follows the coupling rule at every
phase, and Adam's betas and epsilon follow ``adam_rule``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from ..errors import ConfigError
from ..schedules.batch import BatchSchedule

SOURCES = ("auto", "fit", "measured")


@dataclass
class DerivedSchedule:
    schedule: BatchSchedule
    source: str
    notes: list[str] = field(default_factory=list)
    allowed: list[tuple[int, float]] = field(default_factory=list)
    """The measured envelope A(t): (point tokens, batch sequences allowed from there on)."""


def measured_envelope(curve: dict) -> tuple[list[tuple[int, float]], list[str]]:
    """[(t_p, A from t_p on)] for the points after 0 tokens, and notes on what shaped it."""
    pts = sorted((p for p in curve["points"] if p["tokens"] > 0), key=lambda p: p["tokens"])
    if not pts:
        raise ConfigError("the sweep has no branch point after 0 tokens to derive a schedule from")
    notes = []
    env: list[tuple[int, float]] = []
    m = math.inf
    for p in reversed(pts):
        m = min(m, float(p["cbs_low_seqs"] or 0.0))
        env.append((int(p["tokens"]), m))
    env.reverse()
    for p, (t, a) in zip(pts, env):
        if a < (p["cbs_low_seqs"] or 0):
            notes.append(f"the CBS lower bound at {t:,} tokens ({p['cbs_low_seqs']:g} seqs) is capped at {a:g} by a "
                         f"later point: the CBS is taken as non-decreasing, so the smaller later bound holds earlier")
        if p.get("undetermined_reason"):
            notes.append(f"the point at {t:,} tokens is undetermined ({p['undetermined_reason']}): it allows only "
                         f"the start batch, up to it")
        elif p.get("settled") is False:
            notes.append(f"the point at {t:,} tokens has undetermined batches above its lower bound "
                         f"({', '.join(f'{k:g}' for k in p.get('undetermined_ks', []))} x B): only the lower bound, "
                         f"shown to pass, is used")
    return env, notes


def _step_function(env: list[tuple[int, float]]) -> Callable[[float], float]:
    def A(t: float) -> float:
        v = 0.0
        for tp, a in env:
            if t >= tp:
                v = a
            else:
                break
        return v

    return A


def _fit_function(curve: dict) -> Callable[[float], float]:
    fit = curve["fit"]
    T = curve["seq_len"]
    b_max, t_s, c = fit["b_max"] / T, fit["t_s"], fit["c"]

    def f(t: float) -> float:
        if t <= 0:
            return 0.0
        x = c * (math.log(t) - math.log(t_s))
        return b_max / (1.0 + math.exp(-x)) if x > -700 else 0.0

    return f


def cbs_function(curve: dict, source: str = "measured") -> tuple[Callable[[float], float], str, list[str]]:
    """The bound the schedule must stay under, B(t) in sequences: the measured envelope A(t), or
    min(fit, A) for ``fit``; returns (bound, source used, notes)."""
    if source not in SOURCES:
        raise ConfigError(f"source {source!r} is not one of {', '.join(SOURCES)}")
    env, notes = measured_envelope(curve)
    A = _step_function(env)
    if source == "fit" or (source == "auto" and curve.get("fit")):
        if not curve.get("fit"):
            raise ConfigError("the sweep has no curve fit (it needs two branch points after 0 tokens); use --source measured")
        f = _fit_function(curve)
        return (lambda t: min(f(t), A(t))), "fit", notes
    return A, "measured", notes


def _first_crossing(C: Callable[[float], float], level: float, t_from: float, t_until: float) -> float | None:
    """Smallest t in [t_from, t_until] with C(t) >= level for a non-decreasing C (continuous or with
    jumps at measured points), found on a log grid and refined by bisection."""
    if C(t_from) >= level:
        return t_from
    lo_t = max(t_from, 1.0)
    n = 4000
    ratio = (t_until / lo_t) ** (1.0 / n) if t_until > lo_t else 1.0
    prev = lo_t
    for i in range(1, n + 1):
        t = lo_t * ratio ** i
        if C(t) >= level:
            a, b = prev, t
            for _ in range(80):
                m = 0.5 * (a + b)
                a, b = (a, m) if C(m) >= level else (m, b)
            return b
        prev = t
    return None


def derive_schedule(curve: dict, start_seqs: int, *, max_seqs: int | None = None, granularity: int | None = None,
                    safety: float = 1.0, source: str = "measured", rule: str = "sqrt", adam_rule: str = "none",
                    until_tokens: int | None = None) -> DerivedSchedule:
    """Warmup phases from a CBS curve (the module docstring states the rule). Thresholds are rounded
    up to whole sequences."""
    if start_seqs is None or start_seqs <= 0:
        raise ConfigError(f"start batch {start_seqs} must be a positive number of sequences")
    if max_seqs is not None and max_seqs < start_seqs:
        raise ConfigError(f"max batch {max_seqs} is below the start batch {start_seqs}")
    if granularity is not None and (granularity <= 0 or start_seqs % granularity):
        raise ConfigError(f"granularity {granularity} must be positive and divide the start batch {start_seqs}")
    if not (isinstance(safety, (int, float)) and math.isfinite(safety) and safety > 0):
        raise ConfigError(f"safety {safety} must be a number > 0")
    C, used, notes = cbs_function(curve, source)
    env, _ = measured_envelope(curve)
    T = curve["seq_len"]
    measured_max = max(p["tokens"] for p in curve["points"])
    until = float(until_tokens or max(measured_max * 4, 1))
    phases = [(0, start_seqs)]
    b, t = start_seqs, 0.0
    cap = max_seqs if max_seqs is not None else math.inf

    def allowed(c: float) -> int:
        """The largest batch the bound c allows from the current one (never smaller)."""
        if granularity:
            m = int(math.floor(c / safety / granularity + 1e-9)) * granularity
            return max(b, min(m, int(cap) if cap != math.inf else m))
        nb = b
        while nb * 2 <= cap and safety * nb * 2 <= c * (1 + 1e-12):
            nb *= 2
        return nb

    first_next = start_seqs + granularity if granularity else start_seqs * 2
    while True:
        nxt = b + granularity if granularity else b * 2
        if nxt > cap:
            if _first_crossing(C, safety * nxt, t, until) is not None:
                notes.append(f"capped at the maximum batch of {max_seqs} sequences: the CBS would allow more")
            break
        tc = _first_crossing(C, safety * nxt, t, until)
        if tc is None:
            break
        tok = int(math.ceil(tc / T)) * T
        nb = max(allowed(C(tc)), nxt)
        if tok <= phases[-1][0]:
            tok = phases[-1][0] + T
        phases.append((tok, nb))
        b, t = nb, tc * (1 + 1e-9)
    if len(phases) == 1:
        if first_next > cap:
            notes.append(f"no warmup: the maximum batch {max_seqs} leaves no room above the start batch {start_seqs}")
        else:
            notes.append(f"no warmup: the measured CBS ({used}) never reaches {safety:g} x {first_next} sequences before "
                         f"{int(until):,} tokens, so the batch stays at {start_seqs}")
    else:
        first_measured = env[0][0]
        if phases[1][0] <= int(math.ceil(first_measured / T)) * T and env[0][1] >= safety * first_next:
            notes.append(f"the CBS is already above {safety:g} x {first_next} sequences at the first measured point "
                         f"({first_measured:,} tokens): the schedule steps up there; measure earlier points or start larger")
    if any(a < start_seqs for _, a in env):
        low = [f"{tp:,}" for tp, a in env if a < start_seqs]
        notes.append(f"the measured CBS lower bound is below the start batch {start_seqs} at {', '.join(low)} tokens "
                     f"(it may lie below the grid there): the start batch itself is not shown to be safe")
    sched = BatchSchedule(tuple(phases), T, rule, start_seqs, adam_rule)
    return DerivedSchedule(sched, used, notes, env)
