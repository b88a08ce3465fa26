"""The closed loop's raise policy: pure functions of what the probes measured and what the loop
decided before — no training, no files (tests drive them with planted verdicts).

At a probe point, :func:`decide_raise` takes the verdicts of the triggers (the branch probe, the
calibrated noise scale, the norm test) and says which trigger acts and what the batch becomes:

1. the trigger ``act_on`` acts when it has a verdict, else the branch probe;
2. the branch probe raises to the largest probed batch it shows within ε; the noise-scale and norm
   triggers raise to 2B; never above ``max_batch_seqs``;
3. with ``confirm`` > 1 a raise must be seen at that many consecutive probe points at the same batch
   (a wrong raise is never undone, a wrong stay is revisited at the next point);
4. with ``eps_budget`` every raise spends the loss gap its probe measured, and a raise that would take
   the run's total past the budget is not taken.

Where the loop probes next (:func:`next_point`), whether a probe point can still lead to a raise at
all (:func:`futile_point`: if not, the loop stops probing) and how far the main run trains on before
a probe decides (:func:`main_run_lead`, :func:`lead_limit`) are here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..branch import last_step_before_cooldown
from ..records import Confirmations, ProbeDecision, ProbeEvidence, unconfirmed_raise
from .config import AutoBatchConfig, default_window


@dataclass(frozen=True)
class RaiseDecision:
    """What the policy decided at one probe point."""

    acted_on: str
    batch_after: int
    confirmations: Confirmations | None = None
    """A raise the acting trigger saw, counted against the consecutive points it needs."""
    eps_budget: dict | None = None
    """With an eps budget and a raise to judge: what was spent before, this raise's gap, the budget."""
    eps_spent: float | None = None
    """The gap this raise spends from the budget (only when taken)."""


def acting_trigger(verdicts: dict[str, str | None], act_on: str) -> str:
    """``act_on`` when it has a verdict at this point, else the branch probe."""
    return act_on if verdicts.get(act_on) is not None else "branch"


def raise_streak(batch: int, previous: list[ProbeDecision]) -> int:
    """Consecutive raises seen at ``batch`` up to this point, this one included: 1 + the immediately
    preceding decisions at the same batch whose acting trigger said raise."""
    streak = 1
    for d in reversed(previous):
        if d["batch_before"] != batch or d["verdicts"].get(d["acted_on"]) != "raise":
            break
        streak += 1
    return streak


def probe_gap(probe: ProbeEvidence, k: float) -> float | None:
    """The probe's measured cost of batch k·B: mean held-out loss at k minus at k = 1 (at least 0)."""
    ks = [round(x, 9) for x in probe["ks"]]
    if round(k, 9) not in ks or 1.0 not in ks:
        return None
    mean = [sum(v) / len(v) for v in probe["eval_losses"]]
    return max(0.0, mean[ks.index(round(k, 9))] - mean[ks.index(1.0)])


def decide_raise(batch: int, verdicts: dict[str, str | None], branch_batch_after: int | None,
                 probe: ProbeEvidence | None, previous: list[ProbeDecision], a: AutoBatchConfig) -> RaiseDecision:
    """The batch after a probe point at ``batch`` (see the module docstring). ``branch_batch_after``:
    the batch the branch probe allows (its largest probed batch shown within ε, capped), ``None``
    without a branch probe; ``previous``: the loop's earlier decisions."""
    acted = acting_trigger(verdicts, a.act_on)
    cap = a.max_batch_seqs
    if acted == "branch":
        after = branch_batch_after if branch_batch_after is not None else batch
    else:
        after = 2 * batch if (verdicts[acted] == "raise" and (cap is None or 2 * batch <= cap)) else batch
    confirmations = budget = spent = None
    if after > batch and a.confirm > 1:  # a raise must be seen at `confirm` consecutive points at this batch
        streak = raise_streak(batch, previous)
        confirmations = {"seen": min(streak, a.confirm), "needed": a.confirm}
        if streak < a.confirm:
            after = batch
    if after > batch and a.eps_budget is not None and probe is not None:  # the run's tolerance, shared
        gap = probe_gap(probe, after / batch)
        before = sum(d.get("eps_spent") or 0.0 for d in previous)
        budget = {"spent_before": before, "gap": gap, "budget": a.eps_budget}
        if gap is None or before + gap > a.eps_budget + 1e-12:
            after = batch
        else:
            spent = gap
    return RaiseDecision(acted, after, confirmations, budget, spent)


def next_point(cur: int, points: list[int], total: int, last: ProbeDecision | None, a: AutoBatchConfig) -> int:
    """The next probe point after ``cur`` tokens (``total`` when none is left): the next scheduled
    point, or sooner, ``confirm_factor`` × ``cur``, when ``last`` saw a raise still unconfirmed."""
    end = next((p for p in points if p > cur), total)
    if last is not None and a.confirm_factor and unconfirmed_raise(last):
        sooner = int(round(cur * a.confirm_factor))
        if cur < sooner < end:
            return sooner
    return end


