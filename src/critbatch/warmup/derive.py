"""``critbatch schedule``: a batch-size warmup derived from a sweep's CBS curve, written as
``schedule.json`` with its exports (the rule is :mod:`critbatch.analysis.schedule`'s)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..analysis.schedule import SOURCES, DerivedSchedule, advise_start, derive_schedule
from ..analysis.whole_run import DECAYS, whole_run_schedule
from ..config import ADAM_RULES, LR_RULES, check_choices, option
from ..errors import ConfigError, DataError
from ..io import check_output, write_json_atomic
from ..records import read_curve
from ..schedules.export import schedule_document


@dataclass
class ScheduleConfig:
    """Derive a warmup from a sweep."""

    sweep: str
    """The sweep directory (it holds cbs.json)."""
    out: str
    """The schedule.json to write."""
    start_seqs: int | None = None
    """B0 in sequences (default: the sweep's base batch)."""
    max_seqs: int | None = None
    """A cap on the batch."""
    granularity: int | None = None
    """Step to multiples of g (micro-batch × data-parallel ranks) instead of doublings."""
    safety: float = 1.0
    """Step up only when the bound reaches safety × the next batch."""
    source: str = option("measured", choices=SOURCES)
    """``measured``: step at measured points up to their lower bounds; ``fit``: also stay under the
    fitted curve (it can only delay a step); ``auto``: fit when there is one."""
    until_tokens: int | None = None
    """Derive thresholds up to this many tokens (default: 4 x the last point)."""
    lr_rule: str | None = option(None, choices=LR_RULES)
    """The LR rule of the phases (default: the sweep's)."""
    adam_rule: str | None = option(None, choices=ADAM_RULES)
    """How Adam's betas and eps follow the batch (default: the sweep's)."""
    target_seq_len: int | None = None
    """Hand the schedule to a run with sequences of this many tokens (measured on a proxy at another
    length): batches and thresholds keep their tokens."""
    target_granularity: int | None = None
    """Check that every phase's batch (in target sequences) is a multiple of this: the target's
    data-parallel ranks x micro-batch."""
    total_tokens: int | None = None
    """A schedule for the whole run of this many tokens, its LR decay included
    (:mod:`critbatch.analysis.whole_run`); ``None``: the warmup alone, to ``until_tokens``."""
    decay_tokens: int = 0
    """The run's final linear LR decay to 0, in tokens (with ``total_tokens``)."""
    decay: str = option("anneal", choices=DECAYS)
    """During the decay: ``anneal`` (the batch stays), ``seesaw`` (double the batch wherever the
    decaying LR has halved, the LR falling by 1/sqrt(2) instead; Meterez et al. 2025) or
    ``late-switch`` (the start batch until the decay, the warmup's final batch from there)."""
    decay_doublings: int = 2
    """``seesaw``: at most this many doublings (the decaying LR at 1/2, 1/4, ...)."""
    reach: float | None = None
    """With ``total_tokens``: a probe vouches for at most this many times its window of the run ahead,
    so no raise comes before total − decay − reach × window (a raise's cost keeps growing over the
    run still ahead; docs/method.md §7). ``None``: the measured envelope alone."""


def write_schedule(cfg: ScheduleConfig) -> tuple[dict, DerivedSchedule]:
    """Derive the schedule and write ``cfg.out``; returns (the document, the derivation)."""
    check_choices(cfg)
    cbs = Path(cfg.sweep) / "cbs.json"
    if not cbs.is_file():
        raise DataError(f"{cfg.sweep} is not a finished sweep directory (no cbs.json)")
    check_output(cfg.out, "--out", "file")
    curve = read_curve(cbs)
    if not curve["points"]:
        raise DataError(f"{cbs} is corrupt: it holds no branch points")
    start = cfg.start_seqs if cfg.start_seqs is not None else curve["points"][0]["base_batch_seqs"]
    rules = {"rule": cfg.lr_rule or curve["lr_rule"], "adam_rule": cfg.adam_rule or curve["adam_rule"]}
    shape = {"granularity": cfg.granularity, "safety": cfg.safety, "source": cfg.source}
    if cfg.total_tokens is not None:
        w = whole_run_schedule(curve, start, cfg.total_tokens, decay_tokens=cfg.decay_tokens, decay=cfg.decay,
                               reach=cfg.reach, decay_doublings=cfg.decay_doublings, max_seqs=cfg.max_seqs,
                               **rules, **shape)
        d, sched, notes = w.derived, w.schedule, w.notes
    else:
        if cfg.decay != "anneal" or cfg.decay_tokens or cfg.reach is not None:
            raise ConfigError("decay, decay_tokens and reach shape a schedule for the whole run: give total_tokens")
        d = derive_schedule(curve, start, max_seqs=cfg.max_seqs, until_tokens=cfg.until_tokens, **rules, **shape)
        sched, notes = d.schedule, list(d.notes)
    advice = advise_start(curve, start, until_tokens=cfg.total_tokens or cfg.until_tokens, **shape)
    if cfg.target_seq_len or cfg.target_granularity:
        sched = sched.rescaled(cfg.target_seq_len or sched.seq_len, cfg.target_granularity)
        if sched.seq_len != d.schedule.seq_len:
            notes.append(f"rescaled from {d.schedule.seq_len}-token to {sched.seq_len}-token sequences: batches and "
                         f"thresholds keep their tokens")
    doc = schedule_document(sched, notes=notes, derived_from={
        "sweep": str(Path(cfg.sweep)), "source": d.source, "safety": cfg.safety, "granularity": cfg.granularity,
        "start_seqs": start, "max_seqs": cfg.max_seqs, "decide_by": curve["decide_by"], "rule": curve["rule"],
        "allowed": d.allowed, "measured_seq_len": d.schedule.seq_len,
        "target_granularity": cfg.target_granularity, "total_tokens": cfg.total_tokens,
        "decay_tokens": cfg.decay_tokens, "decay": cfg.decay, "decay_doublings": cfg.decay_doublings,
        "reach": cfg.reach})
    doc["start_advice"] = {**dataclasses.asdict(advice), "message": advice.message()}
    write_json_atomic(cfg.out, doc)
    return doc, d
