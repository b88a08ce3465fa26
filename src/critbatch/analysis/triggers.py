"""When to raise the batch during a run: the verdict of a branch probe, and two cheaper triggers
read beside it (numbers in, numbers out).

- **Branch probe** (:func:`probe_verdict`): the decided branch point of a probe (B and larger k·B
  from the run's own state, cooldown windows, eval-decided). The new batch is the largest probed
  k·B the decision shows within ε (its lower bound); a point the data cannot settle is
  ``undetermined`` and the batch stays.
- **Noise scale** (:func:`gns_verdict`): raise when m·B_simple ≥ 2B, with the multiple m measured
  on this run's own earlier probe points (:func:`calibrate`: the bounds each probe put on CBS ÷
  B_simple), never assumed. Before a calibration exists the trigger has no verdict.
- **Norm test** (Byrd et al. 2012, as used for LM pretraining by Lau et al. 2024, arXiv 2412.21124):
  the batch B is large enough when the variance of its mean gradient is at most η² times the squared
  gradient norm, tr(Σ)/B ≤ η²·|G|², i.e. B ≥ B_simple/η²; raise when B < B_simple/η². η is a
  setting of the test (default 1), not measured.
"""

from __future__ import annotations

import math

VERDICTS = ("raise", "stay", "undetermined")


def cbs_estimate(point: dict) -> float | None:
    """A single CBS reading in sequences from a decided point: the interval's geometric middle,
    its lower bound when only bounded below, ``None`` when the point says nothing."""
    if point.get("undetermined_reason"):
        return None
    lo, hi = point.get("cbs_low_seqs") or 0.0, point.get("cbs_high_seqs")
    if hi is not None and lo > 0:
        return math.sqrt(lo * hi)
    return lo if lo > 0 else None


def probe_verdict(point: dict, batch_seqs: int, max_batch_seqs: int | None = None) -> tuple[str, int]:
    """(verdict, batch afterwards) from a probe's decided point (``ks`` relative to ``batch_seqs``)."""
    if point.get("undetermined_reason"):
        return "undetermined", batch_seqs
    lo = point.get("cbs_low_seqs") or 0.0
    shown = [k * batch_seqs for k in point["ks"] if k > 1 and k * batch_seqs <= lo + 1e-9]
    if max_batch_seqs is not None:
        shown = [b for b in shown if b <= max_batch_seqs]
    if shown:
        return "raise", int(round(max(shown)))
    larger = [k for k in point["ks"] if k > 1]
    if larger and all(k in point.get("undetermined_ks", []) for k in larger[:1]):
        return "undetermined", batch_seqs  # the next batch was neither shown within eps nor worse
    return "stay", batch_seqs


def calibrate(history: list[tuple[float | None, float | None, float | None]]) -> float | None:
    """The multiple m of B_simple that reads the CBS, from this run's earlier probe points, each
    ``(cbs_low_seqs, cbs_high_seqs, b_simple_seqs)``: a probe that raised says m ≥ low/B_simple, one
    that stayed says m < high/B_simple. m is the geometric middle of the tightest bounds (the one
    bound when only one side is known; with bounds that cross — noise — the middle of the two);
    ``None`` without a usable point."""
    lows = [lo / b for lo, _hi, b in history if lo and b and b > 0]
    highs = [hi / b for _lo, hi, b in history if hi and b and b > 0]
    if lows and highs:
        return math.sqrt(max(lows) * min(highs))
    if lows or highs:
        return max(lows) if lows else min(highs)
    return None


def gns_verdict(b_simple: float | None, batch_seqs: int, multiple: float | None, factor: int = 2) -> str | None:
    """Raise when ``multiple`` × B_simple reaches ``factor`` × B; ``None`` before calibration.
    An infinite B_simple (|G|² estimated ≤ 0: all noise) raises."""
    if multiple is None:
        return None
    if b_simple is None:
        return "raise"
    return "raise" if multiple * b_simple >= factor * batch_seqs else "stay"


def norm_verdict(b_simple: float | None, batch_seqs: int, eta: float = 1.0) -> str:
    """The norm test: raise when B < B_simple / η² (``None`` B_simple: infinite, raise)."""
    if b_simple is None:
        return "raise"
    return "raise" if batch_seqs < b_simple / eta ** 2 else "stay"


def log_spaced_points(total_tokens: int, first_tokens: int, factor: float = 2.0) -> list[int]:
    """Probe points first, first·factor, ... below ``total_tokens``."""
    out, t = [], float(first_tokens)
    while t < total_tokens:
        out.append(int(round(t)))
        t *= factor
    return out


def phase_steps(phases: list[tuple[int, int]], seq_len: int, total_tokens: int) -> list[int]:
    """Optimizer steps in each phase of ``((start_tokens, batch_seqs), ...)`` when training
    ``total_tokens``: a phase applies from the first step that starts at or after its threshold; the
    last step may end past the total (as a run does)."""
    out, t = [], 0
    for i, (_start, b) in enumerate(phases):
        end = min(phases[i + 1][0] if i + 1 < len(phases) else total_tokens, total_tokens)
        n = -(-(end - t) // (b * seq_len)) if t < end else 0
        t += n * b * seq_len
        out.append(n)
    return out


def steps_for(phases: list[tuple[int, int]], seq_len: int, total_tokens: int) -> int:
    """Optimizer steps to train ``total_tokens`` under ``phases`` (:func:`phase_steps`, summed)."""
    return sum(phase_steps(phases, seq_len, total_tokens))
