import pytest
import torch

from critbatch import presets
from critbatch.config import ModelConfig
from critbatch.model import GPT, build_model, count_params, flops_per_token


def test_param_count_and_flops():
    cfg = ModelConfig(n_layer=3, n_head=4, d_model=96, seq_len=64, vocab_size=257)
    m = GPT(cfg)
    assert sum(p.numel() for p in m.parameters()) == count_params(cfg)
    assert 0.35e6 < count_params(cfg) < 0.37e6  # the 0.36M reference model of docs/method.md §6
    nonemb = count_params(cfg, embeddings=False)
    assert flops_per_token(cfg) == 6 * (nonemb + 257 * 96) + 12 * 3 * 96 * 64
    b = ModelConfig(n_layer=2, n_head=2, d_model=16, seq_len=8, vocab_size=20, bias=True)
    assert sum(p.numel() for p in GPT(b).parameters()) == count_params(b)


def test_causal_and_tied():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=32, seq_len=16, vocab_size=50)
    m = GPT(cfg)
    x = torch.randint(0, 50, (2, 16))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 50
    with torch.no_grad():
        a, b = m(x), m(y)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)  # the future does not leak
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    assert m.wte.weight.data_ptr() == dict(m.named_parameters())["wte.weight"].data_ptr()
    assert "lm_head.weight" not in dict(m.named_parameters())


def test_init_scales():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=8, n_head=4, d_model=256, seq_len=16, vocab_size=1000)
    m = GPT(cfg)
    assert m.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.blocks[0].mlp.proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # 1/sqrt(2*8)


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_every_preset_builds(name):
    cfg = presets.get(name)
    from critbatch.config import validate

    validate(cfg)
    mc = ModelConfig(**{**cfg.model.__dict__, "vocab_size": 8192})
    with torch.device("meta"):
        m = build_model(mc)  # the family's own model: GPT or an HF causal LM
    assert sum(p.numel() for p in m.parameters()) == count_params(mc)
    assert flops_per_token(mc) > 6 * count_params(mc, embeddings=False)


def test_unknown_preset():
    from critbatch.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown preset 'huge'; accepted: tiny"):
        presets.get("huge")
