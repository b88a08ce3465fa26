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
    """OLMo-1B's size on the built-in GPT block (d=2048, 16 layers, sequence 4096, batch 1024
    documents, lr 4e-4); ``olmo2-1b`` is OLMo-2's own architecture."""
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


def _hf_tiny(model_type: str, **extra) -> TrainConfig:
    cfg = tiny()
    cfg.model = ModelConfig(family="hf", seq_len=64, hf={
        "model_type": model_type, "hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 3,
        "num_attention_heads": 4, "max_position_embeddings": 64, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
        **extra})
    return cfg


def olmo2_tiny() -> TrainConfig:
    """OLMo-2 blocks (RMSNorm after attention and MLP, QK-norm, SwiGLU, RoPE) at the tiny size: d=96,
    3 layers, 4 heads, sequence 64, bytes; transformers' Olmo2ForCausalLM, CPU-sized."""
    return _hf_tiny("olmo2", num_key_value_heads=4, tie_word_embeddings=False)


def llama_tiny() -> TrainConfig:
    """Llama blocks (pre-RMSNorm, SwiGLU, RoPE, grouped-query attention: 2 KV heads) at the tiny size;
    transformers' LlamaForCausalLM, CPU-sized."""
    return _hf_tiny("llama", num_key_value_heads=2, tie_word_embeddings=False)


def olmo2_1b() -> TrainConfig:
    """OLMo-2 1B's real architecture and dimensions (d=2048, 16 layers, 16 heads, MLP 8192, vocabulary
    100,352, RoPE theta 500k, sequence 4096), batch 1024 sequences, lr 4e-4: the scale of Merrill
    et al. 2025 on the model people train; for multi-GPU runs on your own tokens."""
    return TrainConfig(
        model=ModelConfig(family="hf", seq_len=4096, hf={
            "model_type": "olmo2", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 100_352,
            "max_position_embeddings": 4096, "rope_theta": 500_000.0, "rms_norm_eps": 1e-6,
            "initializer_range": 0.02, "tie_word_embeddings": False}),
        optim=OptimConfig(lr=4e-4),
        lr_schedule=LRScheduleConfig(kind="cosine", warmup_tokens=2_000_000_000),
        data=DataConfig(tokenizer="bpe", bpe_vocab_size=8192),
        total_tokens=600_000_000_000,
        batch_seqs=1024,
        micro_batch_seqs=4,
        eval_seqs=1024,
    )


PRESETS: dict[str, Callable[[], TrainConfig]] = {
    "tiny": tiny,
    "demo": demo,
    "mini": mini,
    "small": small,
    "gpt2-small": gpt2_small,
    "olmo-1b": olmo_1b,
    "olmo2-tiny": olmo2_tiny,
    "llama-tiny": llama_tiny,
    "olmo2-1b": olmo2_1b,
}


def get(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; accepted: {', '.join(PRESETS)}")
    return PRESETS[name]()
