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
                    until_tokens: int | None = None, not_before: float = 0.0) -> DerivedSchedule:
    """Warmup phases from a CBS curve (the module docstring states the rule). Thresholds are rounded
    up to whole sequences. ``not_before``: no step up before this many tokens (a step the bound
    allowed earlier is taken there)."""
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
    b, t = start_seqs, float(not_before)
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


# ---- where the start batch sits against the measured CBS (issue 22) ------------------------------

@dataclass
class StartAdvice:
    """Whether a run's start batch sits below, at or above the measured CBS, and a start batch with
    room for a warmup. Batches in sequences of the curve's length."""

    start_seqs: int
    position: str
    """``below`` (the measurements allow at least one doubling within the measured range), ``at``
    (no doubling is shown safe) or ``above`` (a larger batch than the start was shown to fail at some
    point: those tokens are trained past the CBS)."""
    room_doublings: int
    """Doublings of the start batch that the measured lower bounds allow by the last point."""
    plateau_low_seqs: float
    """The measured envelope's last value: the largest batch the last points show safe."""
    above_at: list[tuple[int, float]]
    """(tokens, upper bound) of the points whose CBS was shown below the start batch."""
    recommended_seqs: int
    """A start batch with room for the warmup: the largest batch shown safe at the earliest point,
    or, where only the smallest probed batch passed there, the largest power-of-two fraction of the
    start below that point's upper bound — and at least one doubling below the plateau."""
    steps_saved_pct: float
    """Optimizer steps the warmup derived from ``start_seqs`` saves against staying there, to ``until``."""
    recommended_steps_saved_pct: float
    """The same from ``recommended_seqs``."""
    until_tokens: int

    def message(self) -> str:
        """One paragraph for the command line and the report."""
        B, R = self.start_seqs, self.recommended_seqs
        if self.position == "above":
            where = ", ".join(f"{t:,} tokens (CBS <= {h:g})" for t, h in self.above_at)
            s = (f"warning: the start batch of {B} sequences is above the measured CBS at {where}: those tokens are "
                 f"trained past the critical batch size (wasted, or worse). Start at {R} sequences")
        elif self.position == "at" and R == B:  # nothing shown safe anywhere: no start can be vouched for
            return (f"the start batch of {B} sequences sits at the measured CBS (the lower bounds reach "
                    f"{self.plateau_low_seqs:g} by the last point): no doubling is shown safe, so no warmup can save "
                    f"steps from it, and the curve shows no smaller start with room for one either: only the "
                    f"smallest probed batch passed. Probe smaller batches (branch --k-min) or with more held-out "
                    f"sequences (--eval-seqs).")
        elif self.position == "at":
            s = (f"the start batch of {B} sequences sits at the measured CBS (the lower bounds reach "
                 f"{self.plateau_low_seqs:g} by the last point): no doubling is shown safe, so no warmup can save "
                 f"steps from it. A start at {R} sequences leaves room for one")
        else:
            s = (f"the start batch of {B} sequences is below the measured CBS: the lower bounds allow "
                 f"{self.room_doublings} doubling{'s' if self.room_doublings != 1 else ''} (to "
                 f"{self.plateau_low_seqs:g} sequences by the last point); the derived warmup saves "
                 f"{self.steps_saved_pct:.0f}% of the optimizer steps to {self.until_tokens:,} tokens")
            if R != B and self.recommended_steps_saved_pct > self.steps_saved_pct:  # only a start that saves more
                s += f"; from {R} sequences it would save {self.recommended_steps_saved_pct:.0f}%"
            return s + "."
        if R != B:
            s += f" (the derived warmup from there saves {self.recommended_steps_saved_pct:.0f}% of its steps to " \
                 f"{self.until_tokens:,} tokens)"
        return s + "."


def _steps(sched: BatchSchedule, until: int) -> int:
    """Optimizer steps of a run of ``until`` tokens under ``sched`` (a phase from the first step at or after it)."""
    steps, t = 0, 0
    while t < until:
        t += sched.batch_tokens_at(t)
        steps += 1
    return steps


def advise_start(curve: dict, start_seqs: int, until_tokens: int | None = None, **derive) -> StartAdvice:
    """Where ``start_seqs`` sits against the curve's measured CBS, and a start with room for a warmup
    (:class:`StartAdvice`); ``derive``: the options of :func:`derive_schedule` for the steps saved."""
    env, _ = measured_envelope(curve)
    pts = sorted((p for p in curve["points"] if p["tokens"] > 0), key=lambda p: p["tokens"])
    T = curve["seq_len"]
    until = int(until_tokens or max(p["tokens"] for p in pts) * 4)
    plateau = env[-1][1]
    above = [(int(p["tokens"]), float(p["cbs_high_seqs"])) for p in pts
             if p["cbs_high_seqs"] is not None and not p.get("undetermined_reason") and p["cbs_high_seqs"] < start_seqs]
    room = int(math.floor(math.log2(plateau / start_seqs) + 1e-9)) if plateau >= 2 * start_seqs else 0
    position = "above" if above else ("below" if room >= 1 else "at")
    first = pts[0]
    lo1, hi1 = float(first["cbs_low_seqs"] or 0.0), first["cbs_high_seqs"]
    if lo1 > 0:
        rec = int(lo1)
    else:  # only the smallest probed batch passed (or none was shown to fail): halve below the upper bound
        rec = start_seqs
        while rec > 1 and hi1 is not None and rec >= hi1:
            rec //= 2
    while rec > 1 and 2 * rec > plateau and plateau >= 2:  # room for at least one doubling below the plateau
        rec //= 2
    rec = max(1, min(rec, start_seqs) if position != "below" else rec)

    def saved(b0: int) -> float:
        d = derive_schedule(curve, b0, until_tokens=until, **derive)
        n = _steps(d.schedule, until)
        n0 = -(-until // (b0 * T))
        return 100.0 * (1 - n / n0)

    return StartAdvice(start_seqs, position, room, plateau, above, rec, saved(start_seqs), saved(rec), until)
