"""Exports of a batch schedule to the trainers people already use, and their documented forms.

* OLMo-core ``BatchSizeSchedulerCallback`` (src/olmo_core/train/callbacks/batch_size_scheduler.py):
  fields ``batch_sizes`` (global batch sizes in *tokens*, the unit of OLMo-core's data loader) and
  ``schedule`` (``Duration`` values ``{"value": N, "unit": "tokens"}``); the first start is 0, starts
  increase, and each batch size is an integer multiple (or divisor) of the previous one. The callback
  rescales the LR by sqrt(new/old) itself, so it matches the ``sqrt`` rule only.
* Megatron-LM ``--step-batch-size-schedule "T0:BS0 T1:BS1 ..."``: thresholds in tokens (with
  ``--seq-length``; suffixes K/M/B/T = 1e3/1e6/1e9/1e12), batch sizes in samples (sequences), first
  threshold 0. Megatron does not rescale the LR; the multipliers are in ``schedule.json``. It needs a
  Megatron-LM whose calculator has this flag (megatron-core 0.18+), and ``--global-batch-size`` must
  not be given with it (Megatron raises an error).
* Megatron-LM ``--rampup-batch-size START INCR SAMPLES`` (with ``--global-batch-size FINAL``), the
  linear ramp every Megatron version has: the batch is START + INCR·floor(s / (SAMPLES / n)) after s
  consumed samples, n = (FINAL − START) / INCR increments, then FINAL. A schedule is expressible by
  it exactly when its batch grows by the same increment at every phase and its thresholds (in
  samples) are 1, 2, ..., n times the first one: one doubling always is; two doublings never are
  (increments B and 2B); :func:`to_megatron_rampup` says why not when it cannot.
"""

from __future__ import annotations

import re

from ..errors import ConfigError
from .batch import BatchSchedule


def to_olmo_core(s: BatchSchedule) -> dict:
    check_integer_factors(s, "OLMo-core's BatchSizeSchedulerCallback")
    return {"batch_sizes": [b * s.seq_len for _, b in s.phases],
            "schedule": [{"value": t, "unit": "tokens"} for t, _ in s.phases]}


def check_integer_factors(s: BatchSchedule, who: str) -> None:
    for (_, a), (t, b) in zip(s.phases, s.phases[1:]):
        if (b > a and b % a) or (b < a and a % b) or a == b:
            raise ConfigError(f"{who} needs each batch size to be an integer multiple of the previous one: "
                              f"{a} -> {b} at {t} tokens is not (use doublings instead of --granularity)")


