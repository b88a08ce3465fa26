"""Batch-size warmup: derivation from planted CBS curves, exports, step accounting, the comparison."""

import json
from pathlib import Path
import math

import numpy as np
import pytest
import torch

from conftest import small_cfg
from critbatch.errors import ConfigError
from critbatch.schedules import BatchSchedule
from critbatch.analysis.schedule import derive_schedule
from critbatch.schedules.export import (parse_megatron, schedule_document, to_megatron, to_olmo_core,
                                        validate_olmo_core)

T = 64


def fit_curve(b_max_seqs, t_s, c, points=(1e5, 1e6, 1e7)):
    """A planted cbs.json: the fit in tokens plus measured intervals around it."""
    pts = []
    for t in points:
        v = b_max_seqs * (t / t_s) ** c / (1 + (t / t_s) ** c)
        lo = 2 ** math.floor(math.log2(v))
        pts.append({"tokens": int(t), "cbs_low_seqs": lo, "cbs_high_seqs": 2 * lo, "base_batch_seqs": 8})
    return {"seq_len": T, "lr_rule": "sqrt", "decide_by": "eval", "rule": "eps", "points": pts,
            "fit": {"b_max": b_max_seqs * T, "t_s": t_s, "c": c}}


def measured_curve(points):
    return {"seq_len": T, "lr_rule": "sqrt", "decide_by": "eval", "rule": "eps", "fit": None,
            "points": [{"tokens": t, "cbs_low_seqs": lo, "cbs_high_seqs": hi, "base_batch_seqs": 8} for t, lo, hi in points]}


def inverse(b_max, t_s, c, y):
    return t_s * (y / (b_max - y)) ** (1 / c)


def batch_at(sched, t):
    return sched.batch_seqs_at(t)


def test_measured_source_steps_only_at_measured_points():
    """The rule: never above the lower bound of the last measured point at or before t (nor of any
    later point). Nothing is interpolated between points or extrapolated after the last."""
    curve = measured_curve([(100_000, 8, 16), (400_000, 32, 64), (1_600_000, 64, 128)])
    d = derive_schedule(curve, 8, source="measured")
    assert d.schedule.phases == ((0, 8), (400_000, 32), (1_600_000, 64))  # two doublings at once at 400k
    assert d.allowed == [(100_000, 8), (400_000, 32), (1_600_000, 64)]
    lr = [ph["lr_multiplier"] for ph in d.schedule.to_dict()["phases"]]
    assert lr == pytest.approx([1, 2, 2 * math.sqrt(2)])


def test_fit_can_only_delay_a_step():
    """Where the fit is below the measured bound it decides (a step between points); where it is
    above, the step waits for a measured point."""
    curve = measured_curve([(100_000, 32, 64), (1_000_000, 128, 256), (10_000_000, 128, 256)])
    curve["fit"] = {"b_max": 256 * T, "t_s": 3e6, "c": 0.8}
    d = derive_schedule(curve, 8, source="fit", max_seqs=64)
    (t1, b1), (t2, b2), (t3, b3) = d.schedule.phases[1:]
    # 16 and 32: the fit is the lower bound (it reaches them after the 100k point allowed 32)
    assert b1 == 16 and inverse(256, 3e6, 0.8, 16) <= t1 < inverse(256, 3e6, 0.8, 16) + T + 1
    assert b2 == 32 and inverse(256, 3e6, 0.8, 32) <= t2 < inverse(256, 3e6, 0.8, 32) + T + 1
    # 64: the fit reaches it at ~759k, but until the 1M point only 32 is measured to be safe
    assert inverse(256, 3e6, 0.8, 64) < 1_000_000 and (t3, b3) == (1_000_000, 64)
    assert d.source == "fit" and any("capped" in n for n in d.notes)
    plain = derive_schedule(curve, 8, source="measured", max_seqs=64)
    assert plain.schedule.phases == ((0, 8), (100_032, 32), (1_000_000, 64))  # the fit only delayed


