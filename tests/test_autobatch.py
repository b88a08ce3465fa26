"""The closed loop (``train --auto-batch``): planted CBS, equivalence with the plain run, real probes,
resume after a kill, the triggers and the cost."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import small_cfg
from critbatch.analysis.triggers import (calibrate, cbs_estimate, gns_verdict, log_spaced_points, norm_verdict,
                                         probe_verdict, steps_for)
from critbatch.closed_loop import AutoBatchConfig, ClosedLoop, run_auto_batch
from critbatch.errors import ConfigError
from critbatch.io import read_json, read_jsonl
from critbatch.train import Trainer

SRC = Path(__file__).resolve().parents[1] / "src"


def loop_cfg(data_dir, **over):
    return small_cfg(data_dir, **{"total_tokens": 8192, "batch_seqs": 4, "eval_interval_tokens": 2048,
                                  "lr_schedule": {"kind": "constant", "warmup_tokens": 256}, **over})


# ---- pure pieces ---------------------------------------------------------------------------------

def test_probe_verdict_reads_the_decided_point():
    pt = {"ks": [1.0, 2.0], "cbs_low_seqs": 16.0, "cbs_high_seqs": None, "undetermined_ks": []}
    assert probe_verdict(pt, 8) == ("raise", 16)
    assert probe_verdict(pt, 8, max_batch_seqs=12) == ("stay", 8)
    assert probe_verdict({**pt, "cbs_low_seqs": 8.0, "cbs_high_seqs": 16.0}, 8) == ("stay", 8)
    assert probe_verdict({**pt, "ks": [1.0, 2.0, 4.0], "cbs_low_seqs": 32.0}, 8) == ("raise", 32)
    assert probe_verdict({**pt, "cbs_low_seqs": 8.0, "undetermined_ks": [2.0]}, 8) == ("undetermined", 8)
    assert probe_verdict({**pt, "undetermined_reason": "the reference diverged"}, 8) == ("undetermined", 8)


def test_triggers_and_their_calibration():
    assert cbs_estimate({"cbs_low_seqs": 8.0, "cbs_high_seqs": 32.0}) == pytest.approx(16.0)
    assert cbs_estimate({"cbs_low_seqs": 16.0, "cbs_high_seqs": None}) == 16.0
    assert cbs_estimate({"cbs_low_seqs": 0.0, "cbs_high_seqs": 8.0}) is None
    assert calibrate([]) is None and calibrate([(None, None, 3.0)]) is None and calibrate([(8.0, None, None)]) is None
    # a raise at B_simple 2 (m >= 16/2) and a stay at B_simple 4 (m < 64/4): the middle of [8, 16]
    assert calibrate([(16.0, None, 2.0), (16.0, 64.0, 4.0)]) == pytest.approx(math.sqrt(8 * 16))
    assert calibrate([(None, 16.0, 4.0), (None, 32.0, 4.0)]) == pytest.approx(4.0)  # only stays: the tightest
    assert calibrate([(16.0, None, 2.0)]) == pytest.approx(8.0)  # only a raise
    assert gns_verdict(5.0, 8, None) is None  # never assumed
    assert gns_verdict(5.0, 8, 4.0) == "raise" and gns_verdict(3.9, 8, 4.0) == "stay"
    assert gns_verdict(None, 8, 4.0) == "raise"
    assert norm_verdict(9.0, 8) == "raise" and norm_verdict(8.0, 8) == "stay"
    assert norm_verdict(9.0, 8, eta=2.0) == "stay"  # B_simple / eta^2 = 2.25


def test_steps_and_points():
    assert steps_for([(0, 8)], 64, 1_000_000) == -(-1_000_000 // 512)
    # a phase starts at the first step at or after its threshold
    assert steps_for([(0, 1), (100, 2)], 10, 200) == 10 + 5
    assert steps_for([(0, 1), (95, 2)], 10, 200) == 10 + 5
    assert log_spaced_points(1000, 100) == [100, 200, 400, 800]


# ---- the loop -----------------------------------------------------------------------------------

def test_a_loop_that_never_raises_is_the_plain_run_bit_for_bit(data_dir, tmp_path):
    cfg = loop_cfg(data_dir)
    plain = Trainer(cfg, tmp_path / "plain", progress=False, quiet=True).run()
    never = lambda tokens, batch: batch  # noqa: E731
    r = run_auto_batch(cfg, AutoBatchConfig(probe_at=[1024, 3000, 5000], launcher="inprocess"), tmp_path / "loop",
                       decide=never)
    assert len(r["segments"]) == 4 and r["raises"] == 0
    assert r["final_eval_loss"] == plain["final_eval_loss"]  # exact: the chain is the run
    # (the smoothed train loss is re-summed from the last segment's records: equal to rounding)
    assert r["final_train_loss"] == pytest.approx(plain["final_train_loss"], abs=1e-12)
    assert r["steps"] == plain["steps"] == r["small_control_steps"]


def test_planted_cbs_doubles_exactly_at_the_planted_thresholds(data_dir, tmp_path):
    cfg = loop_cfg(data_dir, total_tokens=12288)
    planted = [(0, 4), (2000, 8), (5000, 16), (9000, 32)]  # the true CBS in sequences, from these tokens

    def cbs(t):
        return max(b for s, b in planted if t >= s)

    def decide(tokens, batch):
        return 2 * batch if cbs(tokens) >= 2 * batch else batch

    probes = [1024, 2048, 3072, 4096, 5120, 6144, 8192, 9216, 10240]
    r = run_auto_batch(cfg, AutoBatchConfig(probe_at=probes, launcher="inprocess"), tmp_path / "loop", decide=decide)
    T = cfg.model.seq_len
    # the first probe point at or after each threshold (where the run's last step ended)
    decisions = read_jsonl(tmp_path / "loop" / "decisions.jsonl")
    raised = [(d["tokens"], d["batch_after"]) for d in decisions if d["batch_after"] > d["batch_before"]]
    assert [b for _, b in raised] == [8, 16, 32]
    for (t, b), (s, want) in zip(raised, planted[1:]):
        assert b == want and t >= s
        earlier = [d for d in decisions if d["tokens"] < t and d["batch_before"] == b // 2]
        assert all(d["tokens"] < s for d in earlier)  # no probe at or after the threshold was missed
        assert t - s < 2048 + 32 * T  # within one probe spacing (plus a step)
    doc = read_json(tmp_path / "loop" / "schedule.json")
    assert [p["batch_seqs"] for p in doc["phases"]] == [4, 8, 16, 32]
    assert doc["phases"][1]["lr_multiplier"] == pytest.approx(2 ** 0.5)
    # the batch really changed in training: the segments' configs carry the schedule
    last = read_json(tmp_path / "loop" / r["segments"][-1] / "config.json")
    assert last["batch_schedule"] == r["schedule"] and last["lr_ref_batch_seqs"] == 4
    assert r["steps"] < r["small_control_steps"]
    assert r["steps_saved_pct"] == pytest.approx(100 * (1 - r["steps"] / r["small_control_steps"]))


@pytest.mark.slow
def test_real_probes_record_their_evidence(data_dir, tmp_path):
    cfg = loop_cfg(data_dir)
    a = AutoBatchConfig(measurement_budget=None, probe_at=[2048, 4096], window_tokens=1024, launcher="inprocess", gns_b_big=8, gns_batches=4,
                        confirm=1, noise_scale=True, early_stop=False)
    r = run_auto_batch(cfg, a, tmp_path / "loop")
    ds = read_jsonl(tmp_path / "loop" / "decisions.jsonl")
    assert len(ds) == 2
    for d in ds:
        p = d["probe"]
        assert p["ks"] == [1.0, 2.0] and len(p["eval_losses"]) == 2 and len(p["eval_losses"][0]) == 1
        assert p["rule"] == "eps" and p["eps"] == 0.01
        assert d["verdicts"]["branch"] in ("raise", "stay", "undetermined")
        want = 2 * d["batch_before"] if d["verdicts"]["branch"] == "raise" else d["batch_before"]
        assert d["batch_after"] == want and d["acted_on"] == "branch"
        assert (tmp_path / "loop" / p["sweep"] / "cbs.json").is_file()
        # the probe at B read all but its cooldown from the main run, which went on to there first
        assert d["cost"]["probe_tokens"] == 2 * p["window_tokens"] - d["main_run_lead"]["tokens"]
        assert "b_simple_seqs" in d["noise_scale"] and d["verdicts"]["norm"] in ("raise", "stay")  # None: |G|^2 <= 0
    assert ds[0]["verdicts"]["gns"] is None  # nothing to calibrate on yet
    assert ds[1]["noise_scale"]["calibrated_on"] == 1
    assert r["probe_tokens"] == sum(d["cost"]["probe_tokens"] for d in ds)
    assert r["probe_fraction"] == pytest.approx(r["probe_tokens"] / r["tokens"])
    # a rerun trains nothing and decides the same
    t0 = time.time()
    r2 = run_auto_batch(cfg, a, tmp_path / "loop")
    assert {k: v for k, v in r2.items() if k != "wall_time_s"} == {k: v for k, v in r.items() if k != "wall_time_s"}
    assert time.time() - t0 < 30


def test_the_loop_measures_no_noise_scale_by_default_and_stops_failing_probes_early(data_dir, tmp_path, monkeypatch):
    """Issue 25: the separate noise-scale estimate only when a trigger reads it; a larger batch's probe
    stops once settled as failing (the sweep's rule at 2·eps), with one replicate."""
    from critbatch.closed_loop import loop

    seen = []
    real = loop.run_sweep
    monkeypatch.setattr(loop, "run_sweep", lambda c, **kw: seen.append(c) or real(c, **kw))
    monkeypatch.setattr(loop.ClosedLoop, "noise_scale", lambda *a: pytest.fail("measured the noise scale"))
    r = run_auto_batch(loop_cfg(data_dir), AutoBatchConfig(measurement_budget=None, probe_at=[2048], window_tokens=1024, launcher="inprocess",
                                                           confirm=1), tmp_path / "loop")
    assert r["gns_tokens"] == 0 and [c.early_stop_gap for c in seen] == [0.02]
    assert "gns" not in read_jsonl(tmp_path / "loop" / "decisions.jsonl")[0]["verdicts"]
    with pytest.raises(ConfigError, match="with replicates=2 give --no-auto.early-stop"):
        run_auto_batch(loop_cfg(data_dir), AutoBatchConfig(probe_at=[2048], replicates=2), tmp_path / "x")


def _plain(cfg, out):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the loop's segments ran
    try:
        return Trainer(cfg, out, progress=False, quiet=True).run()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("raise_", [False, True])
def test_the_main_run_goes_on_to_the_probes_cooldown_and_keeps_or_drops_that_lead(data_dir, tmp_path, raise_,
                                                                                     monkeypatch):
    """Before a branch probe decides, the main run trains on at B to the last step before the probe's
    cooldown; the probe at B starts there (it trains only its cooldown). The batch stays: the run
    continues from there, and is the plain run bit for bit. The batch is raised: the lead is dropped,
    the run continues from the probe at the new batch, at its last step before the cooldown (those
    steps are the run's own at the new batch: after the second raise too, its LR taken as the run
    takes it), and is the replay of its schedule bit for bit."""
    from critbatch.analysis.triggers import steps_for

    from critbatch.closed_loop import loop

    if not raise_:  # the probes train as ever; their verdict is planted: stay
        monkeypatch.setattr(loop, "probe_verdict", lambda point, B, cap: ("stay", B))
    cfg = loop_cfg(data_dir)
    a = AutoBatchConfig(measurement_budget=None, probe_at=[2048, 4096], window_tokens=1024, launcher="inprocess", noise_scale=False, confirm=1,
                        eps=10.0)
    r = run_auto_batch(cfg, a, tmp_path / "loop", threads=1)
    ds = read_jsonl(tmp_path / "loop" / "decisions.jsonl")
    T = cfg.model.seq_len
    # window 1024, cooldown 256: the last step before the cooldown ends at the point + 768 + one step
    assert [d["main_run_lead"]["tokens"] for d in ds] == ([768 + 64, 768 + 128] if raise_ else [768 + 64] * 2)
    assert all(d["main_run_lead"]["kept"] != raise_ for d in ds)
    for d in ds:
        cbs = read_json(tmp_path / "loop" / d["probe"]["sweep"] / "cbs.json")
        assert cbs["points"][0]["from_parent_tokens"] == [[d["main_run_lead"]["tokens"]], [0]]
        assert d["cost"]["probe_tokens"] == 2 * 1024 - d["main_run_lead"]["tokens"]
        assert d["cost"]["lead_dropped_tokens"] == (d["main_run_lead"]["tokens"] if raise_ else 0)
    leads = r["main_run_leads"]
    assert leads["points"] == 2 and leads["kept"] == (0 if raise_ else 2)
    assert leads["discarded_tokens"] == (leads["tokens"] if raise_ else 0)
    # on a raise the run continued from the 2B probe: window 1024 at batch 8 (16), cooldown 256: the last
    # step before it ends at the point + 768 + 128 (+ 768 at 16: whole steps of 256)
    conts = [d.get("continued_from_probe") for d in ds]
    if raise_:
        assert [(c["tokens"], c["steps"]) for c in conts] == [(896, 7), (768, 3)]
        for d, c in zip(ds, conts):
            assert c["to_tokens"] == d["tokens"] + c["tokens"] and d["cost"]["probe_kept_tokens"] == c["tokens"]
            assert c["branch"].startswith(d["segment"] + "/branches/") and "_k2_r0_" in c["branch"]
        # the next segment starts from the probe's checkpoint, not from the point
        seg1 = read_json(tmp_path / "loop" / r["segments"][1] / "job.json")["init_from"]
        assert seg1.endswith(f"{conts[0]['branch'].split('/')[-1]}/ckpt/tok_{conts[0]['to_tokens']:012d}")
    else:
        assert conts == [None, None] and all("probe_kept_tokens" not in d["cost"] for d in ds)
    # a probe's checkpoint before its cooldown stays only where the run continued from it
    from critbatch.train import kept_checkpoints

    for d, c in zip(ds, conts):
        probes = sorted((tmp_path / "loop" / d["segment"] / "branches").iterdir())
        assert len(probes) == 2
        left = {p.name: [k.tokens for k in kept_checkpoints(p)] for p in probes}
        assert left == {p.name: ([c["to_tokens"]] if c and c["branch"].endswith(p.name) else []) for p in probes}
    assert r["probe_kept_tokens"] == sum(c["tokens"] for c in conts if c)
    # the measurement a point costs, estimated before it runs (for the budget), bounds what it cost, within
    # one step of the largest probed batch: whether the batch stayed or was raised
    from critbatch.closed_loop import lead_limit, point_measurement
    from critbatch.records import decision_measurement

    for d, start in zip(ds, [0, 2048 if raise_ else 0]):
        est = point_measurement(d["tokens"], d["batch_before"], start, T, a, lead_limit(d["tokens"], [2048, 4096], 8192, a))
        assert decision_measurement(d) <= est <= decision_measurement(d) + 2 * 2 * d["batch_before"] * T
    # what the measurement cost counts: every token the run's result does not contain (the probes less
    # what the run continued from, the dropped leads)
    assert r["measurement_tokens"] == r["probe_tokens"] - r["probe_kept_tokens"] + leads["discarded_tokens"]
    assert r["gns_tokens"] == 0
    assert r["measurement_fraction"] == pytest.approx(r["measurement_tokens"] / r["tokens"])
    from critbatch.closed_loop import describe
    from critbatch.records import closed_loop_result

    line = next(x for x in describe(r) if x.startswith("measurement cost: "))
    assert (f"{r['measurement_tokens']:,} tokens" in line) and (("dropped at its raises" in line) == raise_)
    assert ("the run continued from its raises' probes" in line) == raise_
    # a result written before the dropped leads were counted gets them on reading
    old = {k: v for k, v in r.items() if k != "measurement_tokens"}
    old["measurement_fraction"] = (r["probe_tokens"] + r["gns_tokens"]) / r["tokens"]
    assert closed_loop_result(old)["measurement_fraction"] == pytest.approx(r["measurement_fraction"])
    if raise_:
        assert r["schedule"] == [[0, 4], [2048, 8], [4096, 16]]
        replay = _plain(loop_cfg(data_dir, batch_schedule=r["schedule"], lr_ref_batch_seqs=4), tmp_path / "replay")
        assert r["steps"] == replay["steps"] == steps_for([tuple(p) for p in r["schedule"]], T, cfg.total_tokens)
        assert r["final_eval_loss"] == replay["final_eval_loss"]
    else:
        plain = _plain(cfg, tmp_path / "plain")
        assert r["schedule"] == [[0, 4]] and r["steps"] == plain["steps"]
        assert r["final_eval_loss"] == plain["final_eval_loss"]


def test_norm_trigger_acts_without_branch_probes(data_dir, tmp_path):
    cfg = loop_cfg(data_dir)
    a = AutoBatchConfig(measurement_budget=None, probe_at=[2048], act_on="norm", norm_eta=1e-3, launcher="inprocess", gns_b_big=8, gns_batches=4,
                        confirm=1)
    r = run_auto_batch(cfg, a, tmp_path / "loop")
    d = read_jsonl(tmp_path / "loop" / "decisions.jsonl")[0]
    assert d["probe"] is None and d["acted_on"] == "norm" and d["verdicts"]["norm"] == "raise"
    assert d["batch_after"] == 8 and r["probe_tokens"] == 0 and r["gns_tokens"] == 4 * 8 * 16


@pytest.mark.parametrize("bad, match", [
    ({"probe_k": [2.0]}, "must hold 1"),
    ({"probe_k": [1.0, 0.5]}, "only raises"),
    ({"probe_at": [0]}, "must lie inside the run"),
    ({"probe_at": [99999]}, "must lie inside the run"),
    ({"act_on": "magic"}, "act_on='magic' is not one of"),
    ({"max_batch_seqs": 2}, "below the starting batch 4"),
    ({"window_tokens": 0}, "must be positive"),
    ({"norm_eta": 0}, "must be > 0"),
    ({"act_on": "gns", "noise_scale": False}, "needs the noise scale"),
])
def test_bad_settings_are_one_line_errors_and_write_nothing(data_dir, tmp_path, bad, match):
    with pytest.raises(ConfigError, match=match):
        run_auto_batch(loop_cfg(data_dir), AutoBatchConfig(launcher="inprocess", **bad), tmp_path / "loop")
    assert not (tmp_path / "loop").exists()


def test_other_settings_in_the_same_directory_are_refused(data_dir, tmp_path):
    never = lambda tokens, batch: batch  # noqa: E731
    cfg = loop_cfg(data_dir, total_tokens=2048)
    run_auto_batch(cfg, AutoBatchConfig(probe_at=[1024], launcher="inprocess"), tmp_path / "loop", decide=never)
    with pytest.raises(ConfigError, match="holds a closed-loop run of other settings"):
        run_auto_batch(cfg, AutoBatchConfig(probe_at=[512], launcher="inprocess"), tmp_path / "loop", decide=never)
    with pytest.raises(ConfigError, match="decides the batch schedule itself"):
        run_auto_batch(loop_cfg(data_dir, batch_schedule=[[0, 4], [1024, 8]]), AutoBatchConfig(), tmp_path / "x")


KILL_SCRIPT = """
import sys, json
from critbatch.config import TrainConfig, from_dict
from critbatch.closed_loop import AutoBatchConfig, run_auto_batch
cfg = from_dict(TrainConfig, json.loads(sys.argv[2]))
run_auto_batch(cfg, AutoBatchConfig(measurement_budget=None, probe_at=[2048, 4096], window_tokens=8192, launcher="inprocess",
               gns_b_big=8, gns_batches=4, threads_per_branch=1), sys.argv[1], threads=1)
"""


@pytest.mark.slow
def test_killed_between_and_inside_probes_resumes_to_the_same_decisions(data_dir, tmp_path):
    from critbatch.config import to_dict

    cfg = loop_cfg(data_dir)
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"  # the uninterrupted reference: the script's own lines, in this process
    run_auto_batch(cfg, AutoBatchConfig(measurement_budget=None, probe_at=[2048, 4096], window_tokens=8192, launcher="inprocess",
                                        gns_b_big=8, gns_batches=4, threads_per_branch=1), ref, threads=1)
    want = read_jsonl(ref / "decisions.jsonl")
    # kill once inside the first probe's branches, once between (while the second segment trains)
    inside = lambda d: any(not (m.parent / "result.json").is_file()  # noqa: E731
                           for m in (d / "main").glob("*/branches/*/metrics.jsonl"))
    for name, ready in [("inside", inside),
                        ("between", lambda d: len(list((d / "main").glob("seg*"))) >= 2)]:
        out = tmp_path / name
        p = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(out), json.dumps(to_dict(cfg))], env=env)
        t0 = time.time()
        while p.poll() is None and not ((out / "main").is_dir() and ready(out)) and time.time() - t0 < 120:
            time.sleep(0.01)
        assert p.poll() is None, f"{name}: the run finished before the kill"
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert not (out / "result.json").is_file()
        subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(out), json.dumps(to_dict(cfg))], env=env, check=True)
        got = read_jsonl(out / "decisions.jsonl")
        strip = lambda ds: [{k: v for k, v in d.items() if k not in ("noise_scale",)} | (  # noqa: E731
            {"b_simple": d["noise_scale"]["b_simple_seqs"]} if d.get("noise_scale") else {}) for d in ds]
        assert strip(got) == strip(want), name
        assert read_json(out / "result.json")["final_eval_loss"] == read_json(ref / "result.json")["final_eval_loss"]


