"""Model families behind one interface (:class:`critbatch.model.family.ModelFamily`), looked up in
:data:`critbatch.registry.MODEL_FAMILIES` by ``ModelConfig.family``: the built-in GPT (``gpt``) and
causal LMs from Hugging Face ``transformers`` (``hf``). Nothing outside a family's own module knows
which family it is running."""

from __future__ import annotations

import torch.nn as nn

from ..config import ModelConfig
from ..registry import MODEL_FAMILIES
from .family import ModelFamily
from .gpt import GPT


def family(cfg: ModelConfig) -> ModelFamily:
    """The registered family of ``cfg`` (a ConfigError naming the accepted ones when unknown)."""
    return MODEL_FAMILIES[cfg.family]


def build_model(cfg: ModelConfig) -> nn.Module:
    return family(cfg).build(cfg)


def count_params(cfg: ModelConfig, embeddings: bool = True) -> int:
    """Parameters (tied embeddings counted once); without embeddings: the non-embedding ones."""
    return family(cfg).count_params(cfg, embeddings)


def flops_per_token(cfg: ModelConfig) -> int:
    """Training FLOPs per token (forward + backward), PaLM appendix B convention:
    6·(non-embedding parameters + the output projection V·d) + 12·n_layer·d_model·seq_len."""
    return family(cfg).flops_per_token(cfg)


def dropout_probabilities(cfg: ModelConfig) -> dict[str, float]:
    """The model's dropout probabilities that are not 0 (the built-in GPT has none; a transformers
    config may, e.g. GPT-2's ``resid_pdrop`` 0.1). A model with any draws random numbers as it
    trains, so a run started at a later checkpoint does not repeat another's steps."""
    return family(cfg).dropout_probabilities(cfg)


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The submodules that ``fully_shard`` wraps one by one (transformer blocks / decoder layers)."""
    return model.fsdp_units()


__all__ = ["GPT", "ModelFamily", "family", "build_model", "count_params", "dropout_probabilities", "flops_per_token",
           "fsdp_units"]
