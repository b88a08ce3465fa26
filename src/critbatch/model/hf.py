"""Causal language models from Hugging Face ``transformers``: OLMo-2, Llama, Qwen, GPT-NeoX, ... built
from a config (never downloaded), optionally with local weights, behind the same interface as the
built-in GPT: ``forward(idx) -> logits``, ``seq_loss_sums``, ``loss_sum``, and the decoder layers that
FSDP wraps one by one.

``ModelConfig.hf`` is one of

* a mapping with ``model_type`` and the config's fields, e.g. ``{"model_type": "olmo2",
  "hidden_size": 64, "num_hidden_layers": 2, ...}`` (``vocab_size`` defaults to the data's);
* a path to a ``config.json`` file, or to a local directory holding one (e.g. a model downloaded
  with ``huggingface-cli download ID --local-dir DIR`` on a machine with network).

``ModelConfig.hf_weights`` optionally names a local directory with ``*.safetensors`` (one file or
shards with an index) to start from. Nothing here reaches the network.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..errors import ConfigError
from .family import ModelFamily
from .losses import NextTokenLosses

# token ids a generation config carries: critbatch never generates, and ids outside a small
# vocabulary make transformers warn, so they are dropped unless the config sets them in range
_SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing is fetched
    try:
        import transformers
    except ImportError:
        raise ConfigError("model.family 'hf' needs the transformers package: pip install transformers "
                          "(with a constraint that keeps your torch)") from None
    return transformers


def _config_fields(spec) -> dict:
    """The config's fields from an inline mapping, a config.json file or a local model directory."""
    if isinstance(spec, dict):
        fields = dict(spec)
        if "model_type" not in fields:
            raise ConfigError(f"model.hf {spec!r} needs a model_type (e.g. olmo2, llama, qwen2, gpt_neox)")
        return fields
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"model.hf={spec!r} must be a mapping with model_type, a config.json or a local directory")
    p = Path(spec)
    if p.is_dir():
        p = p / "config.json"
        if not p.is_file():
            raise ConfigError(f"model.hf {spec!r} is a directory without config.json")
    elif not p.is_file():
        raise ConfigError(f"model.hf {spec!r} is not a local file or directory, and critbatch never downloads: fetch "
                          f"it where there is network (huggingface-cli download {spec} --local-dir DIR) and pass DIR")
    try:
        fields = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"model.hf config {str(p)!r} is not valid JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(fields, dict) or "model_type" not in fields:
        raise ConfigError(f"model.hf config {str(p)!r} has no model_type")
    return fields


def hf_config(cfg: ModelConfig):
    """The ``transformers`` config of a ModelConfig with ``family='hf'`` (vocabulary resolved)."""
    tr = _transformers()
    fields = _config_fields(cfg.hf)
    model_type = fields.pop("model_type")
    fields.pop("architectures", None)
    fields.pop("transformers_version", None)
    if cfg.vocab_size is not None:
        fields.setdefault("vocab_size", cfg.vocab_size)
    for key in _SPECIAL_IDS:
        v = fields.get(key)
        if v is None or not isinstance(v, int) or v >= fields.get("vocab_size", 1 << 62):
            fields[key] = None
    fields.setdefault("max_position_embeddings", cfg.seq_len)
    try:
        hc = tr.AutoConfig.for_model(model_type, **fields)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"transformers cannot build a {model_type!r} config from model.hf: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if hc.max_position_embeddings < cfg.seq_len:
        raise ConfigError(f"model.seq_len={cfg.seq_len} exceeds the model's max_position_embeddings "
                          f"{hc.max_position_embeddings}")
    hc.use_cache = False
    return hc


