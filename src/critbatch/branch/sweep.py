"""Branch sweeps: from a finished run's kept checkpoints, short branches at batch k·B with LR f(k)·η,
and the local critical batch size decided from their losses (docs/method.md §2).

Layout inside the parent run directory (branches live in one content-addressed pool so that sweeps
sharing a branch — adaptive and full grid, or two tolerances — train it once)::

    RUN/branches/<branch-id>/   branch.json (what defines it), job.json, config.json, metrics.jsonl, result.json
    RUN/sweeps/<sweep-id>/      sweep.json (the spec), cbs.json, cbs.csv, cbs.png/.svg, loss_vs_batch.png

A branch id hashes everything that defines the branch's numbers; a sweep id hashes the sweep spec.
A finished branch is never run again; an interrupted one resumes from its own checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Iterable

import numpy as np
from tqdm.auto import tqdm

from ..analysis.curve import attach_noise_scale, curve_csv, fit_or_none, noise_scale_points, point_record
from ..analysis.decision import RULES, decide, paired_eval_noise
from ..analysis.search import AdaptiveSearch
from ..config import ADAM_RULES, LR_RULES, TrainConfig, config_hash, defining_dict, from_dict, how, merge, option, to_dict
from ..data import SequenceStream, open_data
from ..data.dataset import check_capacity
from ..errors import CheckpointError, ConfigError, DataError
from ..io import check_output, read_json, read_jsonl, write_json_atomic, write_text_atomic
from ..launch import LAUNCHERS, check_launch, check_single_process, default_jobs, run_job, run_jobs, write_job
from ..model import dropout_probabilities
from ..report.plots import plot_cbs_curve, plot_loss_vs_batch
from ..schedules import BatchSchedule
from ..schedules.rules import adam_hparams, lr_rule_multiplier
from ..train.checkpoint import CheckpointInfo, find_kept, kept_checkpoints, load_checkpoint
from ..train.early_stop import STOP_RULE_FILE, step_records, stopped_reading
from ..train.loop import EMA_ALPHA, EVAL_LOSSES_FILE, resolved_lr_schedule, step_plan
from ..units import fmt_count

BRANCH_FORMAT = 1
EMA_MIN_STEPS = 8
"""Fewest optimizer steps a branch needs for its EMA (alpha 0.5) reading: 1 - 0.5^8 = 99.6% of the
weight on the branch's own steps (with one step the EMA is mostly the loss before it)."""
DECIDE_BY = ("eval", "train-ema")
SEARCHES = ("grid", "adaptive")
STACK_CUDA = 8
"""Branches stacked into one model by default on CUDA (``SweepConfig.stack``)."""
EARLY_STOP_MIN_SPANS = 8
"""Fewest paired stretches of the cooldown an early stop reads (``SweepConfig.early_stop_gap``)."""


@dataclass
class SweepConfig:
    """A branch sweep over a run's kept checkpoints."""

    run: str
    """The parent run directory (finished: it holds result.json)."""
    at: list[int]
    """Branch points in tokens: kept checkpoints, matched by requested or actual token count."""
    k: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0, 8.0])
    """Batch multipliers of the full grid (``search='grid'``); fractional values work."""
    window_tokens: int = 100_000
    """Tokens every branch trains, rounded up so that it is a whole number of optimizer steps at
    every batch the sweep can probe: a multiple of the least common multiple of the grid's batches
    k·B (adaptive search: of its doubling points, the largest batch among them). No branch ends on
    a partial step."""
    lr_rule: str | None = option(None, choices=LR_RULES)
    """LR–batch rule f(k): ``sqrt``, ``linear`` or ``none``; ``None`` takes the parent's."""
    adam_rule: str | None = option(None, choices=ADAM_RULES)
    """How Adam's betas and epsilon follow k: ``none``, ``sde`` or ``sde-beta2`` (see
    :func:`critbatch.optim.adam_hparams`); ``None`` takes the parent's."""
    replicates: int = 1
    """Branches per k on different data windows: replicate r reads the stream r windows ahead."""
    search: str = option("grid", choices=SEARCHES)
    """``grid`` (every k) or ``adaptive`` (double until the first failure, then bisect)."""
    k_min: float | None = None
    """Adaptive: the first probe (default: the smallest grid k that is at least 1, else the smallest)."""
    k_max: float | None = None
    """Adaptive: the largest probe (default: the largest grid k)."""
    resolution: float | None = None
    """Adaptive: bisect over the lattice k_min + i·resolution (only k whose batch divides the
    window); ``None`` (default): over every k between k_min and k_max whose batch divides the window."""
    cooldown_fraction: float = 0.25
    """Every branch ends with a linear LR decay to 0 over this fraction of its window (a cooldown
    probe), so the decision compares how far each batch got, not its noise level: at a constant
    LR a larger batch sits lower on its noise floor and looks better than it trained (docs/LOG.md,
    the warmup study). 0: the paper's plain continuation of the parent's schedule."""
    decide_by: str = option("eval", choices=DECIDE_BY)
    """Which loss decides: ``eval`` (held-out loss at the window's end) or ``train-ema`` (the
    paper's EMA-smoothed training loss, alpha 0.5). See docs/LOG.md for why eval is the default."""
    rule: str | None = option(None, choices=RULES)
    """``eps`` (the paper's point reading) or ``noninf`` (non-inferiority over paired replicates: k
    passes only when the data show it within eps of every smaller k at ``confidence``);
    ``None``: eps for one replicate, noninf for more."""
    eps: float = 0.01
    """Tolerance in nats: a batch passes when its loss is within this of the smaller batches'."""
    confidence: float = 0.95
    """Confidence of the noninf rule's bounds, and of the held-out set's sampling error under eps."""
    early_stop_gap: float | None = None
    """Stop a branch part-way through its cooldown once it is settled that it fails: its paired
    training-loss gap to the point's reference (the smallest k, on the same sequences), over at
    least EARLY_STOP_MIN_SPANS stretches of the cooldown, exceeds this many nats by ``z`` standard
    errors at ``confidence`` (:mod:`critbatch.train.early_stop`). It then counts as failing with that
    reading; a later sweep without early stopping continues it. Must exceed ``eps`` (2·eps is a
    cautious choice); needs a cooldown and one replicate. ``None`` (default): every branch trains its
    whole window."""
    micro_batch_seqs: int | None = None
    """Micro-batch of the branches (default: the parent's); reduced to a divisor of k·B as needed
    (it changes no number, only memory)."""
    eval_seqs: int | None = None
    """Held-out sequences evaluated at each branch's end (default: the parent's)."""
    device: str = how("auto")
    """Device of the branches."""
    threads_per_branch: int = how(1)
    """CPU threads of each branch process. Fixed (not derived from ``jobs``) so that results are
    bitwise the same whatever the number of jobs."""
    jobs: int | None = how(None)
    """Branches run at once, each in its own process (``launcher='local'``); ``None``: one per GPU,
    or one per ``threads_per_branch`` CPU cores."""
    launcher: str = how("local", choices=LAUNCHERS)
    """``local`` (a pool of worker processes), ``inprocess`` (sequential, in this process), ``slurm``
    (a submitit job array) or ``submitit-local`` (submitit's executor on this machine)."""
    nproc_per_job: int = how(1)
    """Data-parallel ranks per branch: ``torchrun`` in the local pool (with ``jobs`` × this many GPUs
    in use), that many tasks of one Slurm job on Slurm."""
    slurm: dict | None = how(None)
    """Options of the ``slurm`` and ``submitit-local`` launchers: keys of
    :class:`critbatch.launch.slurm.SlurmConfig` (partition, time_min, gpus_per_task, ...)."""
    stack: int | None = how(None)
    """Branches of one shape (replicates; the same k at several points) trained together as one
    stacked model, up to this many (:mod:`critbatch.train.stacked`; in process and in the local pool,
    with one rank per branch). ``None``: chosen per sweep — on CUDA, where a small model alone waits on
    kernel launches, a few steps of 8 stacked models against 8 alone at the sweep's smallest batch
    decide; on CPU alone (stacking measured 0.72–1.03× there, docs/LOG.md). Stacked numbers agree with
    branches trained alone to float rounding, not bit for bit; cbs.json says what was chosen and why
    (``cost.stacking``) and which path trained each branch (``cost.trained``)."""