# ---- the command line and the plan -------------------------------------------------------------

def test_train_auto_batch_on_the_command_line(data_dir, tmp_path, capsys):
    from critbatch.cli import main
    from critbatch.config import to_dict

    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(to_dict(loop_cfg(data_dir))))
    args = ["train", "--config", str(cfg_file), "--out", str(tmp_path / "loop"), "--auto-batch",
            "--auto.probe-at", "4096", "--auto.window-tokens", "1024", "--auto.launcher", "inprocess",
            "--auto.gns-b-big", "8", "--auto.gns-batches", "4", "--auto.confirm", "1", "--auto.measurement-budget", "none"]
    assert main(args) == 0
    cap = capsys.readouterr()
    assert "closed loop (branch trigger)" in cap.out and "1 probe points" in cap.out and "measurement cost" in cap.out
    assert "[auto-batch] at 4,096 tokens: batch 4 -> " in cap.err  # one line per decision as it is taken
    assert len(read_jsonl(tmp_path / "loop" / "decisions.jsonl")) == 1
    # resuming needs only --out and --auto-batch (settings come from the directory)
    assert main(["train", "--out", str(tmp_path / "loop"), "--auto-batch", "--no-progress"]) == 0
    # a run started before the measurement budget existed had none: it resumes as it was asked
    spec = read_json(tmp_path / "loop" / "autobatch.json")
    del spec["auto"]["measurement_budget"]
    (tmp_path / "loop" / "autobatch.json").write_text(json.dumps(spec))
    assert main(["train", "--out", str(tmp_path / "loop"), "--auto-batch", "--no-progress"]) == 0
    assert read_json(tmp_path / "loop" / "autobatch.json")["auto"]["measurement_budget"] is None
    assert main(["train", "--config", str(cfg_file), "--out", str(tmp_path / "x"), "--auto.eps", "0.02"]) == 2
    assert "--auto.* options set the closed loop: add --auto-batch" in capsys.readouterr().err


