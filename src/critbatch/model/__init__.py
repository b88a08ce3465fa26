"""Model families behind one interface: the built-in GPT (``family='gpt'``) and causal LMs from
Hugging Face ``transformers`` (``family='hf'``). Each answers what the rest of the code asks: build
it (seeded by the caller), the summed loss of a batch of sequences (``seq_loss_sums``, ``loss_sum``),
its parameter count and training FLOPs per token, and the modules FSDP wraps one by one."""

from __future__ import annotations

import torch.nn as nn

from ..config import ModelConfig
from . import gpt
from .gpt import GPT


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.family == "hf":
        from .hf import HFCausalLM  # transformers is an optional dependency

        return HFCausalLM(cfg)
    return GPT(cfg)


def count_params(cfg: ModelConfig, embeddings: bool = True) -> int:
    """Parameters (tied embeddings counted once); without embeddings: the non-embedding ones."""
    if cfg.family == "hf":
        from .hf import hf_shape

        s = hf_shape(cfg)
        return s["params"] if embeddings else s["non_embedding"]
    return gpt.count_params(cfg, embeddings)


def flops_per_token(cfg: ModelConfig) -> int:
    """Training FLOPs per token (forward + backward), PaLM appendix B convention:
    6·(non-embedding parameters + the output projection V·d) + 12·n_layer·d_model·seq_len."""
    if cfg.family == "hf":
        from .hf import hf_shape

        s = hf_shape(cfg)
        return 6 * (s["non_embedding"] + s["head"]) + 12 * s["n_layer"] * s["d_model"] * cfg.seq_len
    return gpt.flops_per_token(cfg)


def dropout_probabilities(cfg: ModelConfig) -> dict[str, float]:
    """The model's dropout probabilities that are not 0 (the built-in GPT has none; a transformers
    config may, e.g. GPT-2's ``resid_pdrop`` 0.1). A model with any draws random numbers as it
    trains, so a run started at a later checkpoint does not repeat another's steps."""
    if cfg.family == "hf":
        from .hf import hf_config

        fields = hf_config(cfg).to_dict()
        return {k: float(v) for k, v in sorted(fields.items())
                if ("dropout" in k or "pdrop" in k) and isinstance(v, (int, float)) and not isinstance(v, bool) and v}
    return {}


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The submodules that ``fully_shard`` wraps one by one (transformer blocks / decoder layers)."""
    return model.fsdp_units()


__all__ = ["GPT", "build_model", "count_params", "dropout_probabilities", "flops_per_token", "fsdp_units"]
