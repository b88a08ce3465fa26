"""A batch schedule for the whole run, decay included (issue 22): the warmup of
:func:`critbatch.analysis.schedule.derive_schedule` over the stable phase, raises judged against the
run still ahead, and one of three rules for the final LR decay.

**Raises judged by the run ahead (``reach``).** A probe measures what a larger batch costs over its
window; a raise costs that over every token left in the run, and the cost of a raise keeps growing
while the batch is large (docs/method.md §7: a raise that read +0.0065 over a window of 0.25× its
point ended 0.021 behind after the anneal; the same raise a million tokens later ended level). With
``reach`` R a probe vouches for at most R × its window of the run ahead: no raise before
``total − decay − R × window`` tokens (a raise the measurements allowed earlier is taken there).
``None``: no such limit (the measured envelope alone).

**The LR decay** (the last ``decay_tokens`` of the run, a linear decay to 0):

- ``anneal``: the batch stays where the warmup left it (the paper's anneal at the final batch);
- ``seesaw`` (Meterez et al. 2025, arXiv 2510.14717): wherever the decaying LR has halved since the
  decay began, double the batch instead of taking all of the cut: with the sqrt rule the LR then
  falls by 1/√2 per halving and the batch grows by 2, Seesaw's α = √β. Up to ``decay_doublings``
  doublings (the base LR at 1/2, 1/4, ...) and ``max_seqs``. Their guard α ≥ √β (the LR cut at
  least the square root of the batch growth) holds for the ``sqrt`` and ``none`` rules; ``linear``
  would raise the LR as the batch grows and is refused;
- ``late-switch`` (Fast Catch-Up, Late Switching, arXiv 2602.14208: after a switch the loss quickly
  rejoins the large batch's trajectory, so switch late): the start batch through the stable phase,
  and the warmup's final batch from the decay's start.

Pure functions: numbers in, phases out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..schedules.batch import BatchSchedule
from .schedule import DerivedSchedule, derive_schedule

DECAYS = ("anneal", "seesaw", "late-switch")


@dataclass
class WholeRun:
    """A whole-run schedule: the derivation of its stable phase and the phases of its decay."""

    derived: DerivedSchedule
    schedule: BatchSchedule
    """The whole run's phases (the warmup's, then the decay's)."""
    total_tokens: int
    decay_tokens: int
    decay: str
    reach: float | None
    not_before: int
    """No raise before this many tokens (``reach``); 0 without it."""
    notes: list[str] = field(default_factory=list)


def seesaw_phases(batch: int, decay_start: int, decay_tokens: int, seq_len: int, doublings: int,
                  max_seqs: int | None = None) -> list[tuple[int, int]]:
    """(tokens, batch) of Seesaw's doublings over a linear decay to 0 that starts at ``decay_start``:
    the base LR has halved j times at ``decay_start + decay_tokens·(1 − 2^-j)``; each threshold is
    rounded up to whole sequences."""
    out, b = [], batch
    for j in range(1, doublings + 1):
        if max_seqs is not None and 2 * b > max_seqs:
            break
        b *= 2
        out.append((int(math.ceil((decay_start + decay_tokens * (1 - 2.0 ** -j)) / seq_len)) * seq_len, b))
    return out


def whole_run_schedule(curve: dict, start_seqs: int, total_tokens: int, *, decay_tokens: int = 0,
                       decay: str = "anneal", reach: float | None = None, decay_doublings: int = 2,
                       max_seqs: int | None = None, rule: str = "sqrt", adam_rule: str = "none",
                       not_before: int = 0, **derive) -> WholeRun:
    """The schedule of a run of ``total_tokens`` whose last ``decay_tokens`` decay the LR to 0 (see
    the module docstring); ``not_before``: no raise before this many tokens in any case (a confirming
    probe that failed moves the first doubling on); ``derive``: the other options of
    :func:`derive_schedule`."""
    if decay not in DECAYS:
        raise ConfigError(f"decay={decay!r} is not one of {', '.join(DECAYS)}")
    if not (isinstance(total_tokens, int) and total_tokens > 0):
        raise ConfigError(f"total_tokens={total_tokens!r} must be a positive number of tokens")
    if not 0 <= decay_tokens < total_tokens:
        raise ConfigError(f"decay_tokens={decay_tokens} must be in [0, total_tokens={total_tokens})")
    if decay != "anneal" and decay_tokens == 0:
        raise ConfigError(f"decay={decay} needs the LR decay's length (decay_tokens > 0)")
    if reach is not None and not (math.isfinite(reach) and reach > 0):
        raise ConfigError(f"reach={reach} must be a number > 0 (or unset)")
    if decay == "seesaw" and rule == "linear":
        raise ConfigError("decay=seesaw with the linear LR rule would raise the LR as the batch grows: Seesaw needs the "
                          "LR cut at least the square root of the batch growth (alpha >= sqrt(beta)); use --lr-rule sqrt")
    if decay_doublings < 0:
        raise ConfigError(f"decay_doublings={decay_doublings} must be >= 0")
    T = curve["seq_len"]
    stable_end = total_tokens - decay_tokens
    window = curve.get("window_tokens")
    if reach is not None and not window:
        raise ConfigError("reach needs the sweep's probe window (window_tokens in cbs.json)")
    by_reach = max(0, int(stable_end - reach * window)) if reach is not None else 0
    not_before = max(by_reach, int(not_before))
    d = derive_schedule(curve, start_seqs, max_seqs=max_seqs, rule=rule, adam_rule=adam_rule, until_tokens=stable_end,
                        not_before=not_before, **derive)
    phases = [p for p in d.schedule.phases if p[0] < stable_end]
    notes = list(d.notes)
    if by_reach:
        notes.append(f"reach {reach:g}: a probe of {window:,} tokens vouches for {reach * window:,.0f} tokens of the run "
                     f"ahead, so no raise before {not_before:,} tokens")
    if decay == "seesaw":
        extra = seesaw_phases(phases[-1][1], stable_end, decay_tokens, T, decay_doublings, max_seqs)
        phases += extra
        notes.append(f"seesaw: the batch doubles where the decaying LR has halved ({len(extra)} doubling"
                     f"{'s' if len(extra) != 1 else ''} in the last {decay_tokens:,} tokens), the LR then "
                     f"falling by 1/sqrt(2) per halving")
    elif decay == "late-switch" and len(phases) > 1:
        final = phases[-1][1]
        phases = [phases[0], (int(math.ceil(stable_end / T)) * T, final)]
        notes.append(f"late switch: {start_seqs} sequences through the stable phase, {final} from the decay's start "
                     f"at {stable_end:,} tokens")
    sched = BatchSchedule(tuple(phases), T, rule, start_seqs, adam_rule)
    return WholeRun(d, sched, total_tokens, decay_tokens, decay, reach, not_before, notes)
