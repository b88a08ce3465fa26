"""Optimizers with decay/no-decay groups, LR schedules as functions of tokens, and the one LR–batch
coupling rule (docs/guide.md, "Concepts and units")."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..config import LRScheduleConfig, OptimConfig
from ..errors import ConfigError
from ..schedules.rules import adam_hparams, lr_rule_multiplier


def lr_schedule_factor(cfg: LRScheduleConfig, tokens: int | float) -> float:
    """Multiplier in [0, 1] of the peak LR after ``tokens`` tokens (counted in tokens, never steps,
    so a batch change does not alter the schedule's shape). ``cfg.horizon_tokens`` must be resolved."""
    t = float(tokens)
    if cfg.cooldown_tokens > 0:
        end = float(cfg.cooldown_end_tokens)
        cool = min(1.0, max(0.0, (end - t) / cfg.cooldown_tokens))
        if cool < 1.0:
            return cool * lr_schedule_factor(replace(cfg, cooldown_tokens=0), tokens)
    H = float(cfg.horizon_tokens)
    if cfg.anneal_tokens > 0 and t > H:
        end = lr_schedule_factor(cfg, H)
        return end * max(0.0, (H + cfg.anneal_tokens - t) / cfg.anneal_tokens)
    if cfg.warmup_tokens > 0 and t < cfg.warmup_tokens:
        return t / cfg.warmup_tokens
    if cfg.kind == "constant":
        return 1.0
    if cfg.kind == "cosine":
        span = max(H - cfg.warmup_tokens, 1.0)
        frac = min(max((t - cfg.warmup_tokens) / span, 0.0), 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    if cfg.kind == "wsd":
        decay_start = H - cfg.decay_tokens
        if t < decay_start:
            return 1.0
        return max(0.0, (H - t) / cfg.decay_tokens)
    raise ConfigError(f"lr_schedule.kind={cfg.kind!r} is not one of constant, cosine, wsd")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices of linear layers; none on embeddings, norms and biases."""
    emb = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in emb else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "adamw":
        kw = {"fused": True} if device.type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kw)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise ConfigError(f"optim.name={cfg.name!r} is not one of adamw, sgd")


__all__ = ["adam_hparams", "lr_rule_multiplier", "lr_schedule_factor", "param_groups", "build_optimizer"]