def test_the_demo_overshoot_cannot_happen():
    """The demo's fit put batch 32 at 273k tokens where 16 had failed at 200k: the measured lower
    bound (8 at 200k) now caps it until the next point."""
    curve = {"seq_len": T, "lr_rule": "sqrt", "decide_by": "eval", "rule": "eps",
             "fit": {"b_max": 200 * T, "t_s": 3e5, "c": 1.5},
             "points": [{"tokens": 20_000, "cbs_low_seqs": 0, "cbs_high_seqs": 8},
                        {"tokens": 60_000, "cbs_low_seqs": 8, "cbs_high_seqs": 16},
                        {"tokens": 200_000, "cbs_low_seqs": 8, "cbs_high_seqs": 16},
                        {"tokens": 600_000, "cbs_low_seqs": 80, "cbs_high_seqs": 96}]}
    for source in ("fit", "measured"):
        d = derive_schedule(curve, 8, source=source, until_tokens=1_000_000)
        assert all(t >= 600_000 for t, _ in d.schedule.phases[1:]), (source, d.schedule.phases)
        assert batch_at(d.schedule, 599_999) == 8 and batch_at(d.schedule, 600_000) == 64
    assert any("below the start batch 8 at 20,000" in n for n in d.notes)


def test_a_later_point_caps_an_earlier_one():
    curve = measured_curve([(60_000, 16, 32), (200_000, 8, 16), (600_000, 80, 96)])
    d = derive_schedule(curve, 8, source="measured")
    assert d.schedule.phases == ((0, 8), (600_000, 64))
    assert d.allowed[0] == (60_000, 8) and any("capped at 8 by a later point" in n for n in d.notes)


@pytest.mark.parametrize("seed", range(20))
def test_never_above_a_measured_point_on_random_curves(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 6))
    ts = sorted(rng.choice(np.arange(1, 100) * 10_000, n, replace=False).tolist())
    pts = []
    for t in ts:
        lo = float(rng.choice([0, 4, 8, 12, 16, 24, 32, 64, 96, 128]))
        pts.append((int(t), lo, (lo or 4) * 2))
    curve = measured_curve(pts)
    curve["fit"] = {"b_max": float(rng.uniform(10, 500)) * T, "t_s": float(rng.uniform(1e4, 1e6)),
                    "c": float(rng.uniform(0.3, 3))}
    for source in ("measured", "fit"):
        for safety in (1.0, 1.5):
            d = derive_schedule(curve, 8, source=source, safety=safety, until_tokens=2_000_000)
            for t, b in d.schedule.phases[1:]:
                later = [lo for tp, lo, _ in pts if tp >= max((tp2 for tp2, _, _ in pts if tp2 <= t), default=0)]
                assert any(tp <= t for tp, _, _ in pts) and safety * b <= min(later) + 1e-9, (pts, d.schedule.phases)


def test_safety_factor_delays_steps():
    curve = measured_curve([(100_000, 16, 32), (400_000, 32, 64), (1_600_000, 64, 128)])
    a = derive_schedule(curve, 8, source="measured")
    b = derive_schedule(curve, 8, source="measured", safety=2.0)
    assert a.schedule.phases == ((0, 8), (100_032, 16), (400_000, 32), (1_600_000, 64))
    assert b.schedule.phases == ((0, 8), (400_000, 16), (1_600_000, 32))


def test_no_warmup_when_the_cbs_never_exceeds_b0():
    curve = measured_curve([(100_000, 4, 8), (1_000_000, 8, 16)])
    d = derive_schedule(curve, 8, source="measured")
    assert d.schedule.phases == ((0, 8),)
    assert any(n.startswith("no warmup") for n in d.notes)


def test_cbs_already_above_b0_at_the_first_point_jumps_there():
    curve = measured_curve([(100_000, 64, 128), (1_000_000, 128, 256)])
    d = derive_schedule(curve, 8, source="measured")
    assert d.schedule.phases[1] == (100_032, 64)  # three doublings at once, at the first measurement
    assert any("already above" in n for n in d.notes)


def test_cap_and_granularity():
    curve = measured_curve([(100_000, 16, 32), (400_000, 32, 64), (1_600_000, 64, 128)])
    d = derive_schedule(curve, 8, source="measured", max_seqs=32)
    assert [b for _, b in d.schedule.phases] == [8, 16, 32] and any("capped" in n for n in d.notes)
    g = derive_schedule(curve, 8, source="measured", granularity=8)
    assert g.schedule.phases == ((0, 8), (100_032, 16), (400_000, 32), (1_600_000, 64))
    g = derive_schedule(measured_curve([(100_000, 24, 32), (400_000, 56, 64)]), 8, source="measured", granularity=8)
    assert g.schedule.phases == ((0, 8), (100_032, 24), (400_000, 56))  # the largest multiple of g allowed
    with pytest.raises(ConfigError, match="granularity 3 must be positive and divide the start batch 8"):
        derive_schedule(curve, 8, granularity=3)
    with pytest.raises(ConfigError, match="max batch 4 is below the start batch 8"):
        derive_schedule(curve, 8, max_seqs=4)
    with pytest.raises(ConfigError, match="safety -1 must be a number > 0"):
        derive_schedule(curve, 8, safety=-1)


