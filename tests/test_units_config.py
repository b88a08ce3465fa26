import json

import pytest

from critbatch.config import TrainConfig, config_hash, from_dict, load_config_file, merge, to_dict, validate
from critbatch.errors import ConfigError
from critbatch.units import fmt_count, parse_count, parse_count_list, steps_for_tokens


@pytest.mark.parametrize("text,expect", [
    ("4096", 4096), ("100k", 100_000), ("50M", 50_000_000), ("2.5e6", 2_500_000), ("1.6M", 1_600_000),
    ("2_000_000", 2_000_000), ("168B", 168_000_000_000), (12, 12), (3.0, 3), ("0", 0),
])
def test_parse_count_accepts(text, expect):
    assert parse_count(text) == expect


@pytest.mark.parametrize("text", ["-5", "1.5", "abc", "10x", "", "1e-3", True, float("nan")])
def test_parse_count_rejects_with_the_value_named(text):
    with pytest.raises(ConfigError) as e:
        parse_count(text, "total tokens")
    assert "total tokens" in str(e.value)


def test_count_list_and_helpers():
    assert parse_count_list("400k,100k,1.6M,100k") == [100_000, 400_000, 1_600_000]
    assert fmt_count(12_582_912) == "12.6M"
    assert steps_for_tokens(1000, 256) == 4


def test_from_dict_is_strict_and_converts_counts():
    cfg = from_dict(TrainConfig, {"total_tokens": "2M", "optim": {"lr": "1e-3"}, "checkpoint_tokens": ["100k", 5]})
    assert cfg.total_tokens == 2_000_000 and cfg.optim.lr == 1e-3 and cfg.checkpoint_tokens == [100_000, 5]
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        from_dict(TrainConfig, {"optim": {"lrr": 1}})
    with pytest.raises(ConfigError, match="unknown config key 'batch_size'"):
        from_dict(TrainConfig, {"batch_size": 4})


def test_round_trip_and_hash_stability():
    cfg = merge(TrainConfig(), {"model": {"d_model": 128}})
    again = from_dict(TrainConfig, json.loads(json.dumps(to_dict(cfg))))
    assert again == cfg
    assert config_hash(cfg) == config_hash(again)
    assert config_hash(cfg) != config_hash(TrainConfig())


@pytest.mark.parametrize("over,needle", [
    ({"optim": {"lr": 0.0}}, "learning rate"),
    ({"optim": {"lr": -1.0}}, "learning rate"),
    ({"total_tokens": 0}, "total_tokens"),
    ({"model": {"n_head": 5}}, "must divide"),
    ({"optim": {"lr_rule": "cube"}}, "lr_rule"),
    ({"lr_schedule": {"kind": "wsd", "decay_tokens": 0}}, "decay_tokens"),
])
def test_validate_rejects(over, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(merge(TrainConfig(), over))


def test_config_files(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"total_tokens": "10k"}))
    (tmp_path / "c.toml").write_text('total_tokens = "20k"\n[optim]\nlr = 0.01\n')
    assert load_config_file(str(tmp_path / "c.json")) == {"total_tokens": "10k"}
    assert load_config_file(str(tmp_path / "c.toml"))["optim"]["lr"] == 0.01
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config_file(str(tmp_path / "bad.json"))


def test_toml_on_python_3_10_uses_tomli_or_says_what_to_install(tmp_path, monkeypatch):
    """Python 3.10 has no tomllib: the tomli package reads the file; without it, a one-line error."""
    import sys
    import types

    from critbatch.config import load_config_file

    p = tmp_path / "c.toml"
    p.write_text('total_tokens = "20k"\n')
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on 3.10: importing it fails
    fake = types.ModuleType("tomli")
    fake.loads = lambda text: {"read_by": "tomli"}
    monkeypatch.setitem(sys.modules, "tomli", fake)
    assert load_config_file(str(p)) == {"read_by": "tomli"}
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(ConfigError, match="need Python 3.11\\+ or the tomli package"):
        load_config_file(str(p))
