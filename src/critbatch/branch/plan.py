"""Planning a sweep: everything about it checked and resolved against its parent run before anything
is written — the branch points (the parent's kept checkpoints, with its batch, LR and Adam
hyperparameters there), the window rounded to whole optimizer steps, the adaptive search's
candidates — into one :class:`SweepPlan`."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..analysis.decision import RULES
from ..analysis.search import AdaptiveSearch
from ..config import TrainConfig, check_choices, config_hash, defining_dict, from_dict
from ..data import SequenceStream, open_data
from ..data.dataset import check_capacity
from ..errors import CheckpointError, ConfigError, DataError
from ..io import check_output, read_json
from ..records import read_run_result
from ..launch import check_launch, check_single_process, default_jobs
from ..schedules.rules import adam_hparams, lr_rule_multiplier
from ..train.checkpoint import CheckpointInfo, find_kept, kept_checkpoints, load_checkpoint
from ..train.trackers import curve_trackers
from .config import EMA_MIN_STEPS, SweepConfig


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


def round_k(k: float) -> float:
    return round(float(k), 9)


def _read_parent(run_dir: Path) -> TrainConfig:
    if not (run_dir / "config.json").is_file():
        raise DataError(f"parent run {run_dir} is missing or incomplete (no config.json)")
    if not (run_dir / "result.json").is_file():
        raise DataError(f"parent run {run_dir} is incomplete (no result.json); finish it with `critbatch train --out {run_dir}`")
    try:
        parent = from_dict(TrainConfig, read_json(run_dir / "config.json"))
        parent_result = read_run_result(run_dir)
    except (json.JSONDecodeError, ConfigError) as e:
        raise DataError(f"parent run {run_dir} is corrupt: {str(e).splitlines()[0]}") from None
    if parent_result.get("diverged"):
        raise DataError(f"parent run {run_dir} diverged; branch from a healthy run")
    return parent


def _check_options(cfg: SweepConfig, parent: TrainConfig) -> tuple[SweepConfig, str, str, str, list[float]]:
    """Validated options: (cfg with jobs resolved, rule, lr rule, adam rule, the sorted grid)."""
    if cfg.rule == "ttest":
        raise ConfigError("rule 'ttest' was replaced by 'noninf' (non-inferiority: k passes only when the data show "
                          "it within eps of the smaller batches)")
    check_choices(cfg)
    curve_trackers(cfg.log_to)
    check_launch(cfg.launcher, cfg.nproc_per_job, cfg.slurm)
    rule = cfg.rule or ("eps" if cfg.replicates == 1 else "noninf")
    if cfg.eps < 0 or not math.isfinite(cfg.eps):
        raise ConfigError(f"eps={cfg.eps} must be >= 0")
    if cfg.replicates < 1:
        raise ConfigError(f"replicates={cfg.replicates} must be >= 1")
    if not (isinstance(cfg.cooldown_fraction, (int, float)) and 0 <= cfg.cooldown_fraction <= 1):
        raise ConfigError(f"cooldown_fraction={cfg.cooldown_fraction} must be in [0, 1]")
    if cfg.replicates < RULES[rule].min_replicates:
        raise ConfigError(f"the {rule} rule needs --replicates {RULES[rule].min_replicates} or more")
    if not 0.5 <= cfg.confidence < 1:
        raise ConfigError(f"confidence={cfg.confidence} must be in [0.5, 1)")
    _check_early_stop(cfg)
    if cfg.jobs is None:
        cfg = dataclasses.replace(cfg, jobs=default_jobs(cfg.threads_per_branch, cfg.device))
    if cfg.progress_interval_s < 0:
        raise ConfigError(f"progress_interval_s={cfg.progress_interval_s} must be >= 0 seconds")
    if cfg.stack is not None and cfg.stack < 1:
        raise ConfigError(f"stack={cfg.stack} must be >= 1 (1: every branch alone)")
    if cfg.jobs < 1 or cfg.threads_per_branch < 1:
        raise ConfigError(f"jobs={cfg.jobs} and threads_per_branch={cfg.threads_per_branch} must be >= 1")
    lr_rule = cfg.lr_rule or parent.optim.lr_rule
    adam_rule = cfg.adam_rule or parent.optim.adam_rule
    ks = sorted({round_k(k) for k in cfg.k})
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
    k_max = round_k(cfg.k_max if cfg.k_max is not None else ks[-1])
    k_min = round_k(cfg.k_min if cfg.k_min is not None else next((k for k in ks if k >= 1), ks[0]))
    res = None if cfg.resolution is None else round_k(cfg.resolution)
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
        k = round_k(b / min(Bs))
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


def new_search(plan: SweepPlan, decide_fn) -> AdaptiveSearch:
    return AdaptiveSearch(plan.k_min, plan.k_max, plan.resolution, decide_fn, candidates=plan.candidates)
