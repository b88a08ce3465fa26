"""A pure, piecewise-constant batch schedule over tokens, usable from any PyTorch loop.

``BatchSchedule`` maps a token count to the global batch (sequences and tokens), the LR multiplier
given by the coupling rule, and the accumulation steps for a micro-batch and world size. A phase
applies from the first optimizer step that *starts* at or after its threshold: thresholds are in
tokens, steps are derived. The trainer uses this same object, so a plain loop driven by it
reproduces the trainer's batch and LR.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path

from ..config import ADAM_RULES, LR_RULES
from ..errors import ConfigError
from ..units import parse_count
from .rules import adam_hparams, lr_rule_multiplier


@dataclass(frozen=True)
class BatchSchedule:
    phases: tuple[tuple[int, int], ...]
    """``((start_tokens, batch_seqs), ...)``: first start 0, starts strictly increasing."""
    seq_len: int
    """Tokens per sequence (batch_tokens = batch_seqs * seq_len)."""
    rule: str = "sqrt"
    """LR–batch coupling: ``sqrt``, ``linear`` or ``none``."""
    ref_batch_seqs: int | None = None
    """Batch at which the LR multiplier is 1; ``None`` means the first phase's batch."""
    adam_rule: str = "none"
    """How Adam's betas and epsilon follow the batch: ``none``, ``sde`` or ``sde-beta2``
    (:func:`critbatch.optim.adam_hparams`)."""

    def __post_init__(self):
        phases = tuple((int(s), int(b)) for s, b in self.phases)
        object.__setattr__(self, "phases", phases)
        if not phases:
            raise ConfigError("batch schedule is empty; give at least one phase such as {0: 32}")
        if phases[0][0] != 0:
            raise ConfigError(f"batch schedule must start at 0 tokens, not {phases[0][0]}")
        for i, (s, b) in enumerate(phases):
            if b <= 0:
                raise ConfigError(f"batch schedule phase {i} (at {s} tokens) has batch {b}; it must be positive")
            if i and s <= phases[i - 1][0]:
                raise ConfigError(f"batch schedule is not increasing in tokens: phase {i} starts at {s} "
                                  f"after phase {i - 1} at {phases[i - 1][0]}")
        if self.seq_len <= 0:
            raise ConfigError(f"seq_len={self.seq_len} must be positive")
        if self.rule not in LR_RULES:
            raise ConfigError(f"LR rule {self.rule!r} is not one of {', '.join(LR_RULES)}")
        if self.adam_rule not in ADAM_RULES:
            raise ConfigError(f"adam rule {self.adam_rule!r} is not one of {', '.join(ADAM_RULES)}")
        if self.ref_batch_seqs is not None and self.ref_batch_seqs <= 0:
            raise ConfigError(f"ref_batch_seqs={self.ref_batch_seqs} must be positive")

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def constant(cls, batch_seqs: int, seq_len: int, rule: str = "sqrt", ref_batch_seqs: int | None = None,
                 adam_rule: str = "none"):
        return cls(((0, batch_seqs),), seq_len, rule, ref_batch_seqs, adam_rule)

    @classmethod
    def parse(cls, spec, seq_len: int, rule: str = "sqrt", ref_batch_seqs: int | None = None,
              adam_rule: str | None = None) -> "BatchSchedule":
        """From ``"0:32,50M:64"``, ``{"0": 32, "50M": 64}``, ``[[0, 32], [5e7, 64]]``, a path to a
        JSON file holding one of those, or a ``schedule.json`` with ``phases`` (whose ``rule``,
        ``ref_batch_seqs`` and ``adam_rule`` are then used unless given here)."""
        if isinstance(spec, (str, Path)) and Path(str(spec)).suffix == ".json":
            p = Path(str(spec))
            if not p.is_file():
                raise ConfigError(f"batch schedule file {str(p)!r} does not exist")
            try:
                spec = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"batch schedule file {str(p)!r} is not valid JSON: {e}") from None
        if isinstance(spec, dict) and "phases" in spec:
            file_rule, file_ref = spec.get("rule"), spec.get("ref_batch_seqs")
            phases = [(parse_count(ph["start_tokens"], "start_tokens"), parse_count(ph["batch_seqs"], "batch_seqs"))
                      for ph in spec["phases"]]
            if spec.get("seq_len") not in (None, seq_len):
                raise ConfigError(f"batch schedule was made for seq_len {spec['seq_len']}, the model has {seq_len}")
            return cls(tuple(phases), seq_len, file_rule or rule, ref_batch_seqs or file_ref,
                       adam_rule or spec.get("adam_rule") or "none")
        if isinstance(spec, dict):
            items = list(spec.items())
        elif isinstance(spec, (list, tuple)):
            items = [tuple(x) for x in spec]
        elif isinstance(spec, str):
            items = []
            for part in spec.split(","):
                if ":" not in part:
                    raise ConfigError(f"batch schedule entry {part!r} is not START_TOKENS:BATCH_SEQS (e.g. 0:32,50M:64)")
                a, b = part.split(":", 1)
                items.append((a, b))
        else:
            raise ConfigError(f"batch schedule {spec!r} is not a mapping, list or string")
        phases = [(parse_count(s, "batch schedule start"), parse_count(b, "batch schedule batch")) for s, b in items]
        return cls(tuple(phases), seq_len, rule, ref_batch_seqs, adam_rule or "none")

    # ---- queries --------------------------------------------------------------------------
    @property
    def reference(self) -> int:
        return self.ref_batch_seqs or self.phases[0][1]

    def phase_index_at(self, tokens: int) -> int:
        return bisect_right([s for s, _ in self.phases], tokens) - 1

    def batch_seqs_at(self, tokens: int) -> int:
        """Global batch (sequences) of the step that starts after ``tokens`` tokens."""
        return self.phases[self.phase_index_at(tokens)][1]

    def batch_tokens_at(self, tokens: int) -> int:
        return self.batch_seqs_at(tokens) * self.seq_len

    def lr_multiplier_at(self, tokens: int) -> float:
        """rule(B_t / B_ref): multiplies the base LR; the LR schedule's shape is untouched."""
        return lr_rule_multiplier(self.rule, self.batch_seqs_at(tokens), self.reference)

    def lr_multiplier_for(self, batch_seqs: int) -> float:
        """rule(batch / reference) for any batch (a trainer that sets the batch itself)."""
        return lr_rule_multiplier(self.rule, batch_seqs, self.reference)

    def rescaled(self, seq_len: int, granularity: int | None = None) -> "BatchSchedule":
        """The same schedule in tokens for sequences of ``seq_len`` (a schedule measured on a proxy,
        handed to the target run): every phase keeps its batch in tokens and its threshold, rounded
        up to whole target sequences. Each batch must be a whole number of target sequences and, with
        ``granularity`` (data-parallel ranks x micro-batch), a multiple of it."""
        if seq_len <= 0:
            raise ConfigError(f"target sequence length {seq_len} must be positive")
        phases = []
        for i, (t, b) in enumerate(self.phases):
            tokens = b * self.seq_len
            if tokens % seq_len:
                raise ConfigError(f"phase {i}'s batch of {tokens:,} tokens is not a whole number of {seq_len}-token "
                                  f"sequences")
            nb = tokens // seq_len
            if granularity and nb % granularity:
                raise ConfigError(f"phase {i}'s batch of {nb} target sequences (from {t:,} tokens) is not a multiple of "
                                  f"the granularity {granularity} (data-parallel ranks x micro-batch)")
            phases.append((-(-t // seq_len) * seq_len, nb))
        ref = self.reference * self.seq_len
        if ref % seq_len:
            raise ConfigError(f"the reference batch of {ref:,} tokens is not a whole number of {seq_len}-token sequences")
        return BatchSchedule(tuple(phases), seq_len, self.rule, ref // seq_len, self.adam_rule)

    def adam_at(self, tokens: int, beta1: float, beta2: float, eps: float) -> tuple[float, float, float]:
        """Adam's (beta1, beta2, eps) for the step after ``tokens`` under ``adam_rule``, given their
        values at the reference batch."""
        return adam_hparams(self.adam_rule, self.batch_seqs_at(tokens), self.reference, beta1, beta2, eps)

    def check_adam(self, beta1: float, beta2: float, eps: float) -> None:
        """Raise (naming the batch) if the Adam rule is invalid at any phase."""
        for s, _ in self.phases:
            self.adam_at(s, beta1, beta2, eps)

    def accum_steps_at(self, tokens: int, micro_batch_seqs: int, world_size: int = 1) -> int:
        b = self.batch_seqs_at(tokens)
        per = micro_batch_seqs * world_size
        if b % per:
            raise ConfigError(f"batch {b} sequences (phase {self.phase_index_at(tokens)}, from {self.phases[self.phase_index_at(tokens)][0]} "
                              f"tokens) is not divisible by micro-batch {micro_batch_seqs} x world size {world_size}")
        return b // per

    def check_divisible(self, micro_batch_seqs: int | None, world_size: int = 1) -> None:
        """Raise, naming the phase, if any phase's batch cannot be split into micro-batches x ranks."""
        for i, (s, b) in enumerate(self.phases):
            m = micro_batch_seqs if micro_batch_seqs is not None else b // world_size
            if m <= 0 or b % (m * world_size):
                raise ConfigError(f"batch {b} sequences of phase {i} (from {s} tokens) is not divisible by "
                                  f"micro-batch {micro_batch_seqs if micro_batch_seqs is not None else '(whole batch)'} x world size {world_size}")

    def micro_batch_at(self, tokens: int, micro_batch_seqs: int | None, world_size: int = 1) -> int:
        """Micro-batch per rank; ``None`` means the whole per-rank batch."""
        return micro_batch_seqs if micro_batch_seqs is not None else self.batch_seqs_at(tokens) // world_size

    def walk(self, start_tokens: int, end_tokens: int) -> tuple[int, int]:
        """(steps, tokens reached) going from the step boundary ``start_tokens`` to the first step
        boundary at or after ``end_tokens``; each step uses the batch of the phase it starts in."""
        t, n = start_tokens, 0
        while t < end_tokens:
            i = self.phase_index_at(t)
            bt = self.phases[i][1] * self.seq_len
            stop = min(end_tokens, self.phases[i + 1][0]) if i + 1 < len(self.phases) else end_tokens
            k = max(1, -(-(stop - t) // bt))  # whole steps that start inside this phase
            t += k * bt
            n += k
        return n, t

    def steps_between(self, start_tokens: int, end_tokens: int) -> int:
        """Optimizer steps from ``start_tokens`` to the first step boundary at or after ``end_tokens``."""
        return self.walk(start_tokens, end_tokens)[0]

    # ---- export -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "rule": self.rule,
            "seq_len": self.seq_len,
            "ref_batch_seqs": self.reference,
            "adam_rule": self.adam_rule,
            "phases": [{"start_tokens": s, "batch_seqs": b, "batch_tokens": b * self.seq_len,
                        "lr_multiplier": self.lr_multiplier_at(s)} for s, b in self.phases],
        }

    def as_pairs(self) -> list[list[int]]:
        return [[s, b] for s, b in self.phases]


def schedule_of(cfg) -> BatchSchedule:
    """The batch schedule a :class:`critbatch.config.TrainConfig` trains: its ``batch_schedule``
    (or one phase of ``batch_seqs``), its sequence length, LR rule, reference batch and Adam rule.
    The one place a config's schedule is derived (the trainer, a branch's step check, the closed loop)."""
    phases = cfg.batch_schedule if cfg.batch_schedule is not None else [[0, cfg.batch_seqs]]
    return BatchSchedule.parse(phases, cfg.model.seq_len, cfg.optim.lr_rule,
                               cfg.lr_ref_batch_seqs, cfg.optim.adam_rule)