def test_adam_rule_travels_with_the_schedule():
    curve = measured_curve([(100_000, 16, 32)])
    d = derive_schedule(curve, 8, source="measured", adam_rule="sde")
    doc = schedule_document(d.schedule)
    assert doc["adam_rule"] == "sde"
    back = BatchSchedule.parse(json.loads(json.dumps(doc)), seq_len=T)
    assert back.adam_rule == "sde"
    b1, b2, eps = back.adam_at(100_032, 0.9, 0.95, 1e-8)
    assert (b1, b2, eps) == pytest.approx((1 - 2 * 0.1, 1 - 2 * 0.05, 1e-8 / math.sqrt(2)))
    assert back.adam_at(0, 0.9, 0.95, 1e-8) == (0.9, 0.95, 1e-8)


def test_exports_match_their_documented_forms():
    s = BatchSchedule.parse("0:1024,168B:2048,503B:4096", seq_len=4096)
    assert to_megatron(s) == "0:1024 168B:2048 503B:4096"
    assert parse_megatron(to_megatron(s)) == [(0, 1024), (168 * 10**9, 2048), (503 * 10**9, 4096)]
    o = to_olmo_core(s)
    assert o == {"batch_sizes": [1024 * 4096, 2048 * 4096, 4096 * 4096],
                 "schedule": [{"value": 0, "unit": "tokens"}, {"value": 168 * 10**9, "unit": "tokens"},
                              {"value": 503 * 10**9, "unit": "tokens"}]}
    assert validate_olmo_core(o, 4096) == [(0, 1024), (168 * 10**9, 2048), (503 * 10**9, 4096)]
    odd = BatchSchedule.parse("0:8,1000:24", seq_len=64)  # 8 -> 24 is an integer factor; 8 -> 12 is not
    validate_olmo_core(to_olmo_core(odd), 64)
    bad = BatchSchedule.parse("0:8,1000:12", seq_len=64)
    with pytest.raises(ConfigError, match="integer multiple"):
        to_olmo_core(bad)
    doc = schedule_document(bad)
    assert doc["exports"]["olmo_core_batch_size_scheduler"] is None and "integer multiple" in doc["exports"]["olmo_core_note"]
    assert parse_megatron(doc["exports"]["megatron_step_batch_size_schedule"]) == [(0, 8), (1000, 12)]
    with pytest.raises(ValueError):
        parse_megatron("10:8 20:16")  # the first threshold must be 0
    # schedule.json round-trips into BatchSchedule and keeps the rule and reference
    back = BatchSchedule.parse(json.loads(json.dumps(schedule_document(s))), seq_len=4096)
    assert back.phases == s.phases and back.rule == "sqrt" and back.reference == 1024


def test_paper_step_accounting_43_and_75_percent():
    """docs/method.md §4: 1024 -> 2048 at 168B -> 4096 at 503B documents of 4096 tokens, 608B tokens then
    a 50B anneal at the final batch."""
    total = 658 * 10**9
    warm = BatchSchedule.parse("0:1024,168B:2048,503B:4096", seq_len=4096)
    small = BatchSchedule.constant(1024, 4096)
    large = BatchSchedule.constant(4096, 4096)
    steps = {n: s.steps_between(0, total) for n, s in (("warm", warm), ("small", small), ("large", large))}
    assert round(100 * (1 - steps["warm"] / steps["small"])) == 43
    assert round(100 * (1 - steps["large"] / steps["small"])) == 75


