"""A run's config resolved (every derived value filled in, so the saved config says exactly what
ran), and the pure arithmetic of its steps: :func:`step_plan` says what the optimizer step after a
given token count does — its batch, micro-batches, stream slices, LR and Adam hyperparameters —
from the config and its batch schedule alone. Two runs whose step plans agree over a span take the
same steps there (a branch reads that part from its parent run, :mod:`critbatch.branch.continuation`).
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import LRScheduleConfig, TrainConfig, from_dict, to_dict
from ..data import TokenData, prepare_embedded
from ..data.dataset import step_slices
from ..errors import ConfigError
from ..model import family
from ..optim import lr_schedule_factor
from ..schedules import BatchSchedule, schedule_of
from ..version import __version__


def resolve_data(cfg: TrainConfig) -> Path:
    if cfg.data.path:
        return Path(cfg.data.path)
    return prepare_embedded(cfg.data.corpus, cfg.data.tokenizer, cfg.data.bpe_vocab_size)


def run_defaults(cfg: TrainConfig) -> dict:
    """The token-time settings a run of ``cfg`` derives from its length when they are unset: the LR
    schedule's horizon and a cooldown's end (the run's total tokens), about 10 resume checkpoints and
    20 evaluations. The one home of these defaults: a run resolves them from itself, and the closed
    loop pins each segment of a run to them so that the segments train as the whole run would."""
    total, s = cfg.total_tokens, cfg.lr_schedule
    return {"lr_schedule": {"horizon_tokens": total if s.horizon_tokens is None else s.horizon_tokens,
                            "cooldown_end_tokens": (total if s.cooldown_tokens and s.cooldown_end_tokens is None
                                                    else s.cooldown_end_tokens)},
            "save_interval_tokens": cfg.save_interval_tokens if cfg.save_interval_tokens is not None else max(total // 10, 1),
            "eval_interval_tokens": cfg.eval_interval_tokens if cfg.eval_interval_tokens is not None else max(total // 20, 1)}


def resolved_lr_schedule(cfg: TrainConfig) -> LRScheduleConfig:
    """``cfg``'s LR schedule with its ends in tokens filled in (:func:`run_defaults`)."""
    return replace(cfg.lr_schedule, **run_defaults(cfg)["lr_schedule"])


def resolve_config(cfg: TrainConfig, data: TokenData) -> TrainConfig:
    """Fill in every derived value so the saved config says exactly what ran."""
    cfg = from_dict(TrainConfig, to_dict(cfg))  # a copy
    cfg.data.path = str(Path(data.path).resolve())  # a run started from another directory finds its data
    cfg.model = family(cfg.model).resolve(cfg.model)  # what it refers to, recorded
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = data.vocab_size
    fixed = family(cfg.model).vocab_size(cfg.model)  # a transformers config may fix its own vocabulary
    if fixed is not None:
        cfg.model.vocab_size = fixed
    if cfg.model.vocab_size < data.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's vocabulary {data.vocab_size}")
    sched = schedule_of(cfg)
    cfg.batch_schedule = sched.as_pairs()
    cfg.batch_seqs = sched.phases[0][1]
    cfg.lr_ref_batch_seqs = sched.reference
    defaults = run_defaults(cfg)
    cfg.lr_schedule = replace(cfg.lr_schedule, **defaults["lr_schedule"])
    cfg.save_interval_tokens = defaults["save_interval_tokens"]
    cfg.eval_interval_tokens = defaults["eval_interval_tokens"]
    return cfg


def config_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Where two config dicts differ, as ``key.path: a vs b`` lines."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += config_diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [f"{prefix}: {a!r} vs {b!r}"]


def environment() -> dict:
    env = {"critbatch": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
           "platform": platform.platform(), "hostname": socket.gethostname(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name(0)
        env["cuda_version"] = torch.version.cuda
    env["numpy"] = np.__version__
    return env


def autocast(precision: str, device: torch.device):
    """The forward's autocast context: bf16 when asked for, or by default (``auto``) on CUDA."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class StepPlan:
    """What one optimizer step does; pure schedule arithmetic (:meth:`Trainer.plan_step`)."""

    tokens: int
    """Tokens consumed before the step."""
    batch_seqs: int
    micro_batch_seqs: int
    accum: int
    lr: float
    adam: tuple[float, float, float] | None
    """(beta1, beta2, eps) when an Adam rule changes them with the batch."""
    slices: list[tuple[int, int]]
    """This rank's stream slices (start, n), in micro-batch order."""


def step_plan(cfg: TrainConfig, schedule: BatchSchedule, tokens0: int, offset_seqs: int, rank: int = 0,
              world_size: int = 1) -> StepPlan:
    """The optimizer step a run of ``cfg`` (resolved; ``schedule`` its batch schedule) takes after
    ``tokens0`` tokens, with its stream at ``offset_seqs``: pure schedule arithmetic, so two runs
    whose step plans agree over a span take the same steps there (a branch reading its start from
    the parent run, :mod:`critbatch.branch.sweep`)."""
    c, W, T = cfg, world_size, cfg.model.seq_len
    B = schedule.batch_seqs_at(tokens0)
    micro = schedule.micro_batch_at(tokens0, c.micro_batch_seqs, W)
    accum = schedule.accum_steps_at(tokens0, micro, W)
    if c.exact_total_tokens and tokens0 + B * T > c.total_tokens:
        B = (c.total_tokens - tokens0) // T  # final partial step: only what remains
        accum = -(-(B // W) // micro)
    lr = c.optim.lr * schedule.lr_multiplier_at(tokens0) * lr_schedule_factor(c.lr_schedule, tokens0)
    adam = (schedule.adam_at(tokens0, c.optim.beta1, c.optim.beta2, c.optim.eps)
            if c.optim.adam_rule != "none" and c.optim.name == "adamw" else None)
    slices = step_slices(offset_seqs + c.data.stream_shift_seqs, B, micro, rank, W)
    assert len(slices) == accum, (len(slices), accum)
    return StepPlan(tokens0, B, micro, accum, lr, adam, slices)