@dataclass
class BranchPoint:
    ckpt: CheckpointInfo
    base_batch_seqs: int
    base_lr: float
    """The parent's LR multiplier at this point times its base LR (the branch's η before f(k))."""
    base_adam: tuple[float, float, float] = (0.9, 0.95, 1e-8)
    """The parent's Adam (beta1, beta2, eps) at this point (its adam rule applied to B)."""

    @property
    def tokens(self) -> int:
        return self.ckpt.tokens


@dataclass
class SweepPlan:
    cfg: SweepConfig
    run_dir: Path
    parent: TrainConfig
    parent_hash: str
    points: list[BranchPoint]
    window_tokens: int
    rule: str
    lr_rule: str
    sweep_id: str
    sweep_dir: Path
    k_min: float | None = None
    k_max: float | None = None
    resolution: float | None = None
    adam_rule: str = "none"
    window_tokens_requested: int = 0
    candidates: list[float] | None = None
    """Adaptive: the k the bisection may probe (each batch divides the window)."""
    notes: list[str] = field(default_factory=list)
    kept: list[CheckpointInfo] = field(default_factory=list)
    """The parent's kept checkpoints: a branch whose first steps are the parent's own starts from
    the latest of them inside its window (:func:`parent_continuation`)."""
    parent_step_losses: dict[int, float] | None = field(default=None, repr=False)
    """The parent's training loss by step end (tokens), read once from its metrics.jsonl."""

    @property
    def seq_len(self) -> int:
        return self.parent.model.seq_len


def _round_k(k: float) -> float:
    return round(float(k), 9)


# ---- planning: everything is checked before anything is written ---------------------------------

def _read_parent(run_dir: Path) -> TrainConfig:
    if not (run_dir / "config.json").is_file():
        raise DataError(f"parent run {run_dir} is missing or incomplete (no config.json)")
    if not (run_dir / "result.json").is_file():
        raise DataError(f"parent run {run_dir} is incomplete (no result.json); finish it with `critbatch train --out {run_dir}`")
    try:
        parent = from_dict(TrainConfig, read_json(run_dir / "config.json"))
        parent_result = read_json(run_dir / "result.json")
    except (json.JSONDecodeError, ConfigError) as e:
        raise DataError(f"parent run {run_dir} is corrupt: {str(e).splitlines()[0]}") from None
    if parent_result.get("diverged"):
        raise DataError(f"parent run {run_dir} diverged; branch from a healthy run")
    return parent


