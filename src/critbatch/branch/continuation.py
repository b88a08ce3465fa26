"""The part of a branch the parent run already trained (the free k = 1 branch).

A branch whose first steps are exactly the parent's — the same batch, micro-batches, stream slices,
LR and Adam hyperparameters at every step, everything else that decides a step equal — is, up to
where they part, the parent's own continuation. It starts from the parent's latest kept checkpoint
in that stretch, with the smoothed training loss it would have reached there, and trains only the
rest of its window: a k = 1 cooldown branch trains just its cooldown. Its numbers are those of the
branch trained whole (bit for bit on the same device and thread count; a test checks it).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ..config import TrainConfig, defining_dict
from ..errors import ConfigError
from ..io import read_jsonl
from ..model import dropout_probabilities
from ..schedules import BatchSchedule, schedule_of
from ..train import ema_update, resolved_lr_schedule, step_plan
from ..train.checkpoint import CheckpointInfo

if TYPE_CHECKING:
    from .plan import BranchPoint, SweepPlan


_STEP_FIELDS = ("total_tokens", "exact_total_tokens", "checkpoint_tokens", "eval_interval_tokens", "eval_seqs",
                "batch_schedule", "batch_seqs", "lr_ref_batch_seqs", "micro_batch_seqs", "lr_schedule")
"""Fields whose effect on training :func:`agreeing_steps` checks step by step (or that train nothing)."""


def _trained_the_same(a: TrainConfig, b: TrainConfig) -> bool:
    """Everything besides the step plans that decides a step's numbers is equal in both configs."""
    da, db = defining_dict(a), defining_dict(b)
    for d in (da, db):
        for f in _STEP_FIELDS:
            d.pop(f, None)
        for f in ("lr", "lr_rule", "adam_rule", "beta1", "beta2", "eps"):  # compared as each step's values
            d["optim"].pop(f, None)
        d["data"].pop("stream_shift_seqs", None)  # compared as each step's stream slices
    return da == db


def _resolved(cfg: TrainConfig) -> tuple[TrainConfig, BatchSchedule]:
    """``cfg`` with its LR schedule's ends resolved as the Trainer resolves them, and its batch schedule."""
    cfg = dataclasses.replace(cfg, lr_schedule=resolved_lr_schedule(cfg))
    return cfg, schedule_of(cfg)


def agreeing_steps(a: TrainConfig, b: TrainConfig, start_tokens: int, end_tokens: int, offset_seqs: int) -> list[int]:
    """Runs of ``a`` and ``b`` in the same state at ``start_tokens`` (stream at ``offset_seqs``):
    the step boundaries up to ``end_tokens`` that both reach by taking the same optimizer steps — the
    same batch, micro-batches, stream slices, LR and Adam hyperparameters at every step, with
    everything else that decides a step (model, optimizer, precision, data) equal. At each of them
    the state of one run is the other's, to float rounding (bit for bit on the same device and
    thread count). Empty when the first step already differs, and for a model with dropout (its
    random draws depend on where a run started)."""
    if not _trained_the_same(a, b) or dropout_probabilities(a.model):
        return []
    (a, sa), (b, sb) = _resolved(a), _resolved(b)
    t, off, T, out = start_tokens, offset_seqs, a.model.seq_len, []
    try:
        while t < end_tokens:
            pa, pb = step_plan(a, sa, t, off), step_plan(b, sb, t, off)
            if pa != pb or sa.adam_at(t, a.optim.beta1, a.optim.beta2, a.optim.eps) != \
                    sb.adam_at(t, b.optim.beta1, b.optim.beta2, b.optim.eps):
                break
            t, off = t + pa.batch_seqs * T, off + pa.batch_seqs
            out.append(t)
    except ConfigError:  # a batch the other's micro-batch cannot split: not the same steps
        pass
    return [x for x in out if x <= end_tokens]


