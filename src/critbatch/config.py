"""Typed configs. One dataclass per concern, a docstring under every field, units in every name.

A config is resolved (every ``None`` that means "derive it" filled in) before a run starts and the
resolved form is saved as ``config.json`` in the run directory, so a run can be understood and
resumed without the code or the command line that made it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .registry import MODEL_FAMILIES, TRAINING_CALLBACKS, Registry
from .units import parse_count

HOW = {"defining": False}
"""Field metadata of a setting that says *how* something runs (device, parallelism, logging), never
*what* it computes: it is left out of content hashes and may differ when a run is resumed."""


def option(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, choices=None,
           aliases: tuple[str, ...] = (), defining: bool = True, **meta) -> Any:
    """A dataclass field with command-line metadata: the accepted ``choices``, short flag ``aliases``
    (``--lr`` beside ``--optim.lr``), and ``defining=False`` for a setting that changes no result."""
    meta = dict(meta)
    if choices is not None:  # a Registry stays live: its keys are read when a value is checked
        meta["choices"] = choices if isinstance(choices, Registry) else tuple(choices)
    if aliases:
        meta["aliases"] = tuple(aliases)
    if not defining:
        meta.update(HOW)
    return field(default=default, default_factory=default_factory, metadata=meta)


def how(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **meta) -> Any:
    """A dataclass field marked as not defining any result (see :data:`HOW`)."""
    return option(default, default_factory=default_factory, defining=False, **meta)

LR_RULES = ("sqrt", "linear", "none")
ADAM_RULES = ("none", "sde", "sde-beta2")
LR_SCHEDULES = ("constant", "cosine", "wsd")
OPTIMIZERS = ("adamw", "sgd")
TOKENIZERS = ("bytes", "bpe")
PRECISIONS = ("auto", "fp32", "bf16")
PARALLEL = ("ddp", "fsdp")



@dataclass
class ModelConfig:
    """The model: the built-in GPT (pre-norm, causal attention, tied embeddings) and its shape, or a
    causal LM from Hugging Face ``transformers`` (``family='hf'``)."""

    family: str = option("gpt", choices=MODEL_FAMILIES)
    """``gpt`` (the built-in model, shaped by the fields below) or ``hf`` (a ``transformers`` causal
    LM built from ``hf``; then only ``seq_len`` and ``vocab_size`` of the fields below apply)."""
    hf: dict | str | None = None
    """``family='hf'``: the ``transformers`` config — a mapping with ``model_type`` and its fields
    (e.g. ``{"model_type": "olmo2", "hidden_size": 64, ...}``), a config.json, or a local model
    directory. Never downloaded."""
    hf_weights: str | None = None
    """``family='hf'``: a local directory of ``*.safetensors`` to start from (default: a fresh init)."""

    n_layer: int = 3
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide ``d_model``."""
    d_model: int = 96
    """Residual stream width."""
    seq_len: int = 64
    """Context length in tokens; also the length of every training sequence."""
    vocab_size: int | None = None
    """Vocabulary size; ``None`` takes it from the data directory's ``meta.json``."""
    mlp_ratio: int = 4
    """Hidden width of the MLP as a multiple of ``d_model``."""
    bias: bool = False
    """Biases in linear layers and layer norms."""
    init_std: float = 0.02
    """Std of the normal init; residual output projections get ``init_std / sqrt(2 * n_layer)``."""


@dataclass
class OptimConfig:
    """Optimizer and the LR–batch coupling rule."""

    name: str = option("adamw", choices=OPTIMIZERS, aliases=("optimizer",))
    """``adamw`` (decay and no-decay groups; fused on CUDA) or ``sgd`` (with momentum)."""
    lr: float = option(3e-3, aliases=("lr",))
    """Peak learning rate at the reference batch ``TrainConfig.lr_ref_batch_seqs``."""
    lr_rule: str = option("sqrt", choices=LR_RULES, aliases=("lr-rule",))
    """How the base LR follows the batch: ``sqrt`` (Adam family), ``linear`` (SGD) or ``none``."""
    adam_rule: str = option("none", choices=ADAM_RULES, aliases=("adam-rule",))
    """How Adam's betas and epsilon follow the batch: ``none`` (the paper: only the LR changes),
    ``sde`` (Malladi et al. 2022: 1 − β1 and 1 − β2 times k, ε / √k for k = batch / reference) or
    ``sde-beta2`` (only β2 and ε). Valid while k·(1 − β) < 1."""
    beta1: float = 0.9
    """Adam first-moment decay."""
    beta2: float = 0.95
    """Adam second-moment decay."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (not on embeddings, norms or biases)."""
    momentum: float = 0.9
    """SGD momentum (ignored by AdamW)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; ``None`` disables clipping (the norm is still logged)."""


