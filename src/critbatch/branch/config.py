"""What a branch sweep is asked to do (:class:`SweepConfig`) and the constants its parts share."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..analysis.decision import RULES
from ..config import ADAM_RULES, LR_RULES, how, option
from ..launch import LAUNCHERS
from ..registry import TRAINING_CALLBACKS

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
    progress_interval_s: float = how(30.0)
    """Seconds between the plain progress lines (branches done of total, elapsed, ETA) printed on
    stderr when it is not a terminal (under nohup, Slurm, a pipe); a terminal gets a progress bar."""
    log_to: list[str] = how(default_factory=list, choices=TRAINING_CALLBACKS)
    """Experiment trackers that get the sweep's curve once it is decided (``tensorboard``: SWEEP_DIR/tb,
    ``wandb``: SWEEP_DIR/wandb): at each branch point, by its tokens, the CBS interval's ends and
    geometric mean in tokens and the noise scale. Branches log to none (a parent's ``log_to`` is not
    theirs). Needs the ``critbatch[trackers]`` extra."""
    keep_before_cooldown: bool = how(False)
    """Every branch with a cooldown keeps a checkpoint at its last step before the cooldown (not
    evaluated there): where a run raises its batch to a branch's at the point, it continues from
    there instead of training those steps again (the closed loop does). It changes no number."""
    stack: int | None = how(None)
    """Branches of one shape (replicates; the same k at several points) trained together as one
    stacked model, up to this many (:mod:`critbatch.train.stacked`; in process and in the local pool,
    with one rank per branch). ``None``: chosen per sweep — on CUDA, where a small model alone waits on
    kernel launches, a few steps of 8 stacked models against 8 alone at the sweep's smallest batch
    decide; on CPU alone (stacking measured 0.72–1.03× there, docs/LOG.md). Stacked numbers agree with
    branches trained alone to float rounding, not bit for bit; cbs.json says what was chosen and why
    (``cost.stacking``) and which path trained each branch (``cost.trained``)."""