def parent_continuation(plan: SweepPlan, point: BranchPoint, cfg: TrainConfig) -> tuple[CheckpointInfo, float] | None:
    """The latest kept checkpoint of the parent inside the branch's window up to which the branch
    (config ``cfg``, from ``point``) takes exactly the parent's steps, and the smoothed training loss
    the branch would have reached there (from the parent's logged step losses); ``None`` when there
    is none. The branch then starts there and trains only the rest of its window: a k = 1 branch
    with a cooldown trains just its cooldown, the rest being the parent's own continuation
    (replicate 0, and the parent's batch, micro-batch and LR up to the cooldown)."""
    end = point.tokens + plan.window_tokens
    reach = set(agreeing_steps(plan.parent, cfg, point.tokens, end - 1, point.ckpt.meta["offset_seqs"]))
    for c in sorted((c for c in plan.kept if c.tokens in reach), key=lambda c: -c.tokens):
        ema = parent_ema(plan, point.tokens, c.tokens)
        if ema is not None:
            return c, ema
    return None


def parent_ema(plan: SweepPlan, start: int, end: int) -> float | None:
    """The EMA of the parent's step losses over its steps in (start, end], as a branch from
    ``start`` computes it (``None`` when the parent's metrics.jsonl lacks one of them)."""
    if plan.parent_step_losses is None:
        plan.parent_step_losses = {}
        path = plan.run_dir / "metrics.jsonl"
        if path.is_file():
            for r in read_jsonl(path):
                if "train/loss" in r:
                    plan.parent_step_losses[int(r["tokens"])] = float(r["train/loss"])
    (_, sched), T = _resolved(plan.parent), plan.seq_len
    ema, t = None, start
    while t < end:
        t += sched.batch_seqs_at(t) * T
        loss = plan.parent_step_losses.get(t)
        if loss is None:
            return None
        ema = ema_update(ema, loss)
    return ema


def continuation_checkpoints(points: list[int], window_tokens: int, cooldown_fraction: float, step_tokens: int) -> list[int]:
    """The checkpoints a base run (one batch of ``step_tokens`` tokens, a plain schedule) keeps beside
    its branch points so that each point's k = 1 branch reads all but its cooldown from the run: the
    last step boundary before each cooldown starts (a point is rounded up to a step boundary, as the
    run keeps it; the step that starts at the cooldown's start still runs at the full LR)."""
    out = []
    for p in points:
        t = -(-p // step_tokens) * step_tokens
        c = last_step_before_cooldown(t, step_tokens, window_tokens, cooldown_fraction)
        if t < c < t + window_tokens:
            out.append(c)
    return sorted(set(out) - set(points))


def cooldown_tokens(window_tokens: int, cooldown_fraction: float) -> int:
    """Tokens of a branch window's final LR decay (a branch's ``lr_schedule.cooldown_tokens``)."""
    return int(round(cooldown_fraction * window_tokens))


def last_step_before_cooldown(start: int, step_tokens: int, window_tokens: int, cooldown_fraction: float) -> int:
    """For a branch from the step boundary ``start`` at steps of ``step_tokens``: the last step
    boundary up to which it runs at the full LR (the step that starts at the cooldown's start still
    does), and at least one step before the window's end."""
    cool = cooldown_tokens(window_tokens, cooldown_fraction)
    return start + min((window_tokens - cool) // step_tokens * step_tokens + step_tokens,
                       (window_tokens // step_tokens - 1) * step_tokens)


def continuation_tokens(plan: SweepPlan, point: BranchPoint, cfg: TrainConfig) -> int | None:
    """The last step boundary inside the branch's window up to which the branch takes the parent's
    steps (a kept checkpoint there would let it start there), or ``None``."""
    end = point.tokens + plan.window_tokens
    reach = agreeing_steps(plan.parent, cfg, point.tokens, end - 1, point.ckpt.meta["offset_seqs"])
    return reach[-1] if reach else None
