"""Batch-size warmup derived from a CBS curve (method.md §4; the paper read its thresholds off a plot).

Starting at B0, the batch steps up at the first token count where the CBS curve reaches
``safety × (next batch)``. The next batch is the doubling of the current one (the paper's rule), or
— with a granularity g (micro-batch × data-parallel ranks) — the largest multiple of g that the CBS
allows. The base LR follows the coupling rule at every phase.

The CBS curve C(t), in sequences, comes from one of:

* ``fit`` — the censored fit of the sweep (continuous; may extrapolate past the measured range);
* ``measured`` — the measured intervals at their ``bound`` (``low``: the CBS is known to be at least
  this, the conservative default; ``geomean``: the plotted middle), interpolated linearly in log-log
  between branch points, 0 before the first and held after the last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from ..errors import ConfigError
from .batch import BatchSchedule

SOURCES = ("auto", "fit", "measured")
BOUNDS = ("low", "geomean")


@dataclass
class DerivedSchedule:
    schedule: BatchSchedule
    source: str
    bound: str | None
    notes: list[str] = field(default_factory=list)
    extrapolated: list[bool] = field(default_factory=list)
    """Per phase: the threshold lies beyond the last measured branch point."""


def cbs_function(curve: dict, source: str = "auto", bound: str = "low") -> tuple[Callable[[float], float], str, str | None]:
    """C(t) in sequences from a sweep's ``cbs.json`` content; returns (C, source used, bound used)."""
    if source not in SOURCES:
        raise ConfigError(f"source {source!r} is not one of {', '.join(SOURCES)}")
    if bound not in BOUNDS:
        raise ConfigError(f"bound {bound!r} is not one of {', '.join(BOUNDS)}")
    T = curve["seq_len"]
    fit = curve.get("fit")
    if source == "fit" or (source == "auto" and fit):
        if not fit:
            raise ConfigError("the sweep has no curve fit (it needs two branch points after 0 tokens); use --source measured")
        b_max, t_s, c = fit["b_max"] / T, fit["t_s"], fit["c"]

        def f(t: float) -> float:
            if t <= 0:
                return 0.0
            x = c * (math.log(t) - math.log(t_s))
            return b_max / (1.0 + math.exp(-x)) if x > -700 else 0.0

        return f, "fit", None
    pts = []
    for p in sorted(curve["points"], key=lambda p: p["tokens"]):
        if p["tokens"] <= 0:
            continue
        lo, hi = p["cbs_low_seqs"], p["cbs_high_seqs"]
        v = lo if (bound == "low" or hi is None or lo <= 0) else math.sqrt(lo * hi)
        pts.append((float(p["tokens"]), float(v)))
    if not pts:
        raise ConfigError("the sweep has no branch point after 0 tokens to derive a schedule from")

    def g(t: float) -> float:
        if t < pts[0][0]:
            return 0.0
        for (t0, v0), (t1, v1) in zip(pts, pts[1:]):
            if t0 <= t <= t1:
                if v0 <= 0 or v1 <= 0:
                    return v0 + (v1 - v0) * (t - t0) / (t1 - t0)
                w = (math.log(t) - math.log(t0)) / (math.log(t1) - math.log(t0))
                return math.exp(math.log(v0) + w * (math.log(v1) - math.log(v0)))
        return pts[-1][1]

    return g, "measured", bound


def _first_crossing(C: Callable[[float], float], level: float, t_from: float, t_until: float) -> float | None:
    """Smallest t in [t_from, t_until] with C(t) >= level (C continuous except at the first measured
    point), found on a log grid and refined by bisection."""
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
                    safety: float = 1.0, source: str = "auto", bound: str = "low", rule: str = "sqrt",
                    until_tokens: int | None = None) -> DerivedSchedule:
    """Warmup phases from a CBS curve. Thresholds are rounded up to whole sequences."""
    if start_seqs is None or start_seqs <= 0:
        raise ConfigError(f"start batch {start_seqs} must be a positive number of sequences")
    if max_seqs is not None and max_seqs < start_seqs:
        raise ConfigError(f"max batch {max_seqs} is below the start batch {start_seqs}")
    if granularity is not None and (granularity <= 0 or start_seqs % granularity):
        raise ConfigError(f"granularity {granularity} must be positive and divide the start batch {start_seqs}")
    if not safety > 0:
        raise ConfigError(f"safety {safety} must be > 0")
    C, used, used_bound = cbs_function(curve, source, bound)
    T = curve["seq_len"]
    measured_max = max(p["tokens"] for p in curve["points"])
    until = float(until_tokens or max(measured_max * 4, 1))
    notes: list[str] = []
    phases = [(0, start_seqs)]
    extrap = [False]
    b, t = start_seqs, 0.0
    cap = max_seqs if max_seqs is not None else float("inf")

    def allowed(c: float) -> int:
        """The largest batch the CBS value c allows from the current one (never smaller)."""
        if granularity:
            m = int(math.floor(c / safety / granularity)) * granularity
            return max(b, min(m, int(cap) if cap != float("inf") else m))
        nb = b
        while nb * 2 <= cap and safety * nb * 2 <= c:
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
        nb = allowed(C(tc) * (1 + 1e-12))
        if nb <= b:
            nb = nxt
        if tok <= phases[-1][0]:
            tok = phases[-1][0] + T
        phases.append((tok, nb))
        extrap.append(tc > measured_max + T)
        b, t = nb, tc * (1 + 1e-9)
    if len(phases) == 1:
        if first_next > cap:
            notes.append(f"no warmup: the maximum batch {max_seqs} leaves no room above the start batch {start_seqs}")
        else:
            notes.append(f"no warmup: the CBS curve ({used}) never reaches {safety:g} x {first_next} sequences before "
                         f"{int(until):,} tokens, so the batch stays at {start_seqs}")
    else:
        first_measured = min(p["tokens"] for p in curve["points"] if p["tokens"] > 0)
        if used == "measured" and phases[1][0] <= int(math.ceil(first_measured / T)) * T:
            notes.append(f"the CBS is already above {safety:g} x {first_next} sequences at the first measured point "
                         f"({first_measured:,} tokens): the schedule steps up there; measure earlier points or start larger")
        if used == "fit" and C(1.0 * T) >= safety * first_next:
            notes.append("the fitted CBS exceeds the next batch from the start: the first step is at the first sequence")
        if any(extrap):
            notes.append("thresholds after the last measured branch point extrapolate the curve")
    sched = BatchSchedule(tuple(phases), T, rule, start_seqs)
    return DerivedSchedule(sched, used, used_bound, notes, extrap)
