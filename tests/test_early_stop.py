"""Early stopping of settled branches (issue 15, "stop spending on settled questions"): the paired
gap reading, the pause it causes (a resume checkpoint; the branch continued later equals the branch
trained whole), and sweeps that stop early deciding exactly as full windows on the same points."""

import json
import shutil

import pytest
import torch

from conftest import small_cfg
from critbatch.branch import SweepConfig, run_sweep
from critbatch.branch import describe_point
from critbatch.cli import main
from critbatch.io import read_json
from critbatch.launch import run_job, write_job
from critbatch.analysis.describe import describe_sweep_cost
from critbatch.train import train
from critbatch.train.early_stop import STOP_RULE_FILE, STOPPED_FILE, GapReading
from critbatch.train.stacked import job_stack_key


def test_gap_reading_pairs_the_spans_where_both_runs_end_a_step():
    # reference: steps of 8 tokens; branch: steps of 12; both end a step every 24 tokens
    ref = [(8 * i, 1.0 + 0.1 * i, 8) for i in range(1, 13)]  # ends 8..96
    br = [(12 * i, 2.0 - 0.05 * i, 12) for i in range(1, 9)]  # ends 12..96

    def ref_mean(a, b):
        return sum(v for e, v, _ in ref if a < e <= b) / ((b - a) // 8)

    def br_mean(a, b):
        return sum(v for e, v, _ in br if a < e <= b) / ((b - a) // 12)

    g = GapReading(ref, from_tokens=24)
    for s in br:
        g.add(*s)
    assert g.diffs == pytest.approx([br_mean(a, a + 24) - ref_mean(a, a + 24) for a in (24, 48, 72)], abs=1e-12)
    # a start between two shared boundaries: the first span begins at the next one (48), and the
    # branch's step 36-48 that straddles the start is not read
    g = GapReading(ref, from_tokens=30)
    for s in br:
        g.add(*s)
    assert g.diffs == pytest.approx([br_mean(a, a + 24) - ref_mean(a, a + 24) for a in (48, 72)], abs=1e-12)
    m, se, n = g.reading()
    assert n == 2 and m == pytest.approx(sum(g.diffs) / 2)
    # the reference from the window's start: its first step's start counts as a shared boundary
    g = GapReading(ref, from_tokens=0)
    for s in br:
        g.add(*s)
    assert len(g.diffs) == 4


def test_gap_reading_settles_only_beyond_the_gap_at_z_errors_with_enough_spans():
    ref = [(10 * i, 3.0, 10) for i in range(1, 41)]
    g = GapReading(ref, 0)
    for i in range(1, 41):
        g.add(10 * i, 3.05 + (0.01 if i % 2 else -0.01), 10)  # gap 0.05, sd 0.01
    m, se, n = g.reading()
    assert n == 40 and m == pytest.approx(0.05) and se == pytest.approx(0.01 * (40 / 39) ** 0.5 / 40 ** 0.5)
    assert g.settled(gap=0.04, z=2, min_spans=8)
    assert not g.settled(gap=0.049, z=2, min_spans=8)  # within 2 standard errors of the gap
    assert not g.settled(gap=0.04, z=2, min_spans=41)  # too few spans
    assert not GapReading(ref, 0).settled(0.0, 2, 1)  # nothing read: never settled


def _job(tmp_path, data_dir, name, rule=None):
    cfg = small_cfg(data_dir, total_tokens=2048, batch_seqs=8, eval_interval_tokens=0, save_interval_tokens=1024)
    d = write_job(tmp_path / name, cfg, eval_at_start=False)
    if rule is not None:
        (d / STOP_RULE_FILE).write_text(json.dumps(rule))
    return d


def _rule(ref_loss, min_spans=3, gap=0.5):
    # a planted reference with the branch's own step boundaries (128 tokens) and a constant loss
    return {"gap": gap, "z": 2.0, "min_spans": min_spans, "from_tokens": 256, "reference_branch": "planted",
            "reference": [[128 * i, ref_loss, 128] for i in range(1, 17)]}


def test_a_settled_branch_pauses_and_continued_later_equals_the_whole_branch(data_dir, tmp_path):
    torch.set_num_threads(1)
    d = _job(tmp_path, data_dir, "stopped", _rule(ref_loss=0.0))  # the branch is ~5 nats worse: settled at once
    assert job_stack_key(d) is None  # a branch with a stop rule trains alone
    assert run_job(d, threads=1) is None
    st = read_json(d / STOPPED_FILE)
    # spans start at 256 (step 3); three spans read after step 5: paused at 640 tokens
    assert st["tokens"] == 640 and st["spans"] == 3 and st["steps"] == 5 and st["gap_mean"] > 4
    assert not (d / "result.json").exists() and (d / "ckpt" / "resume_tok_000000000640").is_dir()
    # run again under the same rule: it is still settled, so it pauses at once, training nothing
    assert run_job(d, threads=1) is None
    assert read_json(d / STOPPED_FILE)["tokens"] == 640 and read_json(d / STOPPED_FILE)["steps"] == 5
    # without the rule it trains on to the window's end, and equals the branch trained whole
    (d / STOP_RULE_FILE).unlink()
    r = run_job(d, threads=1)
    assert not (d / STOPPED_FILE).exists() and r["tokens"] == 2048
    whole = run_job(_job(tmp_path, data_dir, "whole"), threads=1)
    assert r["final_eval_loss"] == whole["final_eval_loss"] and r["final_train_loss"] == whole["final_train_loss"]
    assert job_stack_key(d) is not None


def test_an_unsettled_branch_trains_its_whole_window(data_dir, tmp_path):
    torch.set_num_threads(1)
    d = _job(tmp_path, data_dir, "on", _rule(ref_loss=100.0))  # far better than the reference: never stops
    r = run_job(d, threads=1)
    assert r["tokens"] == 2048 and not (d / STOPPED_FILE).exists()


@pytest.fixture(scope="module")
def parent(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("es") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(small_cfg(data_dir, total_tokens=4096, batch_seqs=4, checkpoint_tokens=[512, 1024],
                        lr_schedule={"kind": "cosine", "warmup_tokens": 256}), run, progress=False)
    finally:
        torch.set_num_threads(threads)
    return run


def _sweep(run, **over):
    # the LR held at the parent's for every k: early on, larger batches take fewer steps and fail
    # by far more than eps, which is what an early stop can settle
    c = dict(run=str(run), at=[512, 1024], k=[0.5, 1, 2, 4], window_tokens=8192, lr_rule="none", eval_seqs=64,
             launcher="inprocess")
    c.update(over)
    return run_sweep(SweepConfig(**c), progress=False).curve


def _decisions(curve):
    return [(p["status"], p["cbs_low_seqs"], p["cbs_high_seqs"]) for p in curve["points"]]


@pytest.mark.slow
@pytest.mark.parametrize("search,launcher", [("grid", "local"), ("adaptive", "inprocess")])
def test_a_sweep_that_stops_early_decides_as_full_windows_for_fewer_tokens(parent, tmp_path, search, launcher, capsys):
    run = tmp_path / "run"
    shutil.copytree(parent, run)
    over = dict(search=search, k_min=0.5, k_max=4) if search == "adaptive" else {}
    if launcher == "local":  # through the command line, in worker processes; the sweeps after it in process
        over["at"] = [512]
        argv = ["branch", "--run", str(run), "--at", "512", "--k", "0.5,1,2,4", "--window-tokens", "8192",
                "--lr-rule", "none", "--eval-seqs", "64", "--launcher", "local", "--jobs", "2",
                "--early-stop-gap", "0.02", "--no-progress"]
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "stopped early as failing" in out and " stopped early (" in out
    early = _sweep(run, early_stop_gap=0.02, **over)
    stopped = [(p["tokens"], k) for p in early["points"] for k, reps in zip(p["ks"], p["stopped_early"]) if reps[0]]
    assert len(stopped) >= 2 and early["cost"]["stopped_early"] == len(stopped)
    for p in early["points"]:
        for k, st, reps in zip(p["ks"], p["status"], p["stopped_early"]):
            if reps[0]:
                assert st == "fail" and reps[0]["gap_mean"] - reps[0]["z"] * reps[0]["gap_se"] > 0.02
    # full windows on the same points: the stopped branches are continued to their ends
    full = _sweep(run, **over)
    assert not any(x for p in full["points"] for reps in p["stopped_early"] for x in reps)
    assert _decisions(early) == _decisions(full)
    saved = early["cost"]["early_stop_saved_tokens"]
    assert saved > 0 and early["cost"]["branch_tokens"] == full["cost"]["branch_tokens"] - saved
    assert "stopped early as failing" in " ".join(describe_point(p) for p in early["points"])
    saved = early["cost"]["early_stop_saved_tokens"]
    assert f"{len(stopped)} branches stopped early ({saved:,} tokens saved) once settled as failing" in \
        describe_sweep_cost(early["cost"])
    assert "; 1 branch stopped early" in describe_sweep_cost({**early["cost"], "stopped_early": 1})
    # the figure marks the stopped batches (they have no loss at the window's end)
    svg = (run / "sweeps" / early["sweep_id"] / "loss_vs_batch.svg").read_text()
    assert 'id="stopped-early' in svg and "stopped early" in svg
    assert 'id="stopped-early' not in (run / "sweeps" / full["sweep_id"] / "loss_vs_batch.svg").read_text()
    # the early-stopping sweep again: every branch is finished now, its full results decide
    again = _sweep(run, early_stop_gap=0.02, **over)
    assert again["cost"]["stopped_early"] == 0 and _decisions(again) == _decisions(full)


def test_a_damaged_stop_rule_is_one_clear_error(data_dir, tmp_path):
    from critbatch.errors import ConfigError

    rule = _rule(ref_loss=0.0)
    del rule["gap"]
    d = _job(tmp_path, data_dir, "bad", rule)
    with pytest.raises(ConfigError, match="stop_rule.json lacks gap"):
        run_job(d, threads=1)
    assert not (d / "result.json").exists() and not (d / STOPPED_FILE).exists()


@pytest.mark.slow
def test_a_job_stopped_early_under_submitit_is_done_not_failed(data_dir, tmp_path):
    from critbatch.launch.slurm import run_submitit

    d = _job(tmp_path, data_dir, "stopped", _rule(ref_loss=0.0))
    done = []
    run_submitit([d], 1, 1, "submitit-local", done.append, slurm={"folder": str(tmp_path / "submitit")})
    assert done == [d] and read_json(d / STOPPED_FILE)["tokens"] == 640 and not (d / "result.json").exists()