def _check_options(cfg: SweepConfig, parent: TrainConfig) -> tuple[SweepConfig, str, str, str, list[float]]:
    """Validated options: (cfg with jobs resolved, rule, lr rule, adam rule, the sorted grid)."""
    if cfg.search not in SEARCHES:
        raise ConfigError(f"search={cfg.search!r} is not one of {', '.join(SEARCHES)}")
    if cfg.decide_by not in DECIDE_BY:
        raise ConfigError(f"decide-by {cfg.decide_by!r} is not one of {', '.join(DECIDE_BY)}")
    check_launch(cfg.launcher, cfg.nproc_per_job, cfg.slurm)
    rule = cfg.rule or ("eps" if cfg.replicates == 1 else "noninf")
    if rule == "ttest":
        raise ConfigError("rule 'ttest' was replaced by 'noninf' (non-inferiority: k passes only when the data show "
                          "it within eps of the smaller batches)")
    if rule not in RULES:
        raise ConfigError(f"rule {rule!r} is not one of {', '.join(RULES)}")
    if cfg.eps < 0 or not math.isfinite(cfg.eps):
        raise ConfigError(f"eps={cfg.eps} must be >= 0")
    if cfg.replicates < 1:
        raise ConfigError(f"replicates={cfg.replicates} must be >= 1")
    if not (isinstance(cfg.cooldown_fraction, (int, float)) and 0 <= cfg.cooldown_fraction <= 1):
        raise ConfigError(f"cooldown_fraction={cfg.cooldown_fraction} must be in [0, 1]")
    if rule == "noninf" and cfg.replicates < 2:
        raise ConfigError("the noninf rule needs --replicates 2 or more")
    if not 0.5 <= cfg.confidence < 1:
        raise ConfigError(f"confidence={cfg.confidence} must be in [0.5, 1)")
    _check_early_stop(cfg)
    if cfg.jobs is None:
        cfg = dataclasses.replace(cfg, jobs=default_jobs(cfg.threads_per_branch, cfg.device))
    if cfg.stack is not None and cfg.stack < 1:
        raise ConfigError(f"stack={cfg.stack} must be >= 1 (1: every branch alone)")
    if cfg.jobs < 1 or cfg.threads_per_branch < 1:
        raise ConfigError(f"jobs={cfg.jobs} and threads_per_branch={cfg.threads_per_branch} must be >= 1")
    lr_rule = cfg.lr_rule or parent.optim.lr_rule
    if lr_rule not in LR_RULES:
        raise ConfigError(f"lr rule {lr_rule!r} is not one of {', '.join(LR_RULES)}")
    adam_rule = cfg.adam_rule or parent.optim.adam_rule
    if adam_rule not in ADAM_RULES:
        raise ConfigError(f"adam rule {adam_rule!r} is not one of {', '.join(ADAM_RULES)}")
    ks = sorted({_round_k(k) for k in cfg.k})
    if not ks or any(k <= 0 or not math.isfinite(k) for k in ks):
        raise ConfigError(f"every k must be > 0 (got {', '.join(f'{k:g}' for k in cfg.k)})")
    if not cfg.at:
        raise ConfigError("give at least one branch point (--at)")
    if cfg.window_tokens <= 0:
        raise ConfigError(f"window_tokens={cfg.window_tokens} must be positive")
    return cfg, rule, lr_rule, adam_rule, ks


def _check_early_stop(cfg: SweepConfig) -> None:
    g = cfg.early_stop_gap
    if g is None:
        return
    if not (isinstance(g, (int, float)) and math.isfinite(g) and g > cfg.eps):
        raise ConfigError(f"early_stop_gap={g} must be a number above eps={cfg.eps:g}: a stopped branch counts as "
                          f"failing, so its gap must be shown beyond eps (2·eps is a cautious choice)")
    if cfg.cooldown_fraction <= 0:
        raise ConfigError("early_stop_gap needs a cooldown (cooldown_fraction > 0): at a constant LR a larger batch "
                          "reads ahead of the smaller one and ends behind, so a gap before the cooldown settles nothing")
    if cfg.replicates != 1:
        raise ConfigError(f"early_stop_gap needs replicates=1 (got {cfg.replicates}): a stop reads one branch against "
                          f"the reference, while with replicates the decision pools them")


def _branch_points(run_dir: Path, parent: TrainConfig, at: list[int]) -> list[BranchPoint]:
    """The kept checkpoints to branch from (each loaded once: a corrupt one fails here), with the
    parent's batch, LR and Adam hyperparameters there."""
    points = []
    o = parent.optim
    for ck in find_kept(run_dir, at):
        try:
            load_checkpoint(ck.path)
        except CheckpointError as e:
            raise DataError(f"parent run {run_dir} is corrupt: {e}") from None
        B = int(ck.meta["batch_seqs"])
        ref = parent.lr_ref_batch_seqs or B
        eta = o.lr * lr_rule_multiplier(o.lr_rule, B, ref)
        adam = adam_hparams(o.adam_rule, B, ref, o.beta1, o.beta2, o.eps) if o.name == "adamw" else (o.beta1, o.beta2, o.eps)
        points.append(BranchPoint(ck, B, eta, adam))
    return points


def _search_range(cfg: SweepConfig, ks: list[float]) -> tuple[float | None, float | None, float | None, list[float]]:
    """(k_min, k_max, resolution, the k whose batches every window must hold whole steps of)."""
    if cfg.search != "adaptive":
        return None, None, None, ks
    k_max = _round_k(cfg.k_max if cfg.k_max is not None else ks[-1])
    k_min = _round_k(cfg.k_min if cfg.k_min is not None else next((k for k in ks if k >= 1), ks[0]))
    res = None if cfg.resolution is None else _round_k(cfg.resolution)
    if not 0 < k_min < k_max:
        raise ConfigError(f"adaptive search needs 0 < k_min < k_max (got {k_min:g}, {k_max:g})")
    if res is not None and res <= 0:
        raise ConfigError(f"resolution={res} must be > 0")
    return k_min, k_max, res, AdaptiveSearch(k_min, k_max, None, None, candidates=[]).doubling()


