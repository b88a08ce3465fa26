"""What the closed loop is asked to do (:class:`AutoBatchConfig`), checked before anything is written."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..analysis.decision import RULES
from ..analysis.triggers import log_spaced_points
from ..config import TrainConfig, check_choices, how, option, validate
from ..errors import ConfigError
from ..launch import LAUNCHERS, check_launch

TRIGGERS = ("branch", "gns", "norm")
AUTOBATCH_FORMAT = 1


@dataclass
class AutoBatchConfig:
    """The closed loop: probe points, probes and the rule that raises the batch."""

    probe_at: list[int] | None = None
    """Probe points in tokens; ``None``: log-spaced, ``first_probe_tokens`` × ``probe_factor``^i below
    the run's total."""
    first_probe_tokens: int | None = None
    """The first log-spaced probe point (default: total_tokens / 16)."""
    probe_factor: float = 2.0
    """Ratio of successive log-spaced probe points."""
    window_tokens: int | None = None
    """Tokens every probe branch trains (rounded up to whole steps at every probed batch); ``None``:
    ``window_fraction`` of the probe point's tokens, and at least 8 optimizer steps of the largest
    probed batch."""
    window_fraction: float = 0.25
    """Without ``window_tokens``: the window at a point of t tokens is this × t. A fixed short window
    passes larger batches too early (a short window hides a cost that grows with the tokens trained;
    docs/LOG.md, the closed loop); with log-spaced points ×2 and k = 1, 2 this costs about 2 × fraction
    × (1 + cooldown_fraction) of the run in probe tokens (the probe at the current batch trains only its
    cooldown: the run itself trains the rest first)."""
    probe_k: list[float] = field(default_factory=lambda: [1.0, 2.0])
    """Batch multipliers probed at each point (1 = the current batch, the reference)."""
    replicates: int = 1
    """Probe branches per k on different data windows (2+: the noninf rule)."""
    rule: str | None = option(None, choices=RULES)
    """``eps`` or ``noninf``; ``None``: eps for one replicate, noninf for more."""
    eps: float = 0.01
    """Tolerance in nats: the larger batch is taken when its held-out loss is within this."""
    confidence: float = 0.95
    """Confidence of the noninf rule and of the held-out sampling error under eps."""
    cooldown_fraction: float = 0.25
    """Each probe ends with an LR cooldown over this fraction of its window (as ``critbatch branch``)."""
    early_stop: bool = True
    """Stop a larger batch's probe part-way through its cooldown once it is settled as failing (its
    paired gap to the current batch above 2·eps at ``confidence``: ``critbatch branch
    --early-stop-gap``); with one replicate. The probe at the current batch then trains first."""
    eval_seqs: int | None = None
    """Held-out sequences at each probe's end (default: the run's)."""
    max_batch_seqs: int | None = None
    """Never raise the batch above this."""
    act_on: str = option("branch", choices=TRIGGERS)
    """Which trigger moves the batch: ``branch`` (the probe), ``gns`` (the calibrated noise scale; branch
    probes run only until ``calibration_points`` calibrate it) or ``norm`` (the norm test; no branch probes)."""
    confirm: int = 2
    """Raise only after the trigger said so at this many consecutive probe points at the same batch
    (2: a raise seen once is confirmed at the next point first). A wrong raise is never undone, a
    wrong stay is revisited at the next point; confirmation trades a later raise for fewer wrong ones
    (docs/LOG.md: with 1, every seed raised at 125k and ended 0.03 nats behind after the anneal)."""
    confirm_factor: float | None = None
    """With ``confirm`` > 1: after a point whose raise is not yet confirmed, probe next at this factor ×
    the point's tokens (when that comes before the next scheduled point) instead of waiting for the
    next scheduled point, so a confirmed raise comes sooner; the extra point costs its probes.
    ``None``: confirm only at the scheduled points."""
    eps_budget: float | None = None
    """A tolerance for the whole run instead of one per decision: every raise spends the loss gap its
    probe measured (the larger batch's held-out loss minus the current one's, at least 0), and a
    raise whose gap would take the total spent past this budget is not taken (a raise by the gns or
    norm trigger at a point without a branch probe measures no gap and spends nothing). ``None``: each
    decision has its own ``eps``, so raises add up (docs/LOG.md: two raises each within 0.007 ended
    0.02 behind on Shakespeare)."""
    measurement_budget: float | None = 0.15
    """The most the loop's measurement may cost, as a fraction of the run's tokens (every token trained
    that the run's result does not contain: ``result.json``'s ``measurement_tokens``). A point whose
    probes would take the measurement past it (estimated before it runs: :func:`critbatch.closed_loop.
    policy.point_measurement`) is not probed, nor any later one, and a point whose raise could only be
    confirmed past it is not probed either. The windows grow with the points: probing all four default
    points costs about 29% of the run's tokens, the last (at half the run) half of that; with this
    default the loop probes the first three (at most 13.7%) and gives up the raises the last would
    have decided (docs/LOG.md: over three seeds as close to the small batch after the anneal, fewer
    steps saved). Speculative segments (``speculate``) are not in the estimate. ``None``: no budget."""
    calibration_points: int = 2
    """Probe points whose branch probes calibrate the noise-scale trigger when it acts."""
    norm_eta: float = 1.0
    """η of the norm test: raise when B < B_simple / η²."""
    noise_scale: bool | None = None
    """Estimate the noise scale at every probe point (the gns and norm triggers read it). ``None``
    (default): only when ``act_on`` is one of them — a separate estimate costs ``gns_batches ×
    gns_b_big`` sequences a point (52% of the demo loop's tokens), and beside the branch probe the two
    triggers agreed with it at 0 of 2 and 2 of 3 points (docs/LOG.md)."""
    gns_b_big: int = 64
    """The noise scale's big batch in sequences."""
    gns_batches: int = 32
    """Big batches averaged by the noise-scale estimate."""
    speculate: bool = how(False)
    """While the probes train, train the next segment at the current batch beside them (in the same
    pool of ``jobs``), so the main run does not wait when the batch stays; when the batch is raised
    that segment is discarded (its tokens are counted in ``result.json``). For several devices; with
    the same thread counts it changes no number (keep ``threads_per_branch`` equal to the run's
    threads on CPU, where the thread count changes the last bits)."""
    device: str = how("auto")
    """Device of the probes."""
    threads_per_branch: int = how(1)
    """CPU threads of each probe process."""
    jobs: int | None = how(None)
    """Probes run at once (``launcher='local'``)."""
    launcher: str = how("local", choices=LAUNCHERS)
    """How probes run: ``local`` (worker processes), ``inprocess``, ``slurm`` or ``submitit-local``."""
    slurm: dict | None = how(None)
    """Options of the ``slurm`` and ``submitit-local`` launchers."""


