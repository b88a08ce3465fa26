"""One branch: what defines it (:class:`BranchSpec`, its ``branch.json``) and its job directory.

A branch at multiplier k from a branch point trains batch k·B with base LR f(k)·η (the parent's B
and η there), continues the parent's LR schedule in tokens, reads the parent's stream from the
point's offset (replicate r: r windows ahead) and ends its window with the sweep's cooldown. Its id
hashes everything that decides its numbers, so sweeps that share a branch train it once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..config import TrainConfig, config_hash, defining_dict, from_dict, merge, to_dict
from ..errors import DataError
from ..io import read_json, write_json_atomic
from ..launch import write_job
from ..schedules.rules import lr_rule_multiplier
from .continuation import cooldown_tokens, last_step_before_cooldown, parent_continuation
from .plan import BranchPoint, SweepPlan, round_k

BRANCH_FORMAT = 1


@dataclass
class BranchSpec:
    """``branch.json``: everything that defines one branch, with the TrainConfig it trains."""

    id: str
    """``tok_<point>_k<k>_r<replicate>_<hash of what defines it>``."""
    k: float
    replicate: int
    point_tokens: int
    base_batch_seqs: int
    """The parent's batch B at the point."""
    batch_seqs: int
    """k·B."""
    lr_multiplier: float
    """f(k) of the sweep's LR rule."""
    base_lr: float
    """The parent's LR η at the point, before f(k)."""
    window_tokens: int
    stream_start_seqs: int
    stream_end_seqs: int
    ckpt: str
    """The checkpoint it starts from, relative to the parent run: the point's, or a later kept one of
    the parent when its first steps are the parent's own (:mod:`critbatch.branch.continuation`)."""
    from_parent_tokens: int = 0
    """Tokens of its window read from the parent's continuation instead of trained."""
    init_loss_ema: float | None = None
    """The smoothed training loss it starts with when it starts inside its window."""
    parent_hash: str = ""
    config: dict = dataclasses.field(default_factory=dict)
    """The branch's resolved TrainConfig as a dict (:meth:`train_config` builds the object)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, what: str = "branch.json") -> "BranchSpec":
        """From ``branch.json``'s content; a damaged one is a DataError naming ``what`` and what it lacks."""
        if not isinstance(d, dict):
            raise DataError(f"{what} is damaged: it holds a {type(d).__name__}, not a JSON object")
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in d]
        if missing:
            raise DataError(f"{what} is damaged: it has no {missing[0]!r}")
        spec = cls(**{f.name: d[f.name] for f in fields if f.name in d})
        if not isinstance(spec.config, dict) or not isinstance(spec.config.get("model"), dict):
            raise DataError(f"{what} is damaged: its config is not a TrainConfig")
        return spec

    @classmethod
    def read(cls, branch_dir: str | Path) -> "BranchSpec":
        p = Path(branch_dir) / "branch.json"
        return cls.from_dict(read_json(p), str(p))

    def train_config(self) -> TrainConfig:
        return from_dict(TrainConfig, self.config)

    @property
    def parent_steps(self) -> int:
        """Optimizer steps of its window the parent trained for it."""
        return self.from_parent_tokens // (self.batch_seqs * self.config["model"]["seq_len"])


def micro_for(batch: int, micro: int | None) -> int | None:
    """The micro-batch a branch of ``batch`` sequences runs: the requested one when it divides the
    batch (or the whole batch when it is larger), else its largest divisor below it."""
    if micro is None or batch % micro == 0:
        return micro if micro is None or micro <= batch else batch
    return max(d for d in range(1, min(micro, batch) + 1) if batch % d == 0)