def point_measurement(t: int, batch: int, phase_start: int, seq_len: int, a: AutoBatchConfig, limit: int,
                      branch: bool = True, noise: bool = False) -> int:
    """The measurement a probe point at ``t`` tokens at ``batch`` costs, estimated before it runs: its
    probes' tokens less the stretch before the cooldown that becomes the run — the main run's lead at
    B when the batch stays, the 2B probe's when it is raised, equal within one step of the largest
    probed batch, which is added — plus the noise scale's. ``limit``: where the lead must stop
    (:func:`lead_limit`); ``branch``: whether a branch probe runs; ``noise``: whether the noise scale
    is estimated."""
    T = seq_len
    out = a.gns_batches * a.gns_b_big * T if noise else 0
    if not branch:
        return out
    w = a.window_tokens or default_window(t, a.window_fraction, batch, max(a.probe_k), T)
    out += a.replicates * sum(-(-w // (int(round(k * batch)) * T)) * int(round(k * batch)) * T for k in a.probe_k)
    got = None if a.speculate else main_run_lead(t, phase_start, batch, T, w, a.cooldown_fraction, limit)
    if got is not None:
        out -= (got[1] - got[0]) - int(round(max(a.probe_k) * batch)) * T
    return out


def futile_point(t: int, batch: int, streak_before: int, points: list[int], total: int, a: AutoBatchConfig,
                 spent: int = 0, cost: Callable[[int], int] | None = None) -> str | None:
    """Why a probe at ``t`` tokens, at ``batch``, can lead to no raise before the run's end (so it,
    and every later point, would only cost tokens), or ``None`` when it can. ``streak_before``: the
    raises seen at consecutive points at this batch just before (``raise_streak`` less one);
    ``spent``: the measurement so far; ``cost``: a point's estimated measurement
    (:func:`point_measurement`), for the ``measurement_budget``.

    Three reasons: no probed raise fits under ``max_batch_seqs``; the point's probes would take the
    measurement past the budget; or a raise needs ``confirm`` − ``streak_before`` more points seeing
    it and fewer remain within the run and the budget — counted in the best case, every point from
    ``t`` on seeing a raise (so with ``confirm_factor`` the sooner confirmation points count). A
    point that can lead to no raise decides nothing: the run goes on at its batch either way, bit for
    bit as if it had been probed and stayed."""
    raises = [int(round(k * batch)) for k in a.probe_k if k > 1] + ([] if a.act_on == "branch" else [2 * batch])
    cap = a.max_batch_seqs
    if cap is not None and min(raises) > cap:
        return f"no raise from batch {batch} fits under max_batch_seqs={cap}"
    budget = None if a.measurement_budget is None or cost is None else a.measurement_budget * total
    acc = spent + (cost(t) if budget is not None else 0)
    if budget is not None and acc > budget:
        return (f"its probes would take the measurement from {spent:,} to about {acc:,.0f} tokens, past the budget of "
                f"{budget:,.0f} ({a.measurement_budget:g} of the run's tokens: --auto.measurement-budget)")
    need = a.confirm - streak_before
    n, cur = 1, t
    while n < need:
        end = next((p for p in points if p > cur), total)
        if a.confirm_factor and a.confirm > 1 and cur < int(round(cur * a.confirm_factor)) < end:
            end = int(round(cur * a.confirm_factor))
        if end >= total:
            break
        if budget is not None:
            acc += cost(end)
            if acc > budget:
                break
        n, cur = n + 1, end
    if n < need:
        return (f"a raise from batch {batch} needs {need} more consecutive probe points seeing it (confirm={a.confirm}) "
                f"and {n} remain before the run's end" + (" within the measurement budget" if budget is not None else ""))
    return None


def main_run_lead(point: int, phase_start: int, batch_seqs: int, seq_len: int, window: int, cooldown_fraction: float,
                  limit: int) -> tuple[int, int] | None:
    """(the probe point on the run's step boundaries, the lead): how far the main run goes on at
    ``batch_seqs`` past a probe at ``point`` before it decides — the last step boundary before the
    probe's cooldown (the step that starts at the cooldown's start still runs at the full LR), so the
    probe at the current batch reads all but its cooldown from the run. ``None`` when that would
    reach ``limit`` (the next point the loop may probe at, or the run's end)."""
    step = batch_seqs * seq_len
    t = phase_start + -(-(point - phase_start) // step) * step
    lead = last_step_before_cooldown(t, step, window, cooldown_fraction)
    return (t, lead) if t < lead < limit else None


def lead_limit(point: int, points: list[int], total: int, a: AutoBatchConfig) -> int:
    """The next tokens the loop may probe at after ``point``: the next scheduled point (or the
    run's end), or sooner, a confirmation point at ``confirm_factor`` × the point."""
    limit = next((p for p in points + [total] if p > point), total)
    if a.confirm_factor and a.confirm > 1:
        limit = min(limit, int(round(point * a.confirm_factor)))
    return limit


def agreement(decisions: list[ProbeDecision]) -> dict:
    """For each cheaper trigger: at how many probe points it agreed with the branch probe."""
    out = {}
    for name in ("gns", "norm"):
        pairs = [(d["verdicts"].get("branch"), d["verdicts"].get(name)) for d in decisions if "verdicts" in d]
        pairs = [(b, v) for b, v in pairs if b in ("raise", "stay") and v is not None]
        out[name] = {"points": len(pairs), "agree": sum(b == v for b, v in pairs)}
    return out
