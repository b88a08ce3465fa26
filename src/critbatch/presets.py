"""Size presets: Python functions returning a complete :class:`TrainConfig`.

``tiny`` and ``mini`` train at a useful speed on a 2-core CPU; the others are for GPUs. Every
preset's vocabulary comes from the data unless set.
"""

from __future__ import annotations

from typing import Callable

from .config import DataConfig, LRScheduleConfig, ModelConfig, OptimConfig, TrainConfig
from .errors import ConfigError


def tiny() -> TrainConfig:
    """0.36M parameters (d=96, 3 layers, sequence 64) on bytes: the CPU reference model of docs/method.md §6."""
    return TrainConfig(
        model=ModelConfig(n_layer=3, n_head=4, d_model=96, seq_len=64),
        optim=OptimConfig(lr=3e-3),
        lr_schedule=LRScheduleConfig(kind="constant", warmup_tokens=20_000),
        data=DataConfig(tokenizer="bytes"),
        total_tokens=1_000_000,
        batch_seqs=8,
        eval_seqs=256,
    )


def mini() -> TrainConfig:
    """About 1.8M parameters (d=192, 4 layers, sequence 128): still CPU-sized, slower."""
    return TrainConfig(
        model=ModelConfig(n_layer=4, n_head=6, d_model=192, seq_len=128),
        optim=OptimConfig(lr=2e-3),
        lr_schedule=LRScheduleConfig(kind="constant", warmup_tokens=50_000),
        data=DataConfig(tokenizer="bytes"),
        total_tokens=2_000_000,
        batch_seqs=8,
        eval_seqs=256,
    )


def small() -> TrainConfig:
    """About 10.8M parameters (d=384, 6 layers, sequence 256), BPE-8192: a single-GPU study model."""
    return TrainConfig(
        model=ModelConfig(n_layer=6, n_head=6, d_model=384, seq_len=256),
        optim=OptimConfig(lr=1e-3),
        lr_schedule=LRScheduleConfig(kind="cosine", warmup_tokens=1_000_000),
        data=DataConfig(tokenizer="bpe", bpe_vocab_size=8192),
        total_tokens=20_000_000,
        batch_seqs=32,
        eval_seqs=512,
    )


def gpt2_small() -> TrainConfig:
    """GPT-2 small shape (d=768, 12 layers, sequence 1024): bring your own token files."""
    return TrainConfig(
        model=ModelConfig(n_layer=12, n_head=12, d_model=768, seq_len=1024),
        optim=OptimConfig(lr=6e-4),
        lr_schedule=LRScheduleConfig(kind="cosine", warmup_tokens=100_000_000),
        data=DataConfig(tokenizer="bpe", bpe_vocab_size=8192),
        total_tokens=10_000_000_000,
        batch_seqs=512,
        micro_batch_seqs=16,
        eval_seqs=1024,
    )


def olmo_1b() -> TrainConfig:
    """OLMo-1B-like shape (d=2048, 16 layers, sequence 4096, batch 1024 documents, lr 4e-4):
    the scale of Merrill et al. 2025; for multi-GPU runs on your own tokens."""
    return TrainConfig(
        model=ModelConfig(n_layer=16, n_head=16, d_model=2048, seq_len=4096),
        optim=OptimConfig(lr=4e-4),
        lr_schedule=LRScheduleConfig(kind="cosine", warmup_tokens=2_000_000_000),
        data=DataConfig(tokenizer="bpe", bpe_vocab_size=8192),
        total_tokens=600_000_000_000,
        batch_seqs=1024,
        micro_batch_seqs=4,
        eval_seqs=1024,
    )


def demo() -> TrainConfig:
    """The demo study's base run: the tiny model on the SOTU bytes, 1M tokens, checkpoints at
    log-spaced token counts (docs/LOG.md records how it was tuned to show the CBS growing)."""
    return TrainConfig(
        model=ModelConfig(n_layer=3, n_head=4, d_model=96, seq_len=64),
        optim=OptimConfig(lr=3e-3),
        lr_schedule=LRScheduleConfig(kind="constant", warmup_tokens=10_000),
        data=DataConfig(tokenizer="bytes"),
        total_tokens=1_000_000,
        batch_seqs=8,
        checkpoint_tokens=[20_000, 60_000, 200_000, 600_000],
        eval_seqs=2048,
        eval_interval_tokens=100_000,
    )


PRESETS: dict[str, Callable[[], TrainConfig]] = {
    "tiny": tiny,
    "demo": demo,
    "mini": mini,
    "small": small,
    "gpt2-small": gpt2_small,
    "olmo-1b": olmo_1b,
}


def get(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; accepted: {', '.join(PRESETS)}")
    return PRESETS[name]()
