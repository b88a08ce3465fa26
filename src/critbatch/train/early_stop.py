"""Stopping a branch whose verdict is already settled (issue 15: "stop spending on settled questions").

Every branch of a point reads the same sequences from the same stream offset, so over a stretch of
tokens where both a branch (batch k·B) and the point's reference branch (the smallest k) end a
step, the mean training loss of the two on exactly those sequences is a *paired* reading of their
gap. :class:`GapReading` collects these span differences from ``from_tokens`` on (the cooldown's
start: before it, at a constant LR, the larger batch sits lower on its noise floor and reads
*ahead* — docs/LOG.md, the early-stop entry); once at least ``min_spans`` are in, and their mean
minus ``z`` standard errors exceeds ``gap`` (well above the decision's ε), the branch is worse than
the reference by far more than ε, and :class:`EarlyStop` pauses it: a resume checkpoint is written
(a sweep without early stopping continues the same branch to its window's end) and
``stopped.json`` holds the reading. Through the cooldown the larger batch's gap grows as the
reference anneals its noise away, so a reading part-way through tends to be below the gap at the
window's end: a stop errs towards training on.

The rule lives in the job directory's ``stop_rule.json`` (written by the sweep, read by
:func:`critbatch.launch.run_job`), so that a branch shared by sweeps with and without early stopping
stays one content-addressed branch.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..dist import barrier
from ..errors import ConfigError
from ..io import read_json, read_jsonl, write_json_atomic
from .callbacks import Callback

STOP_RULE_FILE = "stop_rule.json"
STOPPED_FILE = "stopped.json"
RULE_KEYS = ("gap", "z", "min_spans", "from_tokens", "reference_branch")
"""What decides a stop; a ``stopped.json`` counts for a rule only when these agree."""


def step_records(records: list[dict]) -> list[tuple[int, float, int]]:
    """(tokens at the step's end, mean training loss, batch tokens) of every trained step in a
    metrics.jsonl's records."""
    return [(int(r["tokens"]), float(r["train/loss"]), int(r["train/batch_tokens"])) for r in records
            if "train/loss" in r and "train/batch_tokens" in r and not r.get("train/diverged")]


class GapReading:
    """The paired gap of a branch to its reference over spans that both end on a step boundary
    (pure: fed step by step).

    ``reference``: the reference's steps, (end tokens, mean loss, batch tokens). A span runs
    between two token counts at or after ``from_tokens`` where both runs end a step; its
    difference is (branch's mean loss − the reference's) over the span's tokens, each run's steps
    weighted by their tokens."""

    def __init__(self, reference: list, from_tokens: int):
        self.from_tokens = int(from_tokens)
        self.ref_cum: dict[int, float] = {}
        """Token-weighted loss sum of the reference's steps up to each of its step boundaries."""
        steps = sorted((int(e), float(v), int(b)) for e, v, b in reference)
        acc = 0.0
        if steps:
            self.ref_cum[steps[0][0] - steps[0][2]] = 0.0
        for end, loss, bt in steps:
            acc += loss * bt
            self.ref_cum[end] = acc
        self.anchor: int | None = None
        """The last boundary both runs share at or after ``from_tokens``; ``None`` before the first."""
        self.acc = 0.0
        self.diffs: list[float] = []

    def add(self, end_tokens: int, loss: float, batch_tokens: int) -> None:
        """One step of the branch, ending at ``end_tokens``."""
        start = end_tokens - batch_tokens
        if self.anchor is None:
            if start >= self.from_tokens and start in self.ref_cum:
                self.anchor = start
            else:
                if end_tokens >= self.from_tokens and end_tokens in self.ref_cum:
                    self.anchor = end_tokens
                return
        self.acc += loss * batch_tokens
        if end_tokens in self.ref_cum:
            n = end_tokens - self.anchor
            self.diffs.append(self.acc / n - (self.ref_cum[end_tokens] - self.ref_cum[self.anchor]) / n)
            self.anchor, self.acc = end_tokens, 0.0

    def reading(self) -> tuple[float | None, float | None, int]:
        """(mean span difference, its standard error, number of spans); ``None`` below two spans."""
        n = len(self.diffs)
        if n < 2:
            return None, None, n
        m = sum(self.diffs) / n
        sd = math.sqrt(sum((d - m) ** 2 for d in self.diffs) / (n - 1))
        return m, sd / math.sqrt(n), n

    def settled(self, gap: float, z: float, min_spans: int) -> bool:
        """The branch is worse than the reference by more than ``gap`` at ``z`` standard errors."""
        m, se, n = self.reading()
        return m is not None and n >= min_spans and m - z * se > gap


class EarlyStop(Callback):
    """Pause the run once :class:`GapReading` settles that it is worse than its reference by more
    than the rule's gap; write ``stopped.json`` (main rank). Every rank sees the same all-reduced
    losses, so every rank stops at the same step."""

    name = "early_stop"

    def __init__(self, rule: dict):
        missing = [k for k in (*RULE_KEYS, "reference") if k not in rule]
        if missing:
            raise ConfigError(f"{STOP_RULE_FILE} lacks {', '.join(missing)}; the sweep writes it (--early-stop-gap)")
        self.rule = rule
        self.stopped = False

    def _check(self, trainer) -> None:
        r = self.rule
        if not self.stopped and self.reading.settled(r["gap"], r["z"], r["min_spans"]):
            self.stopped = True
            m, se, n = self.reading.reading()
            trainer.request_pause(f"early stop: gap {m:+.4f} ± {se:.4f} over {n} spans exceeds {r['gap']:g}")

    def on_train_start(self, trainer) -> None:
        self.reading = GapReading(self.rule["reference"], self.rule["from_tokens"])
        barrier(trainer.dist)  # the main rank has cut metrics.jsonl back to the checkpoint (MetricsLog runs first)
        if trainer.out_dir is not None and (trainer.out_dir / "metrics.jsonl").is_file():
            # a resumed branch: the steps it trained before its checkpoint
            for end, loss, bt in step_records(read_jsonl(trainer.out_dir / "metrics.jsonl")):
                if end <= trainer.tokens:
                    self.reading.add(end, loss, bt)
        self._check(trainer)

    def on_step_end(self, trainer, record: dict) -> None:
        self.reading.add(int(record["tokens"]), float(record["train/loss"]), int(record["train/batch_tokens"]))
        self._check(trainer)

    def on_pause(self, trainer) -> None:
        if not self.stopped or trainer.out_dir is None or not trainer.dist.is_main:
            return
        m, se, n = self.reading.reading()
        s = trainer.state
        write_json_atomic(trainer.out_dir / STOPPED_FILE, {
            **{k: self.rule[k] for k in RULE_KEYS}, "tokens": trainer.tokens, "start_tokens": s.start_tokens,
            "steps": s.step - s.start_step, "wall_time_s": s.elapsed_s, "gap_mean": m, "gap_se": se,
            "spans": n})


def stopped_reading(job_dir: Path, rule: dict | None = None) -> dict | None:
    """The job's ``stopped.json`` when it has no result and (given ``rule``) that rule stopped it."""
    d = Path(job_dir)
    if (d / "result.json").is_file() or not (d / STOPPED_FILE).is_file():
        return None
    s = read_json(d / STOPPED_FILE)
    if rule is not None and any(s.get(k) != rule[k] for k in RULE_KEYS):
        return None
    return s