def validate_olmo_core(d: dict, seq_len: int) -> list[tuple[int, int]]:
    """Check an export against the callback's documented constraints; returns (tokens, batch_seqs)."""
    if set(d) != {"batch_sizes", "schedule"}:
        raise ValueError(f"fields {sorted(d)} != ['batch_sizes', 'schedule']")
    bs, sch = d["batch_sizes"], d["schedule"]
    if len(bs) != len(sch) or not bs:
        raise ValueError("batch_sizes and schedule must have the same, non-zero length")
    if {x["unit"] for x in sch} != {"tokens"} or any(set(x) != {"value", "unit"} for x in sch):
        raise ValueError("every schedule entry must be a Duration {'value', 'unit': 'tokens'}")
    if sch[0]["value"] != 0:
        raise ValueError("batch size schedule must start at 0")
    for (a, sa), (b, sb) in zip(zip(bs, sch), zip(bs[1:], sch[1:])):
        if sb["value"] <= sa["value"]:
            raise ValueError("events must increase")
        if (b > a and b % a) or (b < a and a % b) or a == b:
            raise ValueError("batch size can only change by an integer factor")
    if any(b % seq_len for b in bs):
        raise ValueError("batch sizes (tokens) must be whole sequences")
    return [(x["value"], b // seq_len) for x, b in zip(sch, bs)]


def _fmt_tokens(t: int) -> str:
    for div, suf in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if t and t % div == 0:
            return f"{t // div}{suf}"
    return str(t)


def to_megatron(s: BatchSchedule) -> str:
    return " ".join(f"{_fmt_tokens(t)}:{b}" for t, b in s.phases)


def to_megatron_rampup(s: BatchSchedule) -> tuple[str | None, str]:
    """(``--rampup-batch-size START INCR SAMPLES --global-batch-size FINAL``, or ``None``; the reason)."""
    phases = s.phases
    if len(phases) < 2:
        return None, "a single batch needs no ramp-up: pass --global-batch-size"
    steps = [b - a for (_, a), (_, b) in zip(phases, phases[1:])]
    if any(d <= 0 for d in steps) or len(set(steps)) > 1:
        return None, (f"Megatron's ramp-up adds the same increment at every step; this schedule adds "
                      f"{', '.join(map(str, steps))} sequences (two or more doublings cannot be expressed)")
    if any(t % s.seq_len for t, _ in phases):
        return None, f"thresholds must be whole samples of {s.seq_len} tokens"
    first = phases[1][0] // s.seq_len
    starts = [t // s.seq_len for t, _ in phases[1:]]
    if starts != [first * (j + 1) for j in range(len(starts))]:
        return None, (f"Megatron's ramp-up steps at equal intervals; this schedule steps at samples "
                      f"{', '.join(map(str, starts))}")
    n = len(steps)
    return (f"--rampup-batch-size {phases[0][1]} {steps[0]} {first * n} --global-batch-size {phases[-1][1]}",
            f"{n} increment(s) of {steps[0]} sequences every {first:,} samples")


_MEGATRON_RE = re.compile(r"^0:\d+( \d+[KMBT]?:\d+)*$")
_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def parse_megatron(text: str) -> list[tuple[int, int]]:
    """Parse ``"0:768 250B:1536"`` into [(tokens, samples)] by the documented grammar."""
    if not _MEGATRON_RE.match(text):
        raise ValueError(f"{text!r} is not 'T0:BS0 T1:BS1 ...' with T0 = 0")
    out = []
    for item in text.split(" "):
        t, b = item.split(":")
        m = re.match(r"^(\d+)([KMBT]?)$", t)
        out.append((int(m.group(1)) * _SUFFIX[m.group(2)], int(b)))
    if any(b2[0] <= b1[0] for b1, b2 in zip(out, out[1:])):
        raise ValueError("thresholds must increase")
    return out


def schedule_document(s: BatchSchedule, *, derived_from: dict | None = None, notes: list[str] | None = None) -> dict:
    """The content of ``schedule.json``: phases with thresholds in tokens, batches in sequences and
    tokens, LR multipliers and the rule, plus the exports."""
    doc = s.to_dict()
    exports: dict = {"megatron_step_batch_size_schedule": to_megatron(s)}
    try:
        exports["olmo_core_batch_size_scheduler"] = to_olmo_core(s)
        if s.rule != "sqrt":
            exports["olmo_core_note"] = f"OLMo-core rescales the LR by sqrt; this schedule's rule is {s.rule}"
    except ConfigError as e:
        exports["olmo_core_batch_size_scheduler"] = None
        exports["olmo_core_note"] = str(e)
    exports["megatron_note"] = ("pass with --seq-length " + str(s.seq_len) + " and without --global-batch-size (Megatron "
                                "refuses both); needs a Megatron-LM with --step-batch-size-schedule (megatron-core 0.18+); "
                                "Megatron does not rescale the LR: apply lr_multiplier per phase yourself")
    rampup, why = to_megatron_rampup(s)
    exports["megatron_rampup_batch_size"] = rampup
    exports["megatron_rampup_note"] = why
    doc["exports"] = exports
    if derived_from is not None:
        doc["derived_from"] = derived_from
    doc["notes"] = notes or []
    return doc