def test_plain_loop_driven_by_batch_schedule_reproduces_the_trainer(cfg_factory, tmp_path):
    from critbatch.config import LRScheduleConfig
    from critbatch.io import read_jsonl
    from critbatch.optim import lr_schedule_factor
    from critbatch.train import train

    cfg = cfg_factory(batch_schedule=[[0, 2], [1000, 4], [2000, 16]], total_tokens=4096,
                      lr_schedule={"kind": "cosine", "warmup_tokens": 256})
    train(cfg, tmp_path / "r", progress=False)
    logged = [(r["train/batch_seqs"], r["optim/lr"]) for r in read_jsonl(tmp_path / "r" / "metrics.jsonl")
              if "train/loss" in r]
    sched = BatchSchedule.parse([[0, 2], [1000, 4], [2000, 16]], seq_len=16)
    lrs = LRScheduleConfig(**{**json.loads((tmp_path / "r" / "config.json").read_text())["lr_schedule"]})
    plain, tokens = [], 0
    while tokens < 4096:  # any PyTorch loop: ask the schedule, then step
        b = sched.batch_seqs_at(tokens)
        plain.append((b, cfg.optim.lr * sched.lr_multiplier_at(tokens) * lr_schedule_factor(lrs, tokens)))
        assert sched.accum_steps_at(tokens, micro_batch_seqs=2, world_size=1) == b // 2
        tokens += b * 16
    assert [b for b, _ in plain] == [b for b, _ in logged]
    assert [lr for _, lr in plain] == pytest.approx([lr for _, lr in logged], rel=1e-12)


# ---- the comparison ------------------------------------------------------------------------------


def compare_cfg(data_dir, out, **over):
    from critbatch.warmup import CompareConfig

    base = {"n_layer": 2, "n_head": 2, "d_model": 32, "seq_len": 16}
    cfg_file = out.parent / f"{out.name}-model.json"
    cfg_file.parent.mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(json.dumps({"model": base, "lr_schedule": {"kind": "constant", "warmup_tokens": 256},
                                    "eval_seqs": 16, "eval_interval_tokens": 1024}))
    kw = dict(out=str(out), schedule="0:2,1024:4,2048:8", config=str(cfg_file), data=str(data_dir),
              total_tokens=4096, anneal_tokens=1024, launcher="inprocess")
    kw.update(over)
    return CompareConfig(**kw)


def _numbers(comp: dict) -> dict:
    keys = ("final_train_loss", "final_eval_loss", "anneal_train_loss", "anneal_eval_loss", "optimizer_steps",
            "optimizer_steps_pretrain", "steps_saved_pct", "gap_to_small")
    return {n: {k: r.get(k) for k in keys} for n, r in comp["runs"].items()}


def test_runs_that_share_the_small_controls_steps_start_from_its_checkpoint(data_dir, tmp_path, monkeypatch):
    """The warmup takes the small control's steps until its first batch change (1024 tokens): it starts
    from the small control's checkpoint there and trains only the rest; given a finished run that took
    the same steps (a base run), the small control starts at its end and the warmup from its kept
    checkpoint. Every number equals the comparison that trains each run from scratch, bit for bit."""
    from critbatch.config import TrainConfig, merge
    from critbatch.io import read_json
    from critbatch.train import train
    from critbatch.warmup import run_compare

    whole = run_compare(compare_cfg(data_dir, tmp_path / "whole", share_prefix=False))
    assert whole["forks"] == {}
    shared = run_compare(compare_cfg(data_dir, tmp_path / "shared"))
    small = str((tmp_path / "shared" / "runs" / "s0" / "small").resolve())
    assert shared["forks"] == {"s0/warmup": {"source": small, "tokens": 1024, "checkpoint": None, "loss_ema": None}}
    res = read_json(tmp_path / "shared" / "runs" / "s0" / "warmup" / "result.json")
    assert res["start_tokens"] == 1024 and res["steps"] == 72 - 32 and res["global_step"] == 72
    assert _numbers(shared) == _numbers(whole)
    assert any("warmup (seed 0) starts at 1,024 tokens from the small control" in n for n in shared["notes"])
    assert "their wall time does not): s0/warmup at 1,024 tokens." in (tmp_path / "shared" / "comparison.md").read_text()

    spec = json.loads((tmp_path / "whole-model.json").read_text())
    base = tmp_path / "base"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the comparison's runs train (bit for bit needs the same thread count)
    try:
        train(merge(TrainConfig(), {**spec, "data": {"path": str(data_dir)}, "batch_seqs": 2, "total_tokens": 4096,
                                    "checkpoint_tokens": [1024]}), base, progress=False)
    finally:
        torch.set_num_threads(threads)
    from critbatch.warmup import compare as compare_mod

    dispatched, real_run_jobs = [], compare_mod.run_jobs

    def run_jobs(dirs, *a, **k):  # the order the runs are handed to the launcher in
        dispatched.append([Path(d).name for d in dirs])
        return real_run_jobs(dirs, *a, **k)

    monkeypatch.setattr(compare_mod, "run_jobs", run_jobs)
    pre = run_compare(compare_cfg(data_dir, tmp_path / "prefixed", prefix_runs=[str(base)]))
    assert {k: (f["tokens"], Path(f["source"]).name) for k, f in pre["forks"].items()} == \
        {"s0/small": (4096, "base"), "s0/warmup": (1024, "base")}
    # the longest first (5,120, 4,096 and 1,024 tokens to train): the large control from scratch does
    # not wait behind the forks, and the order changes no number
    assert dispatched == [["large", "warmup", "small"]]
    assert read_json(tmp_path / "prefixed" / "runs" / "s0" / "small" / "result.json")["steps"] == 1024 // 32  # the anneal
    assert _numbers(pre) == _numbers(whole)
    # a run that is not finished, or not a run, is refused
    from critbatch.errors import ConfigError

    with pytest.raises(ConfigError, match="prefix run .* is not finished"):
        run_compare(compare_cfg(data_dir, tmp_path / "bad", prefix_runs=[str(tmp_path)]))