@dataclass
class LRScheduleConfig:
    """Learning-rate schedule as a function of tokens, multiplying the (rule-scaled) base LR."""

    kind: str = option("cosine", choices=LR_SCHEDULES, aliases=("lr-schedule",))
    """``constant`` (after warmup), ``cosine`` (warmup then cosine to ``min_lr_ratio``) or ``wsd``
    (warmup, stable, then a linear anneal to 0 over the last ``decay_tokens``)."""
    warmup_tokens: int = option(0, aliases=("warmup-tokens",))
    """Linear warmup from 0 over this many tokens."""
    horizon_tokens: int | None = None
    """Tokens at which the schedule ends; ``None`` means the run's ``total_tokens``. Branches keep
    their parent's horizon so the schedule continues unchanged."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of the peak."""
    decay_tokens: int = option(0, aliases=("decay-tokens",))
    """WSD: length of the final linear anneal to 0."""
    anneal_tokens: int = 0
    """After the horizon, fall linearly from the schedule's final value to 0 over this many tokens
    (the anneal phase of ``critbatch compare --anneal-tokens``)."""
    cooldown_tokens: int = 0
    """Multiply the schedule by a linear decay to 0 over the run's last this-many tokens, ending at
    ``cooldown_end_tokens`` (a branch's cooldown probe; the schedule's shape before it is unchanged)."""
    cooldown_end_tokens: int | None = None
    """Where the cooldown ends; ``None`` means the run's ``total_tokens``."""


@dataclass
class DataConfig:
    """Where the tokens come from and in which order."""

    path: str | None = option(None, aliases=("data",))
    """A prepared data directory (``critbatch prepare``); ``None`` prepares and caches the embedded
    corpus ``corpus`` with ``tokenizer``."""
    corpus: str = option("sotu", aliases=("corpus",))
    """Embedded corpus used when ``path`` is ``None``: ``sotu`` or ``shakespeare``."""
    tokenizer: str = option("bytes", choices=TOKENIZERS, aliases=("tokenizer",))
    """Tokenizer for the auto-prepared corpus: ``bytes`` or ``bpe``."""
    bpe_vocab_size: int = 8192
    """Vocabulary of the locally trained BPE when ``tokenizer`` is ``bpe``."""
    order_seed: int = 0
    """Seed of the one global order of training sequences."""
    allow_repeat: bool = option(False, aliases=("allow-repeat",))
    """Allow a run to consume more sequences than the training split holds (more than one epoch)."""
    verify: bool = how(True)
    """Check the sha256 and the token ids of every shard against ``meta.json`` before training (once
    per file: a shard is hashed again only when its size, times or inode changed)."""
    eval_seed: int = 0
    """Seed of the held-out evaluation sample (``eval_seqs`` sequences drawn across the whole
    held-out split). Runs compared with each other must share it."""
    stream_shift_seqs: int = 0
    """Read the stream this many sequences ahead of the token count: branch replicates use it to
    train on different data windows from the same checkpoint. The LR schedule still follows tokens."""


