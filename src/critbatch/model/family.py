"""The model-family protocol: everything the rest of critbatch asks of a model, in one place.

A family is registered under a name in :data:`critbatch.registry.MODEL_FAMILIES`
(``ModelConfig.family`` takes its values from there) and answers:

- ``build(cfg)``: the ``nn.Module`` (seeded by the caller). Its forward maps (B, T) token ids to
  (B, T, vocab) logits; mix in :class:`critbatch.model.losses.NextTokenLosses` for the summed
  sequence losses (``loss_sum``, ``seq_loss_sums``) that training and evaluation use, and give it a
  ``fsdp_units()`` method (the submodules FSDP wraps one by one; ``[]``: the whole model as one);
- ``count_params(cfg, embeddings)`` and ``flops_per_token(cfg)`` (training FLOPs per token);
- ``dropout_probabilities(cfg)``: the non-zero dropout probabilities (a model that draws random
  numbers as it trains: a run started at a later checkpoint does not repeat another's steps);
- ``vocab_size(cfg)``: a vocabulary the model fixes itself, or ``None`` (it takes the data's);
- ``check(cfg)``: raise ConfigError for a config the family cannot build (before anything is written);
- ``resolve(cfg)``: the config with everything it refers to recorded in it (a file's fields, absolute
  paths), so a run's saved config says exactly which model it trained and its branches train the same
  one from any directory;
- ``describe(cfg)``: a few words for reports; ``stackable``: whether its runs can train as one
  stacked model (:mod:`critbatch.train.stacked`, which rewrites attention for ``vmap``).

Adding a family is one module that defines such an object and one ``MODEL_FAMILIES.register`` call
(docs/guide.md, "Extending critbatch", has a worked example; ``tests/test_extending.py`` registers one
from outside the package and trains it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from ..config import ModelConfig


@dataclass(frozen=True)
class ModelFamily:
    """One model family's answers (see the module docstring)."""

    build: Callable[[ModelConfig], nn.Module]
    count_params: Callable[[ModelConfig, bool], int]
    flops_per_token: Callable[[ModelConfig], int]
    dropout_probabilities: Callable[[ModelConfig], dict] = lambda cfg: {}
    vocab_size: Callable[[ModelConfig], int | None] = lambda cfg: None
    check: Callable[[ModelConfig], None] = lambda cfg: None
    resolve: Callable[[ModelConfig], ModelConfig] = lambda cfg: cfg
    describe: Callable[[ModelConfig], str] = lambda cfg: "a model"
    stackable: bool = False