MIN_PROBE_STEPS = 8
"""The default window gives the largest probed batch at least this many optimizer steps."""


def default_window(point_tokens: int, fraction: float, batch_seqs: int, k_max: float, seq_len: int) -> int:
    """fraction × the point's tokens, but at least MIN_PROBE_STEPS steps of the largest probed batch."""
    return max(int(fraction * point_tokens), int(MIN_PROBE_STEPS * k_max * batch_seqs) * seq_len)


def measures_noise_scale(a: AutoBatchConfig) -> bool:
    """Whether the loop estimates the noise scale at its probe points (``noise_scale``)."""
    return a.noise_scale if a.noise_scale is not None else a.act_on in ("gns", "norm")


def check(cfg: TrainConfig, a: AutoBatchConfig) -> tuple[list[int], int]:
    """The probe points and the starting batch of a closed-loop run of ``cfg``; a ConfigError for
    settings that cannot work, before anything is written."""
    validate(cfg)
    if cfg.batch_schedule is not None and len(cfg.batch_schedule) > 1:
        raise ConfigError("--auto-batch decides the batch schedule itself; give one starting batch (--batch-seqs), "
                          f"not batch_schedule={cfg.batch_schedule}")
    B0 = cfg.batch_schedule[0][1] if cfg.batch_schedule else cfg.batch_seqs
    check_choices(a, "auto")
    if a.window_tokens is not None and a.window_tokens < 1:
        raise ConfigError(f"window_tokens={a.window_tokens} must be positive")
    if not 0 < a.window_fraction <= 4:
        raise ConfigError(f"window_fraction={a.window_fraction} must be in (0, 4]")
    if any(k < 1 for k in a.probe_k):
        raise ConfigError(f"probe_k={a.probe_k}: the closed loop only raises the batch; give k >= 1")
    if not a.probe_k or min(a.probe_k) != 1 or len(set(a.probe_k)) < 2:
        raise ConfigError(f"probe_k={a.probe_k} must hold 1 (the current batch) and at least one larger k")
    if a.probe_factor <= 1:
        raise ConfigError(f"probe_factor={a.probe_factor} must be > 1")
    if a.norm_eta <= 0:
        raise ConfigError(f"norm_eta={a.norm_eta} must be > 0")
    if a.confirm < 1:
        raise ConfigError(f"confirm={a.confirm} must be >= 1")
    if a.confirm_factor is not None and a.confirm_factor <= 1:
        raise ConfigError(f"confirm_factor={a.confirm_factor} must be > 1 (or unset)")
    if a.measurement_budget is not None and not a.measurement_budget > 0:
        raise ConfigError(f"measurement_budget={a.measurement_budget} must be > 0 (a fraction of the run's tokens), "
                          f"or none for no budget")
    if a.eps_budget is not None and not a.eps_budget >= 0:
        raise ConfigError(f"eps_budget={a.eps_budget} must be >= 0 (or unset)")
    if a.calibration_points < 1:
        raise ConfigError(f"calibration_points={a.calibration_points} must be >= 1")
    if a.max_batch_seqs is not None and a.max_batch_seqs < B0:
        raise ConfigError(f"max_batch_seqs={a.max_batch_seqs} is below the starting batch {B0}")
    if a.act_on in ("gns", "norm") and a.noise_scale is False:
        raise ConfigError(f"act_on={a.act_on} needs the noise scale (drop --no-auto.noise-scale)")
    if a.early_stop and a.replicates > 1:
        raise ConfigError(f"early_stop reads one probe against its reference; with replicates={a.replicates} give "
                          f"--no-auto.early-stop")
    check_launch(a.launcher, 1, a.slurm)
    if a.probe_at is not None:
        points = sorted(set(int(t) for t in a.probe_at))
        bad = [t for t in points if not 0 < t < cfg.total_tokens]
        if bad:
            raise ConfigError(f"probe_at={bad[0]} must lie inside the run (0, total_tokens={cfg.total_tokens})")
    else:
        first = a.first_probe_tokens if a.first_probe_tokens is not None else max(cfg.total_tokens // 16, 1)
        if first < 1:
            raise ConfigError(f"first_probe_tokens={first} must be positive")
        points = log_spaced_points(cfg.total_tokens, first, a.probe_factor)
    return points, B0