@dataclass
class TrainConfig:
    """Everything that defines one training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    total_tokens: int = 1_000_000
    """Tokens to train for; the run stops at the first step boundary at or after it."""
    batch_seqs: int = 4
    """Global batch in sequences (used when ``batch_schedule`` is ``None``)."""
    batch_schedule: list[list[int]] | None = None
    """Piecewise-constant global batch: ``[[start_tokens, batch_seqs], ...]`` with the first start 0
    and starts increasing. A phase applies from the first step that begins at or after its start."""
    micro_batch_seqs: int | None = None
    """Sequences per forward/backward on one rank; ``None`` means the whole per-rank batch.
    Accumulation steps are derived: batch / (micro_batch * world_size), checked at every phase."""
    lr_ref_batch_seqs: int | None = None
    """Batch at which ``optim.lr`` applies unscaled; ``None`` means the first phase's batch."""
    checkpoint_tokens: list[int] = field(default_factory=list)
    """Token counts at which to keep a checkpoint (branch points). Each is taken at the first step
    boundary at or after the count."""
    save_interval_tokens: int | None = how(None)
    """Interval of resume checkpoints (only the newest is kept); ``None``: about 10 per run."""
    eval_interval_tokens: int | None = None
    """Interval of held-out evaluation; ``None``: about 20 per run; 0: none in between. Always
    evaluated at the end, and at kept checkpoints unless ``eval_at_checkpoints`` is off."""
    eval_at_checkpoints: bool = how(True)
    """Evaluate at every kept checkpoint (the checkpoint keeps its eval loss and per-sequence losses).
    Off: only on the interval and at the end, a checkpoint on an evaluation's boundary still keeping
    it; for runs whose checkpoints only branches start from (a branch evaluates itself)."""
    eval_seqs: int = 256
    """Held-out sequences in the fixed evaluation set."""
    seed: int = 0
    """Seed of the model initialisation."""
    device: str = how("auto")
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    precision: str = option("auto", choices=PRECISIONS)
    """``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``fp32`` or ``bf16``."""
    compile: bool = how(False)
    """Wrap the model in ``torch.compile`` (CUDA only)."""
    parallel: str = how("ddp", choices=PARALLEL)
    """Data parallelism under torchrun: ``ddp`` (every rank holds the whole model) or ``fsdp``
    (FSDP2 ``fully_shard``: parameters, gradients and optimizer state sharded over the ranks, for
    models that do not fit one device). Either way gradients synchronise once per optimizer step and
    checkpoints hold the full, unsharded state, so a run may resume under the other. Ignored in a
    single process."""
    log_interval_steps: int = how(50)
    """Steps between performance records (``perf/*``); losses are logged every step."""
    progress_interval_s: float = how(30.0)
    """Seconds between the plain progress lines (tokens, tokens/s, loss, ETA) printed on stderr when it
    is not a terminal (under nohup, Slurm, a pipe); a terminal gets a progress bar. 0: a line every step."""
    log_to: list[str] = how(default_factory=list, choices=TRAINING_CALLBACKS)
    """Experiment trackers that get every logged record beside metrics.jsonl: ``tensorboard``
    (RUN/tb), ``wandb`` (RUN/wandb, offline unless WANDB_MODE says otherwise); any other registered
    training callback may be named too. On the main rank; needs the ``critbatch[trackers]`` extra."""
    exact_total_tokens: bool = False
    """Stop exactly at ``total_tokens``: a final partial step takes only the remaining sequences
    (at the phase's LR). Branches use it so every batch size consumes the same tokens."""


# --------------------------------------------------------------------------------------------
# dict <-> dataclass, strictly: unknown keys are errors naming the key and the accepted ones.

def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _convert(non_none[0], value, path)
    if tp is int:
        # Every integer here is a count (tokens, sequences, layers, seeds): "50M" is accepted.
        return parse_count(value, path)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} is not a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}={value!r} is not a number") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}={value!r} is not a boolean (true/false)")
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r} is not a string")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r} is not a list")
        (inner,) = args
        return [_convert(inner, v, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def from_dict(cls: type, data: dict | None, path: str = "") -> Any:
    """Build dataclass ``cls`` from a (possibly partial) dict; unknown keys raise ConfigError."""
    if data is None:
        return cls()
    if dataclasses.is_dataclass(data):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}={data!r} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            where = f"{path}.{key}" if path else key
            raise ConfigError(f"unknown config key {where!r}; accepted: {', '.join(names)}")
        kwargs[key] = _convert(hints[key], value, f"{path}.{key}" if path else key)
    return cls(**kwargs)


def merge(base: Any, overrides: dict) -> Any:
    """Return a copy of dataclass ``base`` with a nested dict of overrides applied."""
    d = to_dict(base)
    _deep_update(d, overrides)
    return from_dict(type(base), d)


def _deep_update(d: dict, u: dict) -> None:
    for k, v in u.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            _deep_update(d[k], v)
        else:
            d[k] = v


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def defining_dict(cfg: Any) -> dict:
    """``cfg`` (a dataclass) as a dict without the fields marked :data:`HOW`, recursively: what
    defines the numbers a run, branch or sweep produces."""
    out = {}
    for f in dataclasses.fields(cfg):
        if f.metadata.get("defining", True) is False:
            continue
        v = getattr(cfg, f.name)
        out[f.name] = defining_dict(v) if dataclasses.is_dataclass(v) else copy.deepcopy(v)
    return out


def defining_hash(cfg: Any, n: int = 12) -> str:
    """Content address of a config: the hash of :func:`defining_dict`."""
    return config_hash(defining_dict(cfg), n)


def config_hash(obj: Any, n: int = 12) -> str:
    """Stable short hash of a dataclass or JSON-able object (sorted keys)."""
    if dataclasses.is_dataclass(obj):
        obj = to_dict(obj)
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def _toml():
    """tomllib (Python 3.11+), else the tomli package it came from (installed on 3.10)."""
    try:
        import tomllib
    except ImportError:
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError("TOML config files need Python 3.11+ or the tomli package (pip install tomli); "
                              "or give the config as JSON") from None
    return tomllib


def load_config_file(path: str) -> dict:
    """Read a JSON or TOML config file into a dict (a mapping of config keys)."""
    import pathlib

    p = pathlib.Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    kind = "TOML" if p.suffix == ".toml" else "JSON"
    loads = _toml().loads if kind == "TOML" else json.loads
    try:
        data = loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path!r} is not valid {kind}: it is not UTF-8 text") from None
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise ConfigError(f"config file {path!r} is not valid {kind}: {str(e).splitlines()[0] if str(e) else e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must be a mapping of config keys, not a {type(data).__name__}")
    return data