def test_comparison_runs_and_reports(data_dir, tmp_path, monkeypatch):
    from critbatch.warmup import run_compare
    from critbatch.io import read_json
    from critbatch.train import Callback

    seen: dict[str, list[int]] = {}

    class Rec(Callback):
        name = "rec"

        def on_train_start(self, trainer):
            key = trainer.out_dir.name
            orig = trainer.stream.batch

            def batch(start, n):
                seen.setdefault(key, []).extend(range(start, start + n))
                return orig(start, n)

            trainer.stream.batch = batch

    from critbatch.train import job

    orig_make = job.make_callbacks
    monkeypatch.setattr(job, "make_callbacks", lambda names: [*orig_make(names), Rec()])
    out = tmp_path / "cmp"
    comp = run_compare(compare_cfg(data_dir, out))
    # the same sequences in the same order for all three runs (the warmup reads the small control's first
    # 1024 tokens from its checkpoint there, where the two part: test_runs_that_share_...)
    assert seen["small"] == seen["large"] == list(range((4096 + 1024) // 16))
    assert seen["warmup"] == list(range(1024 // 16, (4096 + 1024) // 16))
    runs = comp["runs"]
    assert runs["small"]["optimizer_steps"] == (4096 + 1024) // (2 * 16)
    assert runs["large"]["optimizer_steps"] == (4096 + 1024) // (8 * 16)
    # warmup: 1024/32 + 1024/64 + (2048 + 1024 anneal)/128 steps
    assert runs["warmup"]["optimizer_steps"] == 32 + 16 + 24
    assert runs["warmup"]["steps_saved_pct"] == pytest.approx(100 * (1 - 72 / 160))
    for r in runs.values():
        assert r["final_train_loss"] is not None and r["final_eval_loss"] is not None
        assert r["anneal_train_loss"] is not None and r["anneal_eval_loss"] is not None
        assert r["wall_time_s"] > 0
    # the large control's LR is the rule applied to its batch: sqrt(8/2) = 2x
    from critbatch.io import read_jsonl

    mid = [r for r in read_jsonl(out / "runs" / "s0" / "large" / "metrics.jsonl") if "optim/lr" in r and r["tokens"] == 1024 + 128]
    mid_small = [r for r in read_jsonl(out / "runs" / "s0" / "small" / "metrics.jsonl") if "optim/lr" in r and r["tokens"] == 1024 + 32]
    assert mid[0]["optim/lr"] == pytest.approx(2 * mid_small[0]["optim/lr"], rel=1e-9)
    # the anneal takes every run's LR linearly to 0 at the end (the LR of a step is set at its start)
    for n in runs:
        recs = [r for r in read_jsonl(out / "runs" / "s0" / n / "metrics.jsonl") if "optim/lr" in r]
        peak = max(r["optim/lr"] for r in recs)
        for r in recs:
            start = r["tokens"] - r["train/batch_tokens"]
            if start >= 4096:
                assert r["optim/lr"] == pytest.approx(peak * (5120 - start) / 1024, rel=1e-9)
    md = (out / "comparison.md").read_text()
    assert md.startswith("| run | batch (sequences) |") and "steps saved" in md and "over the last 416 tokens before 4,096" in md
    assert "held-out sample" in md  # one seed: the gap's ± is only the eval sample's paired error
    gap = runs["warmup"]["gap_to_small"]["final_eval_loss"]
    assert gap["mean"] == pytest.approx(runs["warmup"]["final_eval_loss"] - runs["small"]["final_eval_loss"])
    assert gap["se"] is None and gap["eval_sample_se"] > 0
    assert read_json(out / "comparison.json")["runs"]["warmup"]["optimizer_steps"] == 72
    assert (out / "loss_vs_tokens.png").is_file() and (out / "loss_vs_tokens.svg").is_file()
    # running again is a no-op; a different comparison into the same directory is refused
    stamp = (out / "runs" / "s0" / "small" / "result.json").stat().st_mtime_ns
    run_compare(compare_cfg(data_dir, out))
    assert (out / "runs" / "s0" / "small" / "result.json").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="different comparison"):
        run_compare(compare_cfg(data_dir, out, total_tokens=2048))


def test_seeds_anneal_steps_and_token_weighted_averages(data_dir, tmp_path):
    from critbatch.warmup import mean_train_loss, run_compare, run_dir
    from critbatch.io import read_json

    out = tmp_path / "cmp"
    comp = run_compare(compare_cfg(data_dir, out, anneal_tokens=0, anneal_steps=4, seeds=[0, 1], total_tokens=2048,
                                   schedule="0:2,1024:4"))
    assert comp["anneal_tokens_per_run"] == {"warmup": 4 * 4 * 16, "small": 4 * 2 * 16, "large": 4 * 4 * 16}
    for seed in (0, 1):
        cfgs = {n: read_json(run_dir(out, seed, n) / "config.json") for n in ("warmup", "small", "large")}
        assert {c["seed"] for c in cfgs.values()} == {seed} and {c["data"]["order_seed"] for c in cfgs.values()} == {seed}
        res = {n: read_json(run_dir(out, seed, n) / "result.json") for n in cfgs}
        assert res["small"]["tokens"] == 2048 + 128 and res["warmup"]["tokens"] == 2048 + 256
    a, b = (read_json(run_dir(out, s, "small") / "result.json")["final_eval_loss"] for s in (0, 1))
    assert a != b  # another init and data order
    g = comp["runs"]["warmup"]["gap_to_small"]["final_eval_loss"]
    assert g["n_seeds"] == 2 and len(g["per_seed"]) == 2 and g["se"] > 0
    assert g["mean"] == pytest.approx(sum(g["per_seed"]) / 2)
    per = comp["per_seed"]
    assert g["per_seed"][1] == pytest.approx(per["1"]["warmup"]["final_eval_loss"] - per["1"]["small"]["final_eval_loss"])
    assert "Mean over 2 seeds" in (out / "comparison.md").read_text()
    # a step of 4 sequences weighs twice a step of 2 in the averaged training loss
    recs = [{"tokens": 32, "train/loss": 1.0, "train/batch_tokens": 32}, {"tokens": 96, "train/loss": 4.0, "train/batch_tokens": 64}]
    assert mean_train_loss(recs, 0, 96) == pytest.approx((1 * 32 + 4 * 64) / 96)


def test_resume_in_the_middle_of_a_warmup_phase(data_dir, tmp_path):
    from critbatch.warmup import build_configs
    from critbatch.io import read_jsonl
    from critbatch.train import Trainer, list_checkpoints, load_checkpoint, train

    configs, _, _ = build_configs(compare_cfg(data_dir, tmp_path / "x"))
    cfg = configs[0]["warmup"]
    full = train(cfg, tmp_path / "full", progress=False)
    assert Trainer(cfg, tmp_path / "cut", stop_after_tokens=1024 + 5 * 64).run() is None  # inside the 4-seq phase
    again = train(cfg, tmp_path / "cut", progress=False)
    assert full["final_eval_loss"] == again["final_eval_loss"]
    a = load_checkpoint(list_checkpoints(tmp_path / "full")[-1].path)["model"]
    b = load_checkpoint(list_checkpoints(tmp_path / "cut")[-1].path)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rs]  # noqa: E731
    assert strip(read_jsonl(tmp_path / "full" / "metrics.jsonl")) == strip(read_jsonl(tmp_path / "cut" / "metrics.jsonl"))


@pytest.mark.parametrize("over,needle", [
    ({"schedule": "0:2,8000:4"}, "no batch change before 5,120 tokens"),  # 4,096 + the 1,024-token anneal
    ({"schedule": "0:2,4160:4", "anneal_tokens": 0, "anneal_steps": 8}, "changes the batch inside the anneal"),
    ({"schedule": "0:2,1024:3", "micro_batch_seqs": 2}, "warmup run: batch 3 sequences of phase 1"),
    ({"anneal_tokens": -16}, "anneal tokens -16 and anneal steps 0 must be >= 0"),
    ({"anneal_tokens": 16, "anneal_steps": 2}, "not both"),
    ({"schedule": "0:4,1024:2"}, "is not a warmup"),
    ({"seeds": [1, 1]}, "must be distinct"),
])
def test_compare_bad_input(data_dir, tmp_path, over, needle):
    from critbatch.warmup import run_compare

    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        run_compare(compare_cfg(data_dir, tmp_path / "c", **over))
    assert not (tmp_path / "c").exists()


def test_a_diverged_comparison_run_is_reported_not_averaged(data_dir, tmp_path, monkeypatch):
    """Batches of 8 blow up: the large run and the warmup (8 from 2,048 tokens) diverge, the small
    one does not. Their losses and gaps are absent, not a mean of what survived; the table and the
    report say "diverged" with the reason."""
    from critbatch.analysis.comparison import markdown_table
    from critbatch.warmup import run_compare
    from critbatch.model import gpt
    from critbatch.report.html import _comparison_conclusions

    orig = gpt.GPT.forward

    def forward(self, idx):
        out = orig(self, idx)
        return out * float("nan") if self.training and idx.shape[0] >= 8 else out

    monkeypatch.setattr(gpt.GPT, "forward", forward)
    comp = run_compare(compare_cfg(data_dir, tmp_path / "c", seeds=[0, 1], anneal_tokens=0), progress=False)
    r = comp["runs"]
    assert not r["small"]["diverged"] and r["small"]["final_eval_loss"] is not None
    for name in ("warmup", "large"):
        assert r[name]["diverged"] and r[name]["diverged_seeds"] == [0, 1] and r[name]["final_eval_loss"] is None
        assert r[name]["gap_to_small"]["final_eval_loss"] is None and "not finite" in r[name]["diverged_reasons"][0]
    assert markdown_table(comp).count("diverged") >= 4
    text = " ".join(_comparison_conclusions({"comparison": comp}))
    assert "The warmup run diverged (seed 0, 1: the training loss" in text and "The large run diverged" in text


def test_compare_rounds_tokens_up_to_whole_sequences_and_says_so(data_dir, tmp_path):
    """Like train, compare takes a token count that is not whole sequences; it rounds up (every
    run must stop at the same count) and records the adjustment."""
    from critbatch.warmup import build_configs

    configs, _, facts = build_configs(compare_cfg(data_dir, tmp_path / "c", total_tokens=4100, anneal_tokens=20))
    assert facts["pretrain_tokens"] == 4112 and facts["anneal_tokens"] == 32
    assert facts["notes"][:2] == ["total tokens 4,100 rounded up to 4,112: whole 16-token sequences",
                                  "anneal tokens 20 rounded up to 32: whole 16-token sequences"]
    assert {c.total_tokens for c in configs[0].values()} == {4112 + 32}


def test_schedule_cli_from_a_real_sweep(tmp_path, capsys, data_dir):
    from critbatch.branch import SweepConfig, run_sweep
    from critbatch.cli import main
    from critbatch.io import read_json
    from critbatch.train import train

    run = tmp_path / "run"
    train(small_cfg(data_dir, total_tokens=8192, batch_seqs=4, checkpoint_tokens=[1024, 4096]), run, progress=False)
    sw = run_sweep(SweepConfig(run=str(run), at=[1024, 4096], k=[0.5, 1, 2, 4], window_tokens=512,
                               launcher="inprocess", eval_seqs=16), progress=False)
    assert main(["schedule", "--sweep", str(sw.sweep_dir), "--out", str(tmp_path / "s.json"), "--source", "measured",
                 "--max-seqs", "16"]) == 0
    doc = read_json(tmp_path / "s.json")
    assert doc["phases"][0] == {"start_tokens": 0, "batch_seqs": 4, "batch_tokens": 64, "lr_multiplier": 1.0}
    assert doc["derived_from"]["source"] == "measured" and "megatron_step_batch_size_schedule" in doc["exports"]
    assert main(["schedule", "--sweep", str(tmp_path), "--out", str(tmp_path / "t.json")]) == 2
    assert "no cbs.json" in capsys.readouterr().err
    # the schedule drives a training run of the same model as it is
    (tmp_path / "m.json").write_text(json.dumps({"model": {"n_layer": 2, "n_head": 2, "d_model": 32, "seq_len": 16}}))
    assert main(["train", "--config", str(tmp_path / "m.json"), "--data", str(data_dir), "--out", str(tmp_path / "w"),
                 "--total-tokens", "4k", "--eval-seqs", "8", "--no-progress", "--batch-schedule", str(tmp_path / "s.json")]) == 0
    saved = read_json(tmp_path / "w" / "config.json")
    assert saved["batch_schedule"] == [[p["start_tokens"], p["batch_seqs"]] for p in doc["phases"]]
    assert saved["lr_ref_batch_seqs"] == doc["ref_batch_seqs"] and saved["optim"]["lr_rule"] == doc["rule"]


def test_a_batch_that_grows_inside_the_anneal_is_trained_and_counted(data_dir, tmp_path):
    """A seesaw schedule (critbatch schedule --decay seesaw) doubles the batch inside the LR decay: the
    warmup run trains those phases, the large control trains the batch the pretraining ends with, and
    the steps saved count the anneal's steps (the paper's Table 1 includes its annealing steps)."""
    from critbatch.io import read_jsonl
    from critbatch.warmup import run_compare

    out = tmp_path / "cmp"
    comp = run_compare(compare_cfg(data_dir, out, schedule="0:2,1024:4,4608:8"), progress=False)
    assert comp["decay_phases"] == [[4608, 8]] and comp["final_seqs"] == 4
    steps = [r for r in read_jsonl(out / "runs" / "s0" / "warmup" / "metrics.jsonl") if "train/loss" in r]
    assert {r["train/batch_seqs"] for r in steps if r["tokens"] > 4608} == {8}
    assert comp["runs"]["warmup"]["optimizer_steps"] == 1024 // 32 + (4608 - 1024) // 64 + 512 // 128
    assert comp["runs"]["large"]["batch_schedule"] == [[0, 4]]
    lr = {r["tokens"]: r["optim/lr"] for r in steps}
    # the step that starts at 4608 (the anneal's halfway point) runs at sqrt(2) x the LR the anneal gives it at batch 4
    assert lr[4608 + 128] / lr[4608] == pytest.approx(2 ** 0.5 * (1 - 512 / 1024) / (1 - 448 / 1024), rel=1e-6)


def test_more_schedules_against_the_same_controls(data_dir, tmp_path):
    """compare --schedules: named schedules train beside the warmup against the same controls, each a
    run in every seed with its own gaps; the table says how steps are counted (the paper's way)."""
    from critbatch.analysis.comparison import markdown_table
    from critbatch.warmup import run_compare

    out = tmp_path / "cmp"
    comp = run_compare(compare_cfg(data_dir, out, schedules={"late": "0:2,4096:8", "seesaw": "0:2,1024:4,4608:8"}),
                       progress=False)
    assert list(comp["runs"]) == ["warmup", "small", "large", "late", "seesaw"]
    assert comp["runs"]["late"]["batch_schedule"] == [[0, 2], [4096, 8]]
    assert comp["runs"]["seesaw"]["gap_to_small"]["anneal_eval_loss"]["n_seeds"] == 1
    md = markdown_table(comp)
    assert "| late |" in md and "the anneal's included" in md
    with pytest.raises(ConfigError, match="'small' is not a usable run name"):
        run_compare(compare_cfg(data_dir, tmp_path / "bad", schedules={"small": "0:2,1024:4"}))
    with pytest.raises(ConfigError, match="starts at batch 4, the warmup at 2"):
        run_compare(compare_cfg(data_dir, tmp_path / "bad2", schedules={"x": "0:4,1024:8"}))