def _load_weights(module: nn.Module, directory: str) -> None:
    from safetensors.torch import load_file

    d = Path(directory)
    files = sorted(d.glob("*.safetensors")) if d.is_dir() else []
    if not files:
        raise ConfigError(f"model.hf_weights {directory!r} holds no *.safetensors (critbatch reads local weights only)")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = module.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(module.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ConfigError(f"model.hf_weights {directory!r} does not match the config: missing "
                          f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}")


class HFCausalLM(NextTokenLosses, nn.Module):
    """A ``transformers`` causal LM, seeded like every critbatch model (the caller seeds torch)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        tr = _transformers()
        self.cfg = cfg
        hc = hf_config(cfg)
        try:
            self.inner = tr.AutoModelForCausalLM.from_config(hc)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ConfigError(f"transformers cannot build a model from model.hf: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if cfg.hf_weights:
            _load_weights(self.inner, cfg.hf_weights)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) int64 -> logits (B, T, vocab)."""
        return self.inner(input_ids=idx, use_cache=False).logits

    def fsdp_units(self) -> list[nn.Module]:
        """The decoder layers, each its own FSDP unit."""
        return list(self.inner.model.layers)


def hf_shape(cfg: ModelConfig) -> dict:
    """(layers, width, vocab) and parameter counts of an HF model, from a copy built on the meta device."""
    hc = hf_config(cfg)
    with torch.device("meta"):
        m = _transformers().AutoModelForCausalLM.from_config(hc)
    total = sum(p.numel() for p in m.parameters())
    emb = m.get_input_embeddings().weight.numel()
    out = m.get_output_embeddings()
    tied = out is None or out.weight is m.get_input_embeddings().weight
    head = 0 if tied else out.weight.numel()
    return {"n_layer": hc.num_hidden_layers, "d_model": hc.hidden_size, "vocab_size": hc.vocab_size,
            "params": total, "non_embedding": total - emb - head, "head": hc.vocab_size * hc.hidden_size}


def _count_params(cfg: ModelConfig, embeddings: bool = True) -> int:
    s = hf_shape(cfg)
    return s["params"] if embeddings else s["non_embedding"]


def _flops_per_token(cfg: ModelConfig) -> int:
    """6·(non-embedding parameters + the output projection V·d) + 12·n_layer·d_model·seq_len."""
    s = hf_shape(cfg)
    return 6 * (s["non_embedding"] + s["head"]) + 12 * s["n_layer"] * s["d_model"] * cfg.seq_len


def _dropout_probabilities(cfg: ModelConfig) -> dict[str, float]:
    fields = hf_config(cfg).to_dict()
    return {k: float(v) for k, v in sorted(fields.items())
            if ("dropout" in k or "pdrop" in k) and isinstance(v, (int, float)) and not isinstance(v, bool) and v}


def _check(cfg: ModelConfig) -> None:
    if cfg.hf in (None, "", {}):
        raise ConfigError("model.family 'hf' needs model.hf: a mapping with model_type, a config.json or a local "
                          "model directory")


def _resolve(cfg: ModelConfig) -> ModelConfig:
    """``model.hf`` as its fields (a config.json or a model directory read now, so the run records the
    model it trains and a later edit of the file cannot change what its branches train) and
    ``hf_weights`` as an absolute path."""
    fields = _config_fields(cfg.hf)
    for key in ("architectures", "transformers_version", "_name_or_path"):
        fields.pop(key, None)
    weights = str(Path(cfg.hf_weights).resolve()) if cfg.hf_weights else None
    return dataclasses.replace(cfg, hf=fields, hf_weights=weights)


def _describe(cfg: ModelConfig) -> str:
    hf = cfg.hf
    if isinstance(hf, dict):
        return (f"a {hf.get('model_type', 'transformers')} model from transformers ({hf.get('num_hidden_layers', '?')} "
                f"layers, d={hf.get('hidden_size', '?')})")
    return f"a transformers model from {hf}"


FAMILY = ModelFamily(build=HFCausalLM, count_params=_count_params, flops_per_token=_flops_per_token,
                     dropout_probabilities=_dropout_probabilities, vocab_size=lambda cfg: hf_config(cfg).vocab_size,
                     check=_check, resolve=_resolve, describe=_describe, stackable=False)
"""Causal LMs from ``transformers`` (``model.family = 'hf'``); transformers is imported on first use."""