def test_plan_arithmetic_known_answer():
    from critbatch.closed_loop import PlanConfig, estimate
    from critbatch.config import merge

    # 1M tokens, seq 64, start 8: control 1954 steps at 10 ms; probes at 250k, 500k (window 20,480)
    cfg = PlanConfig(total_tokens=1_000_000, start_seqs=8, seq_len=64,
                     auto=AutoBatchConfig(probe_at=[250_000, 500_000], window_tokens=20_480, noise_scale=False))
    est = estimate(cfg, {8: 0.010, 16: 0.016})
    assert est["control"] == {"steps": 1954, "seconds": pytest.approx(19.54)}
    no, best = est["scenarios"]["no raise"], est["scenarios"]["doubling at every probe point"]
    # probes: at B=8, 40 steps of 8 + 20 of 16 at each point; the main run goes on to the last step
    # before the k = 1 probe's cooldown (window 40 steps, cooldown 10: 31 steps), so that probe trains 9
    assert no["steps"] == 1954 and no["probe_tokens"] == 2 * (9 * 512 + 20 * 1024)
    assert no["probe_seconds"] == pytest.approx(2 * (0.09 + 0.32)) and not no["pays_off"]
    assert no["lead_discarded_tokens"] == 0  # no raise: the run continues from its leads
    assert best["schedule"] == [[0, 8], [250_000, 16], [500_000, 32]]
    assert best["steps"] == steps_for([(0, 8), (250_000, 16), (500_000, 32)], 64, 1_000_000)
    # 32 is beyond the given times: extrapolated in proportion to the batch (2 x 16 ms)
    s = -(-250_000 // 512)  # steps at 8 up to 250k
    s16 = -(-(500_000 - s * 512) // 1024)
    s32 = -(-(1_000_000 - s * 512 - s16 * 1024) // 2048)
    # a raise drops the lead: 31 steps of 8 at 250k, 16 steps of 16 at 500k (window 20 steps, cooldown 5)
    assert best["lead_discarded_tokens"] == 31 * 512 + 16 * 1024
    # and the run continues from the probe at the new batch, at its last step before the cooldown: 16
    # steps of 16 at 250k, 8 of 32 at 500k, trained once, by the probe
    assert best["probe_kept_tokens"] == 16 * 1024 + 8 * 2048 and no["probe_kept_tokens"] == 0
    assert best["run_seconds"] == pytest.approx(s * 0.010 + s16 * 0.016 + s32 * 0.032 + 31 * 0.010 + 16 * 0.016
                                                - 16 * 0.016 - 8 * 0.032)
    # the probe at 500k runs at 16 (the batch before its decision): 4 steps of 16 at k = 1, 10 of 32 at k = 2
    assert best["probe_tokens"] == 9 * 512 + 20 * 1024 + 4 * 1024 + 10 * 2048
    # the measurement counts the dropped leads in beside the probes (no noise scale here)
    assert best["measurement_tokens"] == best["probe_tokens"] - best["probe_kept_tokens"] + 31 * 512 + 16 * 1024
    assert no["measurement_tokens"] == no["probe_tokens"] and no["measurement_fraction"] == no["probe_tokens"] / 1_000_000
    assert best["pays_off"] == (best["total_seconds"] < 19.54)
    # an expected schedule as a closed loop writes it: the raise at the step boundary the run took the
    # 250k point at (489 steps of 512 tokens); the same lead dropped and probe steps kept as at the point
    exp = estimate(PlanConfig(total_tokens=1_000_000, start_seqs=8, seq_len=64, expected="0:8,250368:16",
                              auto=cfg.auto), {8: 0.010, 16: 0.016})["scenarios"]["expected"]
    assert exp["lead_discarded_tokens"] == 31 * 512 and exp["probe_kept_tokens"] == 16 * 1024
    # after that raise the 500k point is the only one left at 16: with confirm 2 it can raise nothing and
    # the loop does not probe it; the bounds probe both points (no raise: 250k may pass, 500k confirm it)
    assert exp["skipped_probe_points"]["points"] == [500_000] and exp["skipped_probe_points"]["batch_seqs"] == 16
    assert exp["probe_tokens"] == 9 * 512 + 20 * 1024
    # what each point costs, summing to the whole: the raise at 250k drops the lead, keeps the 2B probe's steps
    assert [(q["tokens"], q["batch_seqs"], q["raised_to"]) for q in exp["points"]] == [(250_000, 8, 16)]
    assert exp["points"][0]["measurement_tokens"] == exp["measurement_tokens"] == 9 * 512 + 20 * 1024 - 16 * 1024 + 31 * 512
    assert [q["measurement_tokens"] for q in no["points"]] == [9 * 512 + 20 * 1024] * 2
    assert sum(q["measurement_tokens"] for q in best["points"]) == best["measurement_tokens"]
    assert no["skipped_probe_points"] is None and best["skipped_probe_points"] is None
    # a budget of 3% of the run pays for the 250k point (about 25k tokens) and not for both; with confirm 2
    # that one point could raise nothing, so none is probed
    tight = AutoBatchConfig(probe_at=[250_000, 500_000], window_tokens=20_480, noise_scale=False, measurement_budget=0.03)
    one = estimate(PlanConfig(total_tokens=1_000_000, start_seqs=8, seq_len=64, auto=merge(tight, {"confirm": 1})),
                   {8: 0.010})
    assert all([q["tokens"] for q in s["points"]] == [250_000] and s["measurement_tokens"] <= 30_000
               and "past the budget of 30,000" in s["skipped_probe_points"]["reason"] for s in one["scenarios"].values())
    assert one["scenarios"]["doubling at every probe point"]["schedule"] == [[0, 8], [250_000, 16]]
    two = estimate(PlanConfig(total_tokens=1_000_000, start_seqs=8, seq_len=64, auto=tight), {8: 0.010})["scenarios"]
    assert two["no raise"]["points"] == [] and "within the measurement budget" in two["no raise"]["skipped_probe_points"]["reason"]
    capped = estimate(PlanConfig(total_tokens=1_000_000, start_seqs=8, seq_len=64, auto=AutoBatchConfig(
        probe_at=[250_000, 500_000], window_tokens=20_480, noise_scale=False, max_batch_seqs=12)), {8: 0.010})
    assert all(s["probe_tokens"] == 0 and s["skipped_probe_points"]["points"] == [250_000, 500_000]
               for s in capped["scenarios"].values())
    assert "confirmation_points_max" not in est
    # with a confirmation factor of 1.5: a pass at 250k may be probed again at 375k (before 500k), one
    # at 500k at 750k; each such point costs 20,480 tokens at k = 1 and at k = 2
    cf = estimate(PlanConfig(total_tokens=1_000_000, start_seqs=8, seq_len=64,
                             auto=AutoBatchConfig(probe_at=[250_000, 500_000], window_tokens=20_480, noise_scale=False,
                                                  confirm_factor=1.5)), {8: 0.010, 16: 0.016})
    assert cf["confirmation_points_max"] == [375_000, 750_000] and cf["confirmation_probe_tokens_max"] == 2 * 2 * 20_480


@pytest.mark.slow
def test_plan_on_the_command_line(tmp_path, capsys):
    from critbatch.cli import main

    assert main(["plan", "--total-tokens", "1M", "--start-seqs", "8", "--seq-len", "64", "--step-seconds",
                 '{"8": 0.01, "64": 0.05}', "--expected", "0:8,500k:16", "--out", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "small-batch control: 1,954 steps" in out and "expected: " in out and "x the control" in out
    assert "measurement by probe point (expected schedule; " in out
    assert read_json(tmp_path / "p.json")["scenarios"]["expected"]["schedule"] == [[0, 8], [500_000, 16]]
    assert main(["plan", "--total-tokens", "1M", "--start-seqs", "8", "--seq-len", "64"]) == 2
    assert "give step_seconds" in capsys.readouterr().err
    assert main(["plan", "--total-tokens", "1M", "--start-seqs", "8", "--seq-len", "64", "--step-seconds",
                 '{"8": -1}']) == 2
    # measured on a preset's model, here (from batch 1: it times batches 1 to 64, not 8 to 512)
    assert main(["plan", "--total-tokens", "200k", "--start-seqs", "1", "--seq-len", "64", "--preset", "demo",
                 "--auto.gns-b-big", "16"]) == 0
    assert "no raise" in capsys.readouterr().out


def test_plan_and_schedule_say_where_the_start_batch_sits(tmp_path, capsys):
    """Given a sweep, the plan and the schedule both state the start batch against the measured CBS."""
    from critbatch.cli import main

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "cbs.json").write_text(json.dumps({"seq_len": 64, "window_tokens": 98304, "points": [
        {"tokens": t, "cbs_low_seqs": lo, "cbs_high_seqs": hi, "base_batch_seqs": 8}
        for t, lo, hi in ((20_000, 0, 6), (200_000, 8, 12), (600_000, 16, 32))]}))
    plan = ["plan", "--total-tokens", "1M", "--seq-len", "64", "--step-seconds", '{"8": 0.01}', "--sweep", str(sweep)]
    assert main([*plan, "--start-seqs", "8", "--out", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "start batch: warning: the start batch of 8 sequences is above the measured CBS at 20,000 tokens" in out
    assert read_json(tmp_path / "p.json")["start_advice"]["recommended_seqs"] == 4
    assert main([*plan, "--start-seqs", "4"]) == 0
    assert "start batch: the start batch of 4 sequences is below the measured CBS: the lower bounds allow 2 doublings" \
        in capsys.readouterr().out
    assert main(["schedule", "--sweep", str(sweep), "--out", str(tmp_path / "s.json"), "--start-seqs", "4"]) == 0
    assert "start batch: the start batch of 4 sequences is below" in capsys.readouterr().out
    assert read_json(tmp_path / "s.json")["start_advice"]["position"] == "below"
    assert main([*plan, "--start-seqs", "4", "--seq-len", "128"]) == 2
    assert "measured 64-token sequences" in capsys.readouterr().err


def test_compare_replays_the_closed_loop_as_a_fourth_run(data_dir, tmp_path):
    from critbatch.analysis.comparison import markdown_table
    from critbatch.warmup import CompareConfig, run_compare
    from critbatch.config import to_dict

    cfg = loop_cfg(data_dir)
    double_at_4k = lambda tokens, batch: 8 if tokens >= 4096 else batch  # noqa: E731
    # one thread, as compare's runs (the thread count changes the last bits on CPU, and training amplifies them)
    r = run_auto_batch(cfg, AutoBatchConfig(measurement_budget=None, probe_at=[2048, 4096], launcher="inprocess"), tmp_path / "loop",
                       decide=double_at_4k, threads=1)
    assert r["schedule"] == [[0, 4], [4096, 8]]
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(to_dict(cfg)))
    # the offline schedule found no change: with a closed loop the comparison still runs
    comp = run_compare(CompareConfig(out=str(tmp_path / "cmp"), schedule="0:4", config=str(cfg_file),
                                     closed_loop=str(tmp_path / "loop"), launcher="inprocess", anneal_tokens=512),
                       progress=False)
    assert list(comp["runs"]) == ["warmup", "small", "large", "closed-loop"]
    cl = comp["runs"]["closed-loop"]
    assert cl["batch_schedule"] == [[0, 4], [4096, 8]] and comp["runs"]["large"]["batch_schedule"] == [[0, 8]]
    assert cl["final_eval_loss"] == r["final_eval_loss"]  # the replay is the closed-loop run itself
    assert cl["gap_to_small"]["final_eval_loss"] is not None and cl["anneal_eval_loss"] is not None
    assert "| closed-loop | 4 → 8 at 4,096 |" in markdown_table(comp)
    # so it starts at the end of the closed loop's last segment (trained once) and only anneals; the
    # numbers equal the replay trained from scratch, bit for bit, and its records follow the segments back
    last = (tmp_path / "loop" / r["segments"][-1]).resolve()
    assert comp["forks"]["s0/closed-loop"] | {"loss_ema": None} == {
        "source": str(last), "tokens": 8192, "checkpoint": str(last / "ckpt" / "resume_tok_000000008192"),
        "loss_ema": None}
    assert read_json(tmp_path / "cmp" / "runs" / "s0" / "closed-loop" / "result.json")["start_tokens"] == 8192
    whole = run_compare(CompareConfig(out=str(tmp_path / "whole"), schedule="0:4", config=str(cfg_file),
                                      closed_loop=str(tmp_path / "loop"), launcher="inprocess", anneal_tokens=512,
                                      share_prefix=False), progress=False)
    assert whole["forks"] == {}
    keys = ("final_train_loss", "final_eval_loss", "anneal_train_loss", "anneal_eval_loss", "optimizer_steps")
    assert {k: whole["runs"]["closed-loop"][k] for k in keys} == {k: cl[k] for k in keys}
    from critbatch.warmup.forks import run_records

    forks = {str((tmp_path / "cmp" / "runs" / "s0" / "closed-loop").resolve()): comp["forks"]["s0/closed-loop"]}
    chained = [(x["tokens"], x.get("train/loss")) for x in run_records(tmp_path / "cmp" / "runs" / "s0" / "closed-loop", forks)]
    scratch = [(x["tokens"], x.get("train/loss")) for x in run_records(tmp_path / "whole" / "runs" / "s0" / "closed-loop", {})]
    assert chained[0][0] == 0 and [t for t, _ in chained] == [t for t, _ in scratch] and chained == scratch
    with pytest.raises(ConfigError, match="not a finished closed-loop run"):
        run_compare(CompareConfig(out=str(tmp_path / "c2"), schedule="0:4", config=str(cfg_file),
                                  closed_loop=str(tmp_path / "nowhere"), launcher="inprocess"), progress=False)


@pytest.mark.slow
def test_speculation_trains_the_next_segment_beside_the_probes_and_changes_nothing(data_dir, tmp_path):
    cfg = loop_cfg(data_dir)
    kw = dict(measurement_budget=None, probe_at=[2048], window_tokens=1024, confirm=1, gns_b_big=8, gns_batches=4, threads_per_branch=1,
              launcher="local", jobs=3)
    plain = run_auto_batch(cfg, AutoBatchConfig(**kw), tmp_path / "plain", threads=1)
    spec = run_auto_batch(cfg, AutoBatchConfig(**kw, speculate=True), tmp_path / "spec", threads=1)
    assert spec["schedule"] == plain["schedule"] and spec["final_eval_loss"] == plain["final_eval_loss"]
    ds = read_jsonl(tmp_path / "spec" / "decisions.jsonl")
    assert all("speculative_segment" in d for d in ds)
    s = spec["speculation"]
    assert s["segments"] == 1 and s["kept"] == sum(d["batch_after"] == d["batch_before"] for d in ds)
    # a kept speculative segment is the segment the run continued with (trained once, beside the probes)
    for d in ds:
        if d["speculative_segment"]["kept"]:
            assert d["speculative_segment"]["dir"] in spec["segments"]
    assert (s["discarded_tokens"] > 0) == (s["kept"] < 1)


ONE_OF_TWO, TWO_OF_TWO = {"seen": 1, "needed": 2}, {"seen": 2, "needed": 2}


def planted_probe(passes, gap=0.005):
    """A stand-in for the loop's branch probe: ``passes(tokens, batch)`` says whether 2B passes, and
    2B's held-out loss is ``gap`` above B's."""
    from critbatch.train.checkpoint import find_kept

    def fake_probe(self, seg, t, beside=None):
        B = int(find_kept(seg, [t])[0].meta["batch_seqs"])
        ok = passes(t, B)
        point = {"ks": [1.0, 2.0], "cbs_low_seqs": 2.0 * B if ok else 0.0, "cbs_high_seqs": None if ok else 2.0 * B,
                 "undetermined_ks": []}
        evidence = {"ks": [1.0, 2.0], "cbs_low_seqs": point["cbs_low_seqs"], "cbs_high_seqs": point["cbs_high_seqs"],
                    "eval_losses": [[2.0], [2.0 + gap]], "probe_tokens": 0}
        return evidence, point

    return fake_probe


def test_confirm_raises_only_after_consecutive_passes(data_dir, tmp_path, monkeypatch):
    """The probe's verdicts planted (pass, fail, pass, pass): confirm=2 ignores the isolated pass and
    raises at the second of two consecutive ones; confirm=1 raises at the first pass."""
    passes = {1024: True, 2048: False, 3072: True, 4096: True}
    monkeypatch.setattr(ClosedLoop, "branch_probe", planted_probe(lambda t, B: passes[t]))
    cfg = loop_cfg(data_dir)
    kw = dict(measurement_budget=None, probe_at=sorted(passes), noise_scale=False, launcher="inprocess")
    r1 = run_auto_batch(cfg, AutoBatchConfig(**kw, confirm=1), tmp_path / "c1")
    assert r1["schedule"] == [[0, 4], [1024, 8], [3072, 16], [4096, 32]]  # a raise at every pass
    r2 = run_auto_batch(cfg, AutoBatchConfig(**kw), tmp_path / "c2")  # the default: confirm 2
    assert r2["schedule"] == [[0, 4], [4096, 8]]
    ds = read_jsonl(tmp_path / "c2" / "decisions.jsonl")
    assert [d.get("confirmations") for d in ds] == [ONE_OF_TWO, None, ONE_OF_TWO, TWO_OF_TWO]
    assert [d["batch_after"] for d in ds] == [4, 4, 4, 8]


def test_points_that_can_lead_to_no_raise_are_not_probed(data_dir, tmp_path, monkeypatch):
    """Issue 25: with confirm=2 a raise needs two consecutive passing points at one batch. A first
    raise at the second-last point leaves one point at the new batch, which can raise nothing: the
    loop trains on to the end without it, and the run is bit for bit the one that probed there and
    stayed. At max_batch_seqs the loop probes nothing."""
    seen = []
    monkeypatch.setattr(ClosedLoop, "branch_probe", planted_probe(lambda t, B: seen.append((t, B)) or B == 4))
    cfg = loop_cfg(data_dir)
    kw = dict(measurement_budget=None, probe_at=[1024, 2048, 4096], noise_scale=False, launcher="inprocess")
    r = run_auto_batch(cfg, AutoBatchConfig(**kw), tmp_path / "skip", threads=1)
    assert seen == [(1024, 4), (2048, 4)] and r["schedule"] == [[0, 4], [2048, 8]]
    assert r["probe_points"] == 2
    sk = r["skipped_probe_points"]
    assert sk["from_tokens"] == 4096 and sk["points"] == [4096] and sk["batch_seqs"] == 8
    assert "needs 2 more consecutive probe points" in sk["reason"] and "1 remain" in sk["reason"]
    from critbatch.closed_loop import describe

    assert any(x.startswith("no probe at 4,096 tokens (1 point left out): a raise from batch 8 needs 2")
               for x in describe(r))
    # a rerun in place decides the same
    assert {k: v for k, v in run_auto_batch(cfg, AutoBatchConfig(**kw), tmp_path / "skip", threads=1).items()
            if k != "wall_time_s"} == {k: v for k, v in r.items() if k != "wall_time_s"}
    # the same schedule with 4096 probed (confirm 1, the raise planted at 2048 alone): the same run
    seen.clear()
    monkeypatch.setattr(ClosedLoop, "branch_probe", planted_probe(lambda t, B: seen.append((t, B)) or (t, B) == (2048, 4)))
    same = run_auto_batch(cfg, AutoBatchConfig(**kw, confirm=1), tmp_path / "same", threads=1)
    assert seen == [(1024, 4), (2048, 4), (4096, 8)] and same["schedule"] == r["schedule"]
    assert same["skipped_probe_points"] is None
    assert same["final_eval_loss"] == r["final_eval_loss"] and same["steps"] == r["steps"]
    assert r["measurement_tokens"] <= same["measurement_tokens"]
    # at the cap: no point can raise, none is probed
    seen.clear()
    capped = run_auto_batch(cfg, AutoBatchConfig(**kw, max_batch_seqs=6), tmp_path / "cap", threads=1)
    assert seen == [] and capped["probe_points"] == 0 and capped["schedule"] == [[0, 4]]
    assert capped["skipped_probe_points"]["points"] == [1024, 2048, 4096]
    assert "max_batch_seqs=6" in capped["skipped_probe_points"]["reason"]


def test_the_measurement_budget_leaves_out_the_points_it_cannot_pay_for(data_dir, tmp_path):
    """Issue 25: with a budget that pays for the first point's probes and not the second's, the loop
    probes once, trains on to the end, and its measurement stays within the budget; the command line
    and the plan say which points were left out and why."""
    from critbatch.closed_loop import describe, lead_limit, point_measurement

    cfg = loop_cfg(data_dir)
    T = cfg.model.seq_len
    kw = dict(probe_at=[2048, 4096], window_tokens=1024, launcher="inprocess", noise_scale=False, confirm=1, eps=10.0)
    first = point_measurement(2048, 4, 0, T, AutoBatchConfig(**kw), lead_limit(2048, [2048, 4096], 8192, AutoBatchConfig(**kw)))
    a = AutoBatchConfig(**kw, measurement_budget=(first + 100) / 8192)
    r = run_auto_batch(cfg, a, tmp_path / "loop", threads=1)
    assert r["probe_points"] == 1 and r["schedule"] == [[0, 4], [2048, 8]]
    sk = r["skipped_probe_points"]
    assert sk["points"] == [4096] and sk["batch_seqs"] == 8 and "past the budget of" in sk["reason"]
    assert r["measurement_tokens"] <= a.measurement_budget * 8192
    assert any(x.startswith("no probe at 4,096 tokens (1 point left out): its probes would take") for x in describe(r))
    # no budget: both points probed, and the measurement is past what that budget allowed
    free = run_auto_batch(cfg, AutoBatchConfig(**kw, measurement_budget=None), tmp_path / "free", threads=1)
    assert free["probe_points"] == 2 and free["skipped_probe_points"] is None
    assert free["measurement_tokens"] > a.measurement_budget * 8192
    with pytest.raises(ConfigError, match="measurement_budget=0.0 must be > 0"):
        run_auto_batch(cfg, AutoBatchConfig(**kw, measurement_budget=0.0), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_confirm_factor_confirms_a_pass_sooner(data_dir, tmp_path, monkeypatch):
    """A pass at 1024 tokens is confirmed at 1.5 × 1024 = 1536 (a point inserted between the
    scheduled 1024 and 4096) instead of waiting for 4096; a failed confirmation returns to the grid."""
    seen = []
    monkeypatch.setattr(ClosedLoop, "branch_probe", planted_probe(
        lambda t, B: seen.append((t, B)) or (t, B) in {(1024, 4), (1536, 4), (4096, 8)}))
    cfg = loop_cfg(data_dir)
    kw = dict(measurement_budget=None, probe_at=[1024, 4096], noise_scale=False, launcher="inprocess")
    r = run_auto_batch(cfg, AutoBatchConfig(**kw, confirm_factor=1.5), tmp_path / "cf")
    # 4096 passes at batch 8 once; its confirmation point 6144 fails: no second raise
    assert seen == [(1024, 4), (1536, 4), (4096, 8), (6144, 8)]
    assert r["schedule"] == [[0, 4], [1536, 8]]
    ds = read_jsonl(tmp_path / "cf" / "decisions.jsonl")
    assert [d.get("confirmations") for d in ds] == [ONE_OF_TWO, TWO_OF_TWO, ONE_OF_TWO, None]
    seen.clear()
    r0 = run_auto_batch(cfg, AutoBatchConfig(**kw), tmp_path / "grid")  # without it: only the scheduled points
    assert seen == [(1024, 4), (4096, 4)] and r0["schedule"] == [[0, 4]]
    with pytest.raises(ConfigError, match="confirm_factor=1.0 must be > 1"):
        run_auto_batch(cfg, AutoBatchConfig(**kw, confirm_factor=1.0), tmp_path / "bad")


def test_eps_budget_stops_raises_from_adding_up(data_dir, tmp_path, monkeypatch):
    """Every probe passes with 2B 0.006 behind: per decision the loop raises at every point; with a
    budget of 0.01 for the run, the first raise spends 0.006 and the second would pass it."""
    monkeypatch.setattr(ClosedLoop, "branch_probe", planted_probe(lambda t, B: True, gap=0.006))
    cfg = loop_cfg(data_dir)
    kw = dict(measurement_budget=None, probe_at=[1024, 2048, 4096], noise_scale=False, launcher="inprocess", confirm=1)
    per = run_auto_batch(cfg, AutoBatchConfig(**kw), tmp_path / "per-decision")
    assert per["schedule"] == [[0, 4], [1024, 8], [2048, 16], [4096, 32]]
    r = run_auto_batch(cfg, AutoBatchConfig(**kw, eps_budget=0.01), tmp_path / "budget")
    assert r["schedule"] == [[0, 4], [1024, 8]]
    ds = read_jsonl(tmp_path / "budget" / "decisions.jsonl")
    assert [d.get("eps_spent") for d in ds] == [pytest.approx(0.006), None, None]
    assert ds[1]["eps_budget"] == {"spent_before": pytest.approx(0.006), "gap": pytest.approx(0.006), "budget": 0.01}
    r2 = run_auto_batch(cfg, AutoBatchConfig(**kw, eps_budget=0.012), tmp_path / "b2")  # room for exactly two
    assert r2["schedule"] == [[0, 4], [1024, 8], [2048, 16]]
    with pytest.raises(ConfigError, match="eps_budget=-0.1 must be >= 0"):
        run_auto_batch(cfg, AutoBatchConfig(**kw, eps_budget=-0.1), tmp_path / "bad")