def branch_config(plan: SweepPlan, point: BranchPoint, k: float, replicate: int) -> TrainConfig:
    """The TrainConfig of the branch at ``k`` (replicate ``replicate``) from ``point``: the parent's,
    with batch k·B and its LR and Adam hyperparameters, the window's end and cooldown, and the
    replicate's stream shift.

    With the parent's own LR and Adam rules, the branch takes them as the parent would at k·B: the
    parent's base LR and betas against the parent's reference batch, so that a run raising its batch
    to k·B at the point takes exactly the branch's steps up to its cooldown (the closed loop then
    continues from its probe; :func:`critbatch.branch.continuation.agreeing_steps`). That is f(k)·η
    to float rounding, and for a parent at its reference batch the same numbers. With other rules
    (``--lr-rule``, ``--adam-rule``), f(k) applies to the parent's η and betas at the point (through
    ``lr_ref_batch_seqs`` = B)."""
    T, B = plan.seq_len, point.base_batch_seqs
    kb = int(round(round_k(k) * B))
    micro = micro_for(kb, plan.cfg.micro_batch_seqs if plan.cfg.micro_batch_seqs is not None
                      else plan.parent.micro_batch_seqs)
    o = plan.parent.optim
    if plan.lr_rule == o.lr_rule and plan.adam_rule == o.adam_rule:
        ref, lr, adam = plan.parent.lr_ref_batch_seqs or B, o.lr, (o.beta1, o.beta2, o.eps)
    else:
        ref, lr, adam = B, point.base_lr, point.base_adam
    return merge(plan.parent, {
        "batch_schedule": [[0, kb]], "batch_seqs": kb, "lr_ref_batch_seqs": ref,
        "optim": {"lr": lr, "lr_rule": plan.lr_rule, "adam_rule": plan.adam_rule,
                  "beta1": adam[0], "beta2": adam[1], "eps": adam[2]},
        "total_tokens": point.tokens + plan.window_tokens, "exact_total_tokens": True,
        "checkpoint_tokens": [], "save_interval_tokens": max(plan.window_tokens // 4, T),
        "eval_interval_tokens": 0, "micro_batch_seqs": micro,  # evaluated once, at the window's end
        "lr_schedule": {"cooldown_tokens": cooldown_tokens(plan.window_tokens, plan.cfg.cooldown_fraction),
                        "cooldown_end_tokens": None},
        "eval_seqs": plan.cfg.eval_seqs or plan.parent.eval_seqs, "device": plan.cfg.device,
        "data": {"stream_shift_seqs": replicate * (plan.window_tokens // T)},
        "log_to": [],  # the sweep logs its curve; its branches log only to their metrics.jsonl
    })


def branch_spec(plan: SweepPlan, point: BranchPoint, k: float, replicate: int) -> BranchSpec:
    """Everything that defines one branch, its id and where it starts."""
    k = round_k(k)
    T, B = plan.seq_len, point.base_batch_seqs
    cfg = branch_config(plan, point, k, replicate)
    kb = cfg.batch_seqs
    shift = cfg.data.stream_shift_seqs
    start, ema = parent_continuation(plan, point, cfg) or (point.ckpt, None)
    if plan.cfg.keep_before_cooldown and plan.cfg.cooldown_fraction > 0:
        c = last_step_before_cooldown(point.tokens, kb * T, plan.window_tokens, plan.cfg.cooldown_fraction)
        if start.tokens < c < point.tokens + plan.window_tokens:
            cfg = merge(cfg, {"checkpoint_tokens": [c], "eval_at_checkpoints": False})
    defining = {"format": BRANCH_FORMAT, "parent": plan.parent_hash, "ckpt_tokens": point.tokens,
                "config": defining_dict(cfg)}
    bid = f"tok_{point.tokens:012d}_k{k:g}_r{replicate}_{config_hash(defining, 10)}"
    offset = point.ckpt.meta["offset_seqs"] + shift
    return BranchSpec(id=bid, k=k, replicate=replicate, point_tokens=point.tokens, base_batch_seqs=B, batch_seqs=kb,
                      lr_multiplier=lr_rule_multiplier(plan.lr_rule, kb, B), base_lr=point.base_lr,
                      window_tokens=plan.window_tokens, stream_start_seqs=offset,
                      stream_end_seqs=offset + plan.window_tokens // T,
                      ckpt=str(start.path.relative_to(plan.run_dir)), from_parent_tokens=start.tokens - point.tokens,
                      init_loss_ema=ema, parent_hash=plan.parent_hash, config=to_dict(cfg))


def ensure_branch(run_dir: Path, spec: BranchSpec) -> Path:
    """The branch's job directory: ``job.json`` (what the launcher runs) and ``branch.json`` (what
    the sweep needs to know about it)."""
    d = Path(run_dir) / "branches" / spec.id
    if not (d / "branch.json").is_file():
        write_job(d, spec.train_config(), Path(run_dir) / spec.ckpt, eval_at_start=False,
                  keep_final_checkpoint=False, init_loss_ema=spec.init_loss_ema)
        write_json_atomic(d / "branch.json", spec.to_dict())
    return d