def _whole_step_window(cfg: SweepConfig, points: list[BranchPoint], step_ks: list[float], T: int) -> tuple[int, list[str]]:
    """The window in sequences, rounded up to a multiple of every batch in ``step_ks`` (their lcm),
    so that no branch ends on a partial step; and a note when it was rounded."""
    for p in points:
        for k in step_ks:
            kb = k * p.base_batch_seqs
            if abs(kb - round(kb)) > 1e-9 or round(kb) < 1:
                raise ConfigError(f"k={k:g} at base batch {p.base_batch_seqs} gives {kb:g} sequences; k·B must be a "
                                  f"whole number >= 1")
    unit = math.lcm(*{int(round(k * p.base_batch_seqs)) for p in points for k in step_ks})
    want = -(-cfg.window_tokens // T)  # sequences
    largest = max(int(round(step_ks[-1] * p.base_batch_seqs)) for p in points)
    if want < largest:
        raise ConfigError(f"window {cfg.window_tokens} tokens is shorter than one step of the largest batch "
                          f"(k={step_ks[-1]:g}: {largest * T} tokens); the minimum window is {largest * T}")
    window_seqs = -(-want // unit) * unit
    notes = []
    if window_seqs * T != cfg.window_tokens:
        notes.append(f"window rounded up from {cfg.window_tokens:,} to {window_seqs * T:,} tokens ({window_seqs // unit} "
                     f"x {unit} sequences): every branch trains whole optimizer steps at every batch it can probe")
    return window_seqs, notes


def _candidates(points: list[BranchPoint], window_seqs: int, k_min: float, k_max: float, res: float | None) -> list[float]:
    """Adaptive: every k in [k_min, k_max] whose batch divides the window at every point (and lies on
    the lattice k_min + i·resolution when one is given)."""
    Bs = {p.base_batch_seqs for p in points}
    out = []
    for b in range(1, window_seqs + 1):
        if window_seqs % b:
            continue
        k = _round_k(b / min(Bs))
        if not (k_min - 1e-12 <= k <= k_max + 1e-12):
            continue
        if res is not None and abs((k - k_min) / res - round((k - k_min) / res)) > 1e-6:
            continue
        if all(abs(k * B - round(k * B)) < 1e-9 and window_seqs % int(round(k * B)) == 0 for B in Bs):
            out.append(k)
    return out


def _check_steps(cfg: SweepConfig, points: list[BranchPoint], ks: list[float], window_seqs: int) -> None:
    """An explicit micro-batch must divide every probed batch it is smaller than (it is not silently
    changed; one at least as large as a batch takes that batch whole); the EMA
    reading needs enough steps in every branch to be an average."""
    for p in points:
        for k in ks:
            kb = int(round(k * p.base_batch_seqs))
            if cfg.micro_batch_seqs is not None and kb % cfg.micro_batch_seqs and cfg.micro_batch_seqs < kb:
                raise ConfigError(f"micro-batch {cfg.micro_batch_seqs} does not divide the batch of {kb} sequences at "
                                  f"k={k:g}; give one that divides every probed batch (or is at least as large), or none")
            if cfg.decide_by == "train-ema" and window_seqs // kb < EMA_MIN_STEPS:
                raise ConfigError(f"decide-by train-ema needs at least {EMA_MIN_STEPS} optimizer steps in every branch "
                                  f"for its EMA to average over; k={k:g} takes {window_seqs // kb} in the window: "
                                  f"lengthen the window or decide by eval")


def _check_capacity(parent: TrainConfig, points: list[BranchPoint], replicates: int, window_seqs: int) -> None:
    """The data are intact (checked before any branch directory exists) and every replicate window
    lies inside the training split."""
    try:
        data = open_data(parent.data.path, verify=parent.data.verify)
    except DataError as e:
        raise DataError(f"the parent run's data: {e}") from None
    stream = SequenceStream(data, parent.model.seq_len, parent.data.order_seed)
    need = max(p.ckpt.meta["offset_seqs"] for p in points) + replicates * window_seqs
    check_capacity(stream, need, parent.data.allow_repeat, "the sweep",
                   "use a shorter window, fewer replicates or earlier branch points")


def plan_sweep(cfg: SweepConfig) -> SweepPlan:
    """Validate a sweep against its parent run and resolve everything; writes nothing."""
    check_single_process("a branch sweep")
    run_dir = Path(cfg.run)
    parent = _read_parent(run_dir)
    cfg, rule, lr_rule, adam_rule, ks = _check_options(cfg, parent)
    points = _branch_points(run_dir, parent, cfg.at)
    T = parent.model.seq_len
    k_min, k_max, res, step_ks = _search_range(cfg, ks)
    window_seqs, notes = _whole_step_window(cfg, points, step_ks, T)
    candidates = _candidates(points, window_seqs, k_min, k_max, res) if cfg.search == "adaptive" else None
    if candidates is not None and cfg.micro_batch_seqs is not None:  # only batches the micro-batch divides
        candidates = [k for k in candidates if all(int(round(k * p.base_batch_seqs)) % cfg.micro_batch_seqs == 0
                                                   or int(round(k * p.base_batch_seqs)) <= cfg.micro_batch_seqs
                                                   for p in points)]
    _check_steps(cfg, points, step_ks, window_seqs)
    _check_capacity(parent, points, cfg.replicates, window_seqs)
    check_output(run_dir / "sweeps", "the parent run")
    window = window_seqs * T
    parent_hash = config_hash(defining_dict(parent))
    spec = defining_dict(cfg)
    if spec.get("early_stop_gap") is None:
        spec.pop("early_stop_gap", None)  # sweeps without early stopping keep the ids they had before it
    spec.update(run=None, at=[p.tokens for p in points], k=None if cfg.search == "adaptive" else ks,
                window_tokens=window, rule=rule, lr_rule=lr_rule, adam_rule=adam_rule, k_min=k_min, k_max=k_max,
                resolution=res, parent=parent_hash)
    sweep_id = config_hash(spec)
    cfg = dataclasses.replace(cfg, k=ks)
    return SweepPlan(cfg, run_dir, parent, parent_hash, points, window, rule, lr_rule, sweep_id,
                     run_dir / "sweeps" / sweep_id, k_min, k_max, res, adam_rule, cfg.window_tokens, candidates, notes,
                     kept_checkpoints(run_dir))


# ---- one branch ---------------------------------------------------------------------------------

def _micro_for(batch: int, micro: int | None) -> int | None:
    if micro is None or batch % micro == 0:
        return micro if micro is None or micro <= batch else batch
    return max(d for d in range(1, min(micro, batch) + 1) if batch % d == 0)


def branch_spec(plan: SweepPlan, point: BranchPoint, k: float, replicate: int) -> dict:
    """Everything that defines one branch, and its TrainConfig."""
    k = _round_k(k)
    T = plan.seq_len
    B = point.base_batch_seqs
    kb = int(round(k * B))
    micro = _micro_for(kb, plan.cfg.micro_batch_seqs if plan.cfg.micro_batch_seqs is not None
                       else plan.parent.micro_batch_seqs)
    shift = replicate * (plan.window_tokens // T)
    cfg = merge(plan.parent, {
        "batch_schedule": [[0, kb]], "batch_seqs": kb, "lr_ref_batch_seqs": B,
        "optim": {"lr": point.base_lr, "lr_rule": plan.lr_rule, "adam_rule": plan.adam_rule,
                  "beta1": point.base_adam[0], "beta2": point.base_adam[1], "eps": point.base_adam[2]},
        "total_tokens": point.tokens + plan.window_tokens, "exact_total_tokens": True,
        "checkpoint_tokens": [], "save_interval_tokens": max(plan.window_tokens // 4, T),
        "eval_interval_tokens": 0, "micro_batch_seqs": micro,  # evaluated once, at the window's end
        "lr_schedule": {"cooldown_tokens": cooldown_tokens(plan.window_tokens, plan.cfg.cooldown_fraction),
                        "cooldown_end_tokens": None},
        "eval_seqs": plan.cfg.eval_seqs or plan.parent.eval_seqs, "device": plan.cfg.device,
        "data": {"stream_shift_seqs": shift},
    })
    defining = {"format": BRANCH_FORMAT, "parent": plan.parent_hash, "ckpt_tokens": point.tokens,
                "config": defining_dict(cfg)}
    bid = f"tok_{point.tokens:012d}_k{k:g}_r{replicate}_{config_hash(defining, 10)}"
    start, ema = parent_continuation(plan, point, cfg) or (point.ckpt, None)
    return {"id": bid, "k": k, "replicate": replicate, "point_tokens": point.tokens, "base_batch_seqs": B,
            "batch_seqs": kb, "lr_multiplier": lr_rule_multiplier(plan.lr_rule, kb, B), "base_lr": point.base_lr,
            "window_tokens": plan.window_tokens, "stream_start_seqs": point.ckpt.meta["offset_seqs"] + shift,
            "stream_end_seqs": point.ckpt.meta["offset_seqs"] + shift + plan.window_tokens // T,
            "ckpt": str(start.path.relative_to(plan.run_dir)), "from_parent_tokens": start.tokens - point.tokens,
            "init_loss_ema": ema,
            "parent_hash": plan.parent_hash, "config": to_dict(cfg)}


# ---- the part of a branch the parent run already trained (issue 15: the free k = 1 branch) --------

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
    sched = BatchSchedule.parse(cfg.batch_schedule or [[0, cfg.batch_seqs]], cfg.model.seq_len, cfg.optim.lr_rule,
                                cfg.lr_ref_batch_seqs, cfg.optim.adam_rule)
    return cfg, sched


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
        ema = _parent_ema(plan, point.tokens, c.tokens)
        if ema is not None:
            return c, ema
    return None


def _parent_ema(plan: SweepPlan, start: int, end: int) -> float | None:
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
        ema = loss if ema is None else EMA_ALPHA * loss + (1 - EMA_ALPHA) * ema
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


def ensure_branch(run_dir: Path, spec: dict) -> Path:
    """The branch's job directory: ``job.json`` (what the launcher runs) and ``branch.json`` (what
    the sweep needs to know about it)."""
    d = run_dir / "branches" / spec["id"]
    if not (d / "branch.json").is_file():
        write_job(d, from_dict(TrainConfig, spec["config"]), run_dir / spec["ckpt"], eval_at_start=False,
                  keep_final_checkpoint=False, init_loss_ema=spec.get("init_loss_ema"))
        write_json_atomic(d / "branch.json", spec)
    return d


def run_branch_dir(branch_dir: str | Path, threads: int | None = None, callbacks: Iterable = ()) -> dict:
    """Train one branch (or return its finished result)."""
    return run_job(branch_dir, threads, callbacks)


def branch_losses(branch_dir: Path) -> dict:
    """A finished branch's numbers; ``eval_per_seq``: its per-sequence held-out losses (``None`` for
    a diverged branch or one trained before they were saved). A branch stopped early
    (:mod:`critbatch.train.early_stop`) has no losses (NaN) and ``stopped``: the reading that stopped it."""
    spec = read_json(branch_dir / "branch.json")
    from_parent = spec.get("from_parent_tokens", 0)
    parent_steps = from_parent // (spec["batch_seqs"] * spec["config"]["model"]["seq_len"])
    common = {"trained": "alone", "from_parent_tokens": from_parent, "stopped": None}
    if not (branch_dir / "result.json").is_file() and (st := stopped_reading(branch_dir)) is not None:
        return {**common, "eval": math.nan, "train-ema": math.nan, "eval_se": None, "eval_per_seq": None,
                "diverged": False, "tokens": st["tokens"] - st["start_tokens"], "steps": st["steps"] + parent_steps,
                "wall_time_s": st["wall_time_s"],
                "stopped": {k: st[k] for k in ("tokens", "gap_mean", "gap_se", "spans", "gap", "z")}}
    r = read_json(branch_dir / "result.json")
    per_seq = None
    if not r["diverged"] and (branch_dir / EVAL_LOSSES_FILE).is_file():
        per_seq = np.load(branch_dir / EVAL_LOSSES_FILE, allow_pickle=False)
    return {**common, "eval": r["final_eval_loss"] if not r["diverged"] else float("inf"),
            "train-ema": r["final_train_loss"] if not r["diverged"] else float("inf"),
            "eval_se": r.get("final_eval_loss_se"), "eval_per_seq": per_seq,
            "diverged": bool(r["diverged"]), "tokens": r["tokens"] - r["start_tokens"],
            "steps": r["steps"] + parent_steps,  # the window's optimizer steps, those the parent took for it included
            "trained": r.get("trained", "alone"), "wall_time_s": r["wall_time_s"]}


def stop_rule(plan: SweepPlan, point: BranchPoint, ref_dir: Path) -> dict | None:
    """The early-stop rule of a branch at ``point`` against its finished reference branch ``ref_dir``
    (``None`` when the sweep does not stop early or the reference diverged)."""
    cfg = plan.cfg
    if cfg.early_stop_gap is None or not (ref_dir / "result.json").is_file():
        return None
    if read_json(ref_dir / "result.json")["diverged"]:
        return None
    start = point.tokens + plan.window_tokens - cooldown_tokens(plan.window_tokens, cfg.cooldown_fraction)
    steps = [s for s in step_records(read_jsonl(ref_dir / "metrics.jsonl")) if s[0] >= start]
    return {"gap": float(cfg.early_stop_gap), "z": NormalDist().inv_cdf(cfg.confidence),
            "min_spans": EARLY_STOP_MIN_SPANS, "from_tokens": start, "reference_branch": ref_dir.name,
            "reference": [list(x) for x in steps]}


# ---- deciding ----------------------------------------------------------------------------------

def decide_point(plan: SweepPlan, ks: list[float], recs: list[list[dict]]):
    """The decision at one branch point from its branches' records (``recs[i]``: k_i's replicates).
    Decided by eval loss, the held-out set's paired sampling error enters the decision."""
    cfg = plan.cfg
    losses = [[r[cfg.decide_by] for r in reps] for reps in recs]
    se = sd = None
    if cfg.decide_by == "eval":
        se, sd = paired_eval_noise([[r["eval_per_seq"] for r in reps] for reps in recs])
    return decide(ks, losses, plan.rule, cfg.eps, cfg.confidence, diff_se=se, diff_sd=sd)


def _point(plan: SweepPlan, p: BranchPoint, by_k: dict[float, list[dict]]) -> dict:
    cfg = plan.cfg
    ks = sorted(by_k)
    recs = [by_k[k] for k in ks]
    losses = {m: [[r[m] for r in reps] for reps in recs] for m in DECIDE_BY}
    extra = {"branch_tokens": sum(r["tokens"] for reps in recs for r in reps),
             "from_parent_tokens": [[r["from_parent_tokens"] for r in reps] for reps in recs],
             "branch_seconds": sum(r["wall_time_s"] for reps in recs for r in reps),
             "trained": [[r["trained"] for r in reps] for reps in recs],
             "branches": sum(len(v) for v in recs), "steps": [[r["steps"] for r in reps] for reps in recs],
             "eval_se": [[r["eval_se"] for r in reps] for reps in recs],
             "stopped_early": [[r["stopped"] for r in reps] for reps in recs],
             "early_stop_saved_tokens": sum(plan.window_tokens - r["from_parent_tokens"] - r["tokens"]
                                            for reps in recs for r in reps if r["stopped"])}
    if cfg.search == "adaptive":
        grid = _search(plan, None).full_grid()
        extra["full_grid_branch_tokens"] = len(grid) * cfg.replicates * plan.window_tokens
        extra["full_grid_ks"] = len(grid)
    div = [[r["diverged"] for r in reps] for reps in recs]
    return point_record(p.tokens, p.ckpt.requested_tokens, p.base_batch_seqs, plan.seq_len, ks, losses, div,
                        cfg.decide_by, decide_point(plan, ks, recs), cfg.eps, extra)


def build_curve(plan: SweepPlan, results: dict[int, dict[float, list[dict]]], wall_time_s: float) -> dict:
    """cbs.json's content: every point decided, described in sequences and tokens, with its cost."""
    cfg = plan.cfg
    points = [_point(plan, p, results[p.tokens]) for p in plan.points]
    curve = {
        "sweep_id": plan.sweep_id, "run": str(plan.run_dir), "search": cfg.search, "decide_by": cfg.decide_by,
        "rule": plan.rule, "eps": cfg.eps, "confidence": cfg.confidence, "early_stop_gap": cfg.early_stop_gap,
        "lr_rule": plan.lr_rule,
        "adam_rule": plan.adam_rule, "cooldown_fraction": cfg.cooldown_fraction, "replicates": cfg.replicates,
        "window_tokens": plan.window_tokens, "window_tokens_requested": plan.window_tokens_requested,
        "eval_seqs": cfg.eval_seqs or plan.parent.eval_seqs, "seq_len": plan.seq_len, "notes": list(plan.notes),
        "points": points,
        "cost": {"branches": sum(p["branches"] for p in points), "branch_tokens": sum(p["branch_tokens"] for p in points),
                 "tokens_from_base": sum(x for p in points for reps in p["from_parent_tokens"] for x in reps),
                 "branch_seconds": sum(p["branch_seconds"] for p in points), "wall_time_s": wall_time_s,
                 "stopped_early": sum(1 for p in points for reps in p["stopped_early"] for x in reps if x),
                 "early_stop_saved_tokens": sum(p["early_stop_saved_tokens"] for p in points),
                 "trained": _trained_counts(points)},
    }
    if cfg.search == "adaptive":
        curve["cost"]["full_grid_branch_tokens"] = sum(p["full_grid_branch_tokens"] for p in points)
    base = read_json(plan.run_dir / "result.json")
    base_tokens = base["tokens"] - base.get("start_tokens", 0)
    curve["cost"]["base_tokens"] = base_tokens
    curve["cost"]["branch_tokens_over_base"] = curve["cost"]["branch_tokens"] / base_tokens if base_tokens else None
    curve["fit"] = fit_or_none(points)
    return curve


def _trained_counts(points: list[dict]) -> dict[str, int]:
    """How the sweep's branches were trained: ``alone`` or ``stacked xN``, with their counts."""
    out: dict[str, int] = {}
    for p in points:
        for reps in p["trained"]:
            for t in reps:
                out[t] = out.get(t, 0) + 1
    return dict(sorted(out.items()))


def write_curve(sweep_dir: Path, curve: dict) -> None:
    """cbs.json, cbs.csv and the two figures of a sweep."""
    write_json_atomic(sweep_dir / "cbs.json", curve)
    write_text_atomic(sweep_dir / "cbs.csv", curve_csv(curve))
    plot_cbs_curve(curve, sweep_dir / "cbs", noise_scale=noise_scale_points(curve) or None)
    plot_loss_vs_batch(curve, sweep_dir / "loss_vs_batch")


def _search(plan: SweepPlan, decide_fn) -> AdaptiveSearch:
    return AdaptiveSearch(plan.k_min, plan.k_max, plan.resolution, decide_fn, candidates=plan.candidates)


# ---- the sweep ---------------------------------------------------------------------------------

@dataclass
class SweepResult:
    plan: SweepPlan
    curve: dict
    sweep_dir: Path


class _Branches:
    """The sweep's branches: their directories by point and k, their results once finished, and
    whether this session trained any of them."""

    def __init__(self, plan: SweepPlan, bar, stack: int = 1):
        self.plan, self.bar, self.stack = plan, bar, stack
        self.dirs: dict[int, dict[float, list[Path]]] = {p.tokens: {} for p in plan.points}
        self.results: dict[int, dict[float, list[dict]]] = {p.tokens: {} for p in plan.points}
        self.trained = False
        self.reference_k = _round_k(plan.k_min if plan.cfg.search == "adaptive" else plan.cfg.k[0])
        """The point's reference branch: what an early stop compares a branch with."""
        self.could_continue: dict[int, int] = {}
        """point -> tokens: a branch trained whole that a kept parent checkpoint there would have shortened."""

    def make(self, point: BranchPoint, k: float) -> list[Path]:
        specs = [branch_spec(self.plan, point, k, r) for r in range(self.plan.cfg.replicates)]
        dirs = [ensure_branch(self.plan.run_dir, s) for s in specs]
        self.dirs[point.tokens][_round_k(k)] = dirs
        self._stop_rules(point, _round_k(k), dirs)
        if not specs[0]["from_parent_tokens"] and not (dirs[0] / "result.json").is_file():
            t = continuation_tokens(self.plan, point, from_dict(TrainConfig, specs[0]["config"]))
            if t is not None:
                self.could_continue[point.tokens] = t
        return dirs

    def _stop_rules(self, point: BranchPoint, k: float, dirs: list[Path]) -> None:
        """Each unfinished branch above the point's reference gets its early-stop rule (once the
        reference has finished); without early stopping, none (a rule left by another sweep goes)."""
        ref = self.dirs[point.tokens].get(self.reference_k)
        for r, d in enumerate(dirs):
            if (d / "result.json").is_file():
                continue
            rule = stop_rule(self.plan, point, ref[r]) if (ref and k != self.reference_k) else None
            if rule is None:
                (d / STOP_RULE_FILE).unlink(missing_ok=True)
            elif not (d / STOP_RULE_FILE).is_file() or read_json(d / STOP_RULE_FILE) != rule:
                write_json_atomic(d / STOP_RULE_FILE, rule)

    def _settled(self, d: Path) -> bool:
        """Finished, or stopped early by this sweep's rule."""
        if (d / "result.json").is_file():
            return True
        rule = d / STOP_RULE_FILE
        return self.plan.cfg.early_stop_gap is not None and rule.is_file() and \
            stopped_reading(d, read_json(rule)) is not None

    def continuation_note(self) -> str | None:
        """What kept checkpoints of the parent would have saved, when branches trained whole could
        have started from it."""
        if not self.could_continue:
            return None
        W = self.plan.window_tokens
        saved = sum(t - p for p, t in self.could_continue.items())
        at = ", ".join(f"{t:,}" for _p, t in sorted(self.could_continue.items()))
        return (f"branches that take the parent's own steps for part of their window (k = 1, up to its cooldown) "
                f"trained their whole {W:,}-token window: kept checkpoints of the parent at {at} tokens "
                f"(train --checkpoint-tokens) would have let them start there and saved {saved:,} branch tokens")

    def run(self, dirs: list[Path]) -> None:
        c = self.plan.cfg
        todo = [d for d in dirs if not self._settled(d)]
        self.trained |= bool(todo)
        self.bar.total = (self.bar.total or 0) + len(dirs)
        self.bar.update(len(dirs) - len(todo))
        run_jobs(todo, c.jobs, c.threads_per_branch, c.launcher, lambda _d: self.bar.update(1),
                 nproc_per_job=c.nproc_per_job, slurm=c.slurm, stack=self.stack)
        for t, by_k in self.dirs.items():
            for k, ds in by_k.items():
                if k not in self.results[t]:
                    self.results[t][k] = [branch_losses(d) for d in ds]


def choose_stack(plan: SweepPlan, measure: bool | None = None) -> tuple[int, dict]:
    """How many branches of one shape train stacked, and why: the given ``stack``; else, when
    ``measure`` (default: the sweep runs on CUDA), the faster of STACK_CUDA models stacked and alone
    at the sweep's smallest batch (:func:`critbatch.train.stacked.measure_stacking`); else 1."""
    cfg = plan.cfg
    if cfg.stack is not None:
        return cfg.stack, {"stack": cfg.stack, "chosen_by": "--stack"}
    from ..dist import resolve_device
    from ..train.loop import autocast
    from ..train.stacked import measure_stacking

    dev = resolve_device(cfg.device)
    if measure is None:
        measure = dev.type == "cuda"
    if not measure or cfg.launcher not in ("inprocess", "local") or cfg.nproc_per_job > 1:
        why = ("CPU: stacking measured no faster (docs/LOG.md)" if dev.type == "cpu" else
               f"launcher {cfg.launcher} with {cfg.nproc_per_job} rank(s) per branch trains branches alone")
        return 1, {"stack": 1, "chosen_by": why}
    k0 = plan.k_min if plan.k_min is not None else cfg.k[0]
    batch = max(1, int(round(k0 * min(p.base_batch_seqs for p in plan.points))))
    m = measure_stacking(plan.parent.model, batch, STACK_CUDA, dev,
                         autocast=lambda: autocast(plan.parent.precision, dev))
    stack = STACK_CUDA if m["faster"] == "stacked" else 1
    return stack, {"stack": stack, "chosen_by": f"measured: {m['speedup']:.2f}x stacked vs alone", **m}


def run_sweep(cfg: SweepConfig, progress: bool | None = None) -> SweepResult:
    """Plan, run the missing branches, decide, and write cbs.json / cbs.csv / plots. A sweep whose
    branches were all finished before, with its cbs.json written, is returned as it is."""
    plan = plan_sweep(cfg)
    cfg = plan.cfg
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    spec = {**to_dict(plan.cfg), "run": str(plan.run_dir), "sweep_id": plan.sweep_id,
            "window_tokens_effective": plan.window_tokens, "rule": plan.rule, "lr_rule": plan.lr_rule,
            "adam_rule": plan.adam_rule, "k_min": plan.k_min, "k_max": plan.k_max, "resolution": plan.resolution,
            "candidates": plan.candidates, "points": [p.tokens for p in plan.points]}
    if not (plan.sweep_dir / "sweep.json").is_file():
        write_json_atomic(plan.sweep_dir / "sweep.json", spec)
    t0 = time.time()
    bar = tqdm(desc=f"sweep {plan.sweep_id}", unit="branch", disable=True if progress is False else None,
               dynamic_ncols=True)
    stack, stacking = choose_stack(plan)
    br = _Branches(plan, bar, stack)
    if cfg.search == "grid" and cfg.early_stop_gap is not None:  # the references first: the others read them
        br.run([d for p in plan.points for d in br.make(p, cfg.k[0])])
        br.run([d for p in plan.points for k in cfg.k[1:] for d in br.make(p, k)])
    elif cfg.search == "grid":
        br.run([d for p in plan.points for k in cfg.k for d in br.make(p, k)])
    else:
        searches = {p.tokens: _search(plan, lambda ks, recs: decide_point(plan, ks, recs)) for p in plan.points}
        while True:
            todo = [d for p in plan.points if (k := searches[p.tokens].next_probe(br.results[p.tokens])) is not None
                    for d in br.make(p, k)]
            if not todo:
                break
            br.run(todo)
    bar.close()
    if not br.trained and (plan.sweep_dir / "cbs.json").is_file():
        old = read_json(plan.sweep_dir / "cbs.json")
        if not old["cost"].get("stopped_early"):  # else another sweep may have finished a stopped branch since
            return SweepResult(plan, old, plan.sweep_dir)  # nothing new: unchanged
    if (note := br.continuation_note()) is not None:
        plan.notes.append(note)
    curve = build_curve(plan, br.results, wall_time_s=time.time() - t0)
    curve["cost"]["stacking"] = stacking
    if (plan.run_dir / "gns.json").is_file():
        attach_noise_scale(curve, read_json(plan.run_dir / "gns.json"))
    write_curve(plan.sweep_dir, curve)
    return SweepResult(plan, curve, plan.sweep_dir)


def describe_point(p: dict) -> str:
    T = p["seq_len"]
    lo, hi = p["cbs_low_seqs"], p["cbs_high_seqs"]
    if len(p["ks"]) < 2:
        return f"one batch size only (k={p['ks'][0]:g}): no decision"
    if p.get("undetermined_reason"):
        return f"CBS undetermined: {p['undetermined_reason']}"
    und = [k * p["base_batch_seqs"] for k in p.get("undetermined_ks", [])]
    if hi is None:
        s = (f"CBS >= {lo:g} seqs ({fmt_count(lo * T)} tokens): no probed batch was shown to fail, bounded below only"
             if und else f"CBS >= {lo:g} seqs ({fmt_count(lo * T)} tokens): even the largest batch passed, bounded below only")
    elif p["below_grid"]:
        s = f"CBS <= {hi:g} seqs ({fmt_count(hi * T)} tokens): only the smallest batch passed; it may lie below the grid"
    else:
        s = f"CBS in [{lo:g}, {hi:g}] seqs ({fmt_count(lo * T)}–{fmt_count(hi * T)} tokens), geo-mean {p['cbs_geomean_seqs']:.3g}"
    if p["readings_disagree"]:
        cl, ch = p["conservative_low_seqs"], p["conservative_high_seqs"]
        s += f"; conservative reading [{cl:g}, {ch if ch is not None else 'inf'}] disagrees"
    if und:
        s += f"; undetermined: {', '.join(f'{b:g}' for b in und)} seqs"
        if p.get("replicates_needed"):
            s += f" (~{p['replicates_needed']} replicates would settle it)"
        elif p.get("eval_seqs_needed"):
            s += f" (~{p['eval_seqs_needed']:,} held-out sequences would settle it)"
    stopped = [(k, x) for k, reps in zip(p["ks"], p.get("stopped_early", [])) for x in reps if x]
    if stopped:
        s += "; stopped early as failing: " + ", ".join(
            f"{k * p['base_batch_seqs']:g} seqs (gap {x['gap_mean']:+.4f} ± {x['gap_se']:.4f} over {x['spans']} "
            f"cooldown stretches > {x['gap']:g})" for k, x in stopped)
    if p.get("eval_noise_ok") is False:
        s += f"; held-out paired error {p['max_paired_eval_se']:.4f} is not well below eps: raise --eval-seqs"
    return s