def check_choices(cfg: Any, path: str = "") -> None:
    """Every field of ``cfg`` (a dataclass, nested ones included) whose metadata names ``choices``
    holds one of them (``None`` passes: it means "the default"): the one check of every enumerated
    setting, read from the fields themselves. Raises ConfigError naming the field, the value and
    what is accepted."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        where = f"{path}.{f.name}" if path else f.name
        if dataclasses.is_dataclass(v):
            check_choices(v, where)
            continue
        choices = f.metadata.get("choices")
        if choices is None or v is None:
            continue
        for x in (v if isinstance(v, list) else [v]):  # a list field: each of its items
            if isinstance(choices, Registry):
                choices.check(x, where)
            elif x not in choices:
                raise ConfigError(f"{where}={x!r} is not one of {', '.join(map(str, choices))}")


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: TrainConfig) -> None:
    """Check every value that can be checked without data or devices. Raises ConfigError."""
    m, o, s = cfg.model, cfg.optim, cfg.lr_schedule
    check_choices(cfg)
    for name in ("n_layer", "n_head", "d_model", "seq_len", "mlp_ratio"):
        v = getattr(m, name)
        _require(isinstance(v, int) and v > 0, f"model.{name}={v!r} must be a positive integer")
    MODEL_FAMILIES[m.family].check(m)
    _require(m.vocab_size is None or m.vocab_size > 0, f"model.vocab_size={m.vocab_size} must be positive")
    _require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, f"optim betas ({o.beta1}, {o.beta2}) must be in [0, 1)")
    _require(o.eps >= 0, f"optim.eps={o.eps} must be >= 0")
    _require(math.isfinite(o.lr) and o.lr > 0, f"learning rate {o.lr!r} must be a positive number")
    _require(o.max_grad_norm is None or o.max_grad_norm > 0, f"optim.max_grad_norm={o.max_grad_norm} must be positive or null")
    _require(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    _require(0 <= s.min_lr_ratio <= 1, f"lr_schedule.min_lr_ratio={s.min_lr_ratio} must be in [0, 1]")
    _require(cfg.total_tokens > 0, f"total_tokens={cfg.total_tokens} must be positive")
    late = [t for t in cfg.checkpoint_tokens if t > cfg.total_tokens]
    _require(not late, f"checkpoint_tokens {late[0] if late else ''} lies beyond the run's end at {cfg.total_tokens} "
                       f"tokens: no step would reach it")
    _require(cfg.batch_seqs > 0, f"batch_seqs={cfg.batch_seqs} must be positive")
    _require(cfg.micro_batch_seqs is None or cfg.micro_batch_seqs > 0,
             f"micro_batch_seqs={cfg.micro_batch_seqs} must be positive")
    _require(cfg.eval_seqs > 0, f"eval_seqs={cfg.eval_seqs} must be positive")
    _require(not cfg.exact_total_tokens or cfg.total_tokens % m.seq_len == 0,
             f"total_tokens={cfg.total_tokens} must be a whole number of {m.seq_len}-token sequences when exact_total_tokens is set")
    _require(cfg.save_interval_tokens is None or cfg.save_interval_tokens > 0,
             f"save_interval_tokens={cfg.save_interval_tokens} must be positive")
    _require(cfg.eval_interval_tokens is None or cfg.eval_interval_tokens >= 0,
             f"eval_interval_tokens={cfg.eval_interval_tokens} must be >= 0 (0: only at kept checkpoints and the end)")
    _require(cfg.progress_interval_s >= 0, f"progress_interval_s={cfg.progress_interval_s} must be >= 0 seconds")
    _require(cfg.lr_ref_batch_seqs is None or cfg.lr_ref_batch_seqs > 0,
             f"lr_ref_batch_seqs={cfg.lr_ref_batch_seqs} must be positive")
    if s.horizon_tokens is not None:
        _require(s.horizon_tokens > 0, f"lr_schedule.horizon_tokens={s.horizon_tokens} must be positive")
    _require(s.cooldown_tokens >= 0, f"lr_schedule.cooldown_tokens={s.cooldown_tokens} must be >= 0")
    if s.kind == "wsd":
        horizon = s.horizon_tokens or cfg.total_tokens
        _require(s.decay_tokens > 0, "lr_schedule.decay_tokens must be positive for the wsd schedule")
        _require(s.warmup_tokens + s.decay_tokens <= horizon,
                 f"lr_schedule warmup_tokens + decay_tokens = {s.warmup_tokens + s.decay_tokens} exceeds the horizon {horizon}")
