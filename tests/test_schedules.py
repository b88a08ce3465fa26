import math

import pytest

from critbatch.config import LRScheduleConfig
from critbatch.errors import ConfigError
from critbatch.optim import lr_rule_multiplier, lr_schedule_factor
from critbatch.schedules import BatchSchedule


def test_lr_rules():
    assert lr_rule_multiplier("sqrt", 16, 4) == 2.0
    assert lr_rule_multiplier("linear", 16, 4) == 4.0
    assert lr_rule_multiplier("none", 16, 4) == 1.0
    assert lr_rule_multiplier("sqrt", 1, 4) == 0.5  # fractional k
    with pytest.raises(ConfigError, match="cube"):
        lr_rule_multiplier("cube", 1, 1)


def test_lr_schedules_are_functions_of_tokens():
    c = LRScheduleConfig(kind="cosine", warmup_tokens=100, horizon_tokens=1100, min_lr_ratio=0.1)
    assert lr_schedule_factor(c, 0) == 0.0
    assert lr_schedule_factor(c, 50) == 0.5
    assert lr_schedule_factor(c, 100) == pytest.approx(1.0)
    assert lr_schedule_factor(c, 600) == pytest.approx(0.55)
    assert lr_schedule_factor(c, 1100) == pytest.approx(0.1)
    assert lr_schedule_factor(c, 5000) == pytest.approx(0.1)
    w = LRScheduleConfig(kind="wsd", warmup_tokens=100, horizon_tokens=1000, decay_tokens=200)
    assert lr_schedule_factor(w, 500) == 1.0
    assert lr_schedule_factor(w, 800) == 1.0
    assert lr_schedule_factor(w, 900) == pytest.approx(0.5)
    assert lr_schedule_factor(w, 1000) == 0.0
    k = LRScheduleConfig(kind="constant", warmup_tokens=0, horizon_tokens=10)
    assert lr_schedule_factor(k, 10**9) == 1.0


def test_batch_schedule_parse_forms(tmp_path):
    a = BatchSchedule.parse("0:32,50M:64,150M:128", seq_len=4096)
    b = BatchSchedule.parse({"0": 32, "50M": 64, "150M": 128}, seq_len=4096)
    c = BatchSchedule.parse([[0, 32], [50e6, 64], [150e6, 128]], seq_len=4096)
    assert a.phases == b.phases == c.phases == ((0, 32), (50_000_000, 64), (150_000_000, 128))
    p = tmp_path / "s.json"
    import json

    p.write_text(json.dumps(a.to_dict()))
    d = BatchSchedule.parse(str(p), seq_len=4096)
    assert d.phases == a.phases and d.rule == "sqrt" and d.reference == 32


def test_batch_schedule_queries():
    s = BatchSchedule.parse("0:4,1000:8,3000:16", seq_len=10)
    assert [s.batch_seqs_at(t) for t in (0, 999, 1000, 2999, 3000, 10**9)] == [4, 4, 8, 8, 16, 16]
    assert s.lr_multiplier_at(0) == 1.0
    assert s.lr_multiplier_at(1000) == pytest.approx(math.sqrt(2))
    assert s.lr_multiplier_at(3000) == pytest.approx(2.0)
    assert s.accum_steps_at(3000, micro_batch_seqs=2, world_size=2) == 4
    # 1000 tokens at 40 tokens/step = 25 steps; 2000 at 80 = 25 steps; then 16 seqs=160 tokens.
    assert s.walk(0, 3000) == (50, 3000)
    assert s.walk(0, 3100) == (51, 3160)
    # A phase starting mid-step applies from the next step that starts at or after it.
    t = BatchSchedule.parse("0:3,100:6", seq_len=10)  # 30 tokens/step: steps start at 0,30,60,90,120
    assert t.walk(0, 120) == (4, 120)
    assert t.batch_seqs_at(90) == 3 and t.batch_seqs_at(120) == 6


@pytest.mark.parametrize("spec,needle", [
    ("0:32,50M:16,40M:64", "not increasing"),
    ("10:32", "must start at 0"),
    ("0:0", "must be positive"),
    ("0=32", "START_TOKENS:BATCH_SEQS"),
])
def test_batch_schedule_rejects(spec, needle):
    with pytest.raises(ConfigError, match=needle):
        BatchSchedule.parse(spec, seq_len=16)


def test_divisibility_names_the_phase():
    s = BatchSchedule.parse("0:8,1000:12", seq_len=16)
    s.check_divisible(4, 1)  # 8 and 12 both divide by 4
    with pytest.raises(ConfigError, match="phase 1 .from 1000 tokens"):
        s.check_divisible(4, 2)


def test_anneal_after_the_horizon():
    c = LRScheduleConfig(kind="constant", warmup_tokens=0, horizon_tokens=1000, anneal_tokens=500)
    assert lr_schedule_factor(c, 1000) == 1.0
    assert lr_schedule_factor(c, 1250) == pytest.approx(0.5)
    assert lr_schedule_factor(c, 1500) == 0.0
    k = LRScheduleConfig(kind="cosine", warmup_tokens=0, horizon_tokens=1000, min_lr_ratio=0.1, anneal_tokens=100)
    assert lr_schedule_factor(k, 1050) == pytest.approx(0.05)
