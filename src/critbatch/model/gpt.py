"""A small GPT: pre-norm blocks, causal scaled-dot-product attention, learned positions, tied
input/output embeddings, N(0, 0.02) init with residual projections scaled by 1/sqrt(2·n_layer)
(GPT-2). Written to be read in one sitting."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..errors import ConfigError
from .family import ModelFamily
from .losses import NextTokenLosses


class CausalSelfAttention(nn.Module):
    fused = True
    """Fused scaled-dot-product attention; False: the same in plain ops (:mod:`critbatch.train.stacked`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.proj.residual_out = True  # scaled init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.fused:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # the same attention in plain ops (they batch under torch.func.vmap; the fused kernels may not)
            att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            y = att.masked_fill(~causal, float("-inf")).softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.proj.residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(NextTokenLosses, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be resolved before building the model")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, nn.Linear):
                s = std / math.sqrt(2 * self.cfg.n_layer) if getattr(m, "residual_out", False) else std
                nn.init.normal_(m.weight, 0.0, s)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) int64 -> logits (B, T, vocab)."""
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return F.linear(x, self.wte.weight)  # tied output embedding

    def fsdp_units(self) -> list[nn.Module]:
        """The transformer blocks, each its own FSDP unit."""
        return list(self.blocks)


def count_params(cfg: ModelConfig, embeddings: bool = True) -> int:
    """Parameters of the model (tied embedding counted once)."""
    d, L, V, T, r = cfg.d_model, cfg.n_layer, cfg.vocab_size or 0, cfg.seq_len, cfg.mlp_ratio
    b = 1 if cfg.bias else 0
    per_block = (3 * d * d + 3 * d * b) + (d * d + d * b) + (r * d * d + r * d * b) + (r * d * d + d * b) + 2 * (d + d * b)
    n = L * per_block + (d + d * b)
    if embeddings:
        n += V * d + T * d
    return n


def flops_per_token(cfg: ModelConfig) -> int:
    """Training FLOPs per token (forward + backward), PaLM appendix B convention:
    6·(non-embedding params + the tied output projection V·d) + 12·n_layer·d_model·seq_len (attention)."""
    V = cfg.vocab_size or 0
    return 6 * (count_params(cfg, embeddings=False) + V * cfg.d_model) + 12 * cfg.n_layer * cfg.d_model * cfg.seq_len


def _check(cfg: ModelConfig) -> None:
    if cfg.d_model % cfg.n_head:
        raise ConfigError(f"model.n_head={cfg.n_head} must divide model.d_model={cfg.d_model}")


FAMILY = ModelFamily(build=GPT, count_params=count_params, flops_per_token=flops_per_token, check=_check,
                     describe=lambda cfg: f"a {cfg.n_layer}-layer GPT (d={cfg.d_model})", stackable=True)
"""The built-in GPT (``model.family = 'gpt'``)."""

