"""Branch sweeps on real (tiny) training runs."""

import shutil

import pytest

from conftest import StreamRecorder, fresh_parent, small_cfg
from critbatch.branch import SweepConfig, plan_sweep, run_branch_dir, run_sweep
from critbatch.branch import branch_spec, describe_point, ensure_branch
from critbatch.errors import ConfigError, DataError
from critbatch.io import read_json, read_jsonl
from critbatch.optim import lr_rule_multiplier, lr_schedule_factor
from critbatch.train import train


@pytest.fixture
def parent(shared_parent):
    """The session's finished parent run (conftest.shared_parent): batch 4 sequences of 16 tokens,
    kept checkpoints at 1024 and 4096."""
    return shared_parent


def read_cfg(run):
    from critbatch.config import TrainConfig, from_dict

    return from_dict(TrainConfig, read_json(run / "config.json"))


def sweep_cfg(run, **over):
    base = dict(run=str(run), at=[1024, 4096], k=[0.25, 0.5, 1, 2, 4], window_tokens=512, launcher="inprocess",
                eval_seqs=16)
    base.update(over)
    return SweepConfig(**base)


def losses_of(curve):
    return [(p["tokens"], p["losses"]) for p in curve["points"]]


def test_grid_sweep_writes_curve(parent, tmp_path):
    run = fresh_parent(parent, tmp_path)
    res = run_sweep(sweep_cfg(run), progress=False)
    c = read_json(res.sweep_dir / "cbs.json")
    assert [p["tokens"] for p in c["points"]] == [1024, 4096]
    for p in c["points"]:
        assert p["ks"] == [0.25, 0.5, 1, 2, 4] and p["batch_seqs"] == [1, 2, 4, 8, 16]
        for f in ("cbs_low_seqs", "cbs_high_seqs", "cbs_low_tokens", "cbs_high_tokens"):
            assert f in p
        assert p["cbs_low_tokens"] == p["cbs_low_seqs"] * 16
        assert len(p["losses"]["eval"]) == 5 and len(p["losses"]["train-ema"]) == 5
    csv = (res.sweep_dir / "cbs.csv").read_text().splitlines()
    assert csv[0].startswith("tokens,requested_tokens,base_batch_seqs,cbs_low_seqs,cbs_high_seqs")
    assert len(csv) == 3 and "loss_k0.25" in csv[0]
    for f in ("cbs.png", "cbs.svg", "loss_vs_batch.png", "sweep.json"):
        assert (res.sweep_dir / f).is_file()
    assert c["cost"]["branches"] == 10 and c["cost"]["branch_tokens"] == 10 * 512
    # what the curve cost against the run it measures (issue 15): 5120 branch tokens / 8192
    assert c["cost"]["base_tokens"] == 8192 and c["cost"]["branch_tokens_over_base"] == pytest.approx(5120 / 8192)


def test_each_branch_lr_and_sequences(parent, tmp_path):
    run = fresh_parent(parent, tmp_path)
    # batches 1, 4, 8 and 24 sequences: the window of 40 sequences is rounded up to 48, their lcm's multiple
    plan = plan_sweep(sweep_cfg(run, window_tokens=16 * 40, lr_rule="sqrt", k=[0.25, 1, 2, 6], cooldown_fraction=0))
    assert plan.window_tokens == 16 * 48 and "rounded up from 640 to 768 tokens" in plan.notes[0]
    parent_cfg = plan.parent
    seen = {}
    for k in (0.25, 1, 2, 6):
        spec = branch_spec(plan, plan.points[1], k, 0)
        d = ensure_branch(run, spec)
        rec = StreamRecorder()
        res = run_branch_dir(d, callbacks=[rec])
        seen[k] = rec.positions
        assert res["tokens"] - res["start_tokens"] == 16 * 48  # exactly the window, whatever k
        steps = [r for r in read_jsonl(d / "metrics.jsonl") if "train/loss" in r]
        assert res["steps"] == len(steps) == 48 // spec.batch_seqs  # whole steps only
        assert all(r["train/batch_seqs"] == spec.batch_seqs for r in steps)
        for r in steps:
            start = r["tokens"] - r["train/batch_tokens"]
            eta = parent_cfg.optim.lr * lr_schedule_factor(parent_cfg.lr_schedule, start)  # parent's LR at this token
            assert r["optim/lr"] == pytest.approx(lr_rule_multiplier("sqrt", k, 1) * eta, rel=1e-12)
    ck_offset = plan.points[1].ckpt.meta["offset_seqs"]
    for k, pos in seen.items():
        assert pos == list(range(ck_offset, ck_offset + 48)), k  # the same sequences as the k = 1 branch


def test_cooldown_probe_decays_the_lr_over_the_windows_end(parent, tmp_path):
    """With cooldown_fraction f every branch multiplies the parent's LR by a linear decay to 0 over
    the last f of its window; before that its LR is the plain continuation's."""
    run = fresh_parent(parent, tmp_path)
    plan = plan_sweep(sweep_cfg(run, window_tokens=16 * 32, k=[1, 2], cooldown_fraction=0.5))
    W, start = plan.window_tokens, plan.points[1].tokens
    for k in (1, 2):
        spec = branch_spec(plan, plan.points[1], k, 0)
        assert spec.config["lr_schedule"]["cooldown_tokens"] == W // 2
        d = ensure_branch(run, spec)
        run_branch_dir(d)
        for r in (r for r in read_jsonl(d / "metrics.jsonl") if "train/loss" in r):
            t0 = r["tokens"] - r["train/batch_tokens"]
            eta = plan.parent.optim.lr * lr_schedule_factor(plan.parent.lr_schedule, t0) * lr_rule_multiplier("sqrt", k, 1)
            decay = min(1.0, (start + W - t0) / (W // 2))
            assert r["optim/lr"] == pytest.approx(eta * decay, rel=1e-12)
    with pytest.raises(ConfigError, match="cooldown_fraction=1.5"):
        plan_sweep(sweep_cfg(run, cooldown_fraction=1.5))


def test_plain_k1_branch_is_the_parents_own_continuation(parent, tmp_path):
    """Without a cooldown, a k = 1 branch from 1024 tokens that ends at the parent's 4096 checkpoint
    computes exactly what the parent computed: the same held-out loss, bit for bit."""
    import torch

    from critbatch.train import kept_checkpoints

    run = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the branch workers run: float sums depend on the thread count
    try:
        train(read_cfg(parent), run, progress=False)
    finally:
        torch.set_num_threads(threads)
    res = run_sweep(sweep_cfg(run, at=[1024], k=[1, 2], window_tokens=4096 - 1024, cooldown_fraction=0,
                              eval_seqs=None), progress=False)
    ck = next(c for c in kept_checkpoints(run) if c.tokens == 4096)
    assert res.curve["points"][0]["losses"]["eval"][0] == [ck.meta["eval_loss"]]


def test_fractional_k_and_whole_step_windows(parent, tmp_path):
    """Every branch ends on a whole optimizer step: the window is rounded up to a multiple of the
    largest batch (here 8 sequences), so no final partial step runs at full LR."""
    run = fresh_parent(parent, tmp_path)
    plan = plan_sweep(sweep_cfg(run, window_tokens=16 * 10, k=[0.5, 1, 2]))
    assert plan.window_tokens == 16 * 16 and plan.window_tokens_requested == 160
    spec = branch_spec(plan, plan.points[0], 0.5, 0)  # 2 seqs of 16 tokens
    res = run_branch_dir(ensure_branch(run, spec))
    assert spec.batch_seqs == 2 and res["steps"] == 8
    spec = branch_spec(plan, plan.points[0], 1, 0)  # 4 seqs: 16 = 4 x 4, no partial step
    res = run_branch_dir(ensure_branch(run, spec))
    steps = [r for r in read_jsonl(run / "branches" / spec.id / "metrics.jsonl") if "train/loss" in r]
    assert [r["train/batch_seqs"] for r in steps] == [4, 4, 4, 4]
    assert res["steps"] == 4 and res["tokens"] == 1024 + 256
    # no resume checkpoints are left behind by a finished branch
    assert not (run / "branches" / spec.id / "ckpt").exists()


@pytest.mark.slow
def test_branch_isolation_order_and_jobs(parent, tmp_path):
    a = fresh_parent(parent, tmp_path / "a")
    b = fresh_parent(parent, tmp_path / "b")
    c = fresh_parent(parent, tmp_path / "c")
    ra = run_sweep(sweep_cfg(a, at=[4096], k=[0.5, 1, 2]), progress=False).curve
    # reversed order: branch by branch in the opposite order, then the sweep just collects them
    plan = plan_sweep(sweep_cfg(b, at=[4096], k=[0.5, 1, 2]))
    for k in (2, 1, 0.5):
        run_branch_dir(ensure_branch(b, branch_spec(plan, plan.points[0], k, 0)))
    rb = run_sweep(sweep_cfg(b, at=[4096], k=[0.5, 1, 2]), progress=False).curve
    # separate processes, two at a time
    rc = run_sweep(sweep_cfg(c, at=[4096], k=[0.5, 1, 2], launcher="local", jobs=2), progress=False).curve
    assert losses_of(ra) == losses_of(rb) == losses_of(rc)
    # the same branch run twice from scratch
    d = next((a / "branches").iterdir())
    first = read_json(d / "result.json")
    (d / "result.json").unlink()
    (d / "metrics.jsonl").unlink()
    (d / "config.json").unlink()
    again = run_branch_dir(d)
    assert again["final_eval_loss"] == first["final_eval_loss"] and again["final_train_loss"] == first["final_train_loss"]


def test_finished_sweep_is_a_no_op_and_changes_make_new_branches(parent, tmp_path):
    run = fresh_parent(parent, tmp_path)
    r1 = run_sweep(sweep_cfg(run, at=[1024], k=[1, 2]), progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in (run / "branches").rglob("result.json")}
    cbs = r1.sweep_dir / "cbs.json"
    before = (cbs.stat().st_mtime_ns, cbs.read_text())
    r2 = run_sweep(sweep_cfg(run, at=[1024], k=[1, 2]), progress=False)
    assert r1.sweep_dir == r2.sweep_dir
    assert (cbs.stat().st_mtime_ns, cbs.read_text()) == before and r2.curve == r1.curve  # nothing ran: untouched
    assert {p: p.stat().st_mtime_ns for p in (run / "branches").rglob("result.json")} == stamps
    r3 = run_sweep(sweep_cfg(run, at=[1024], k=[1, 2], window_tokens=1024), progress=False)
    assert r3.sweep_dir != r1.sweep_dir
    after = {p: p.stat().st_mtime_ns for p in (run / "branches").rglob("result.json")}
    assert len(after) == 4 and all(after[p] == s for p, s in stamps.items())  # old ones untouched
    # a decision parameter only: same branches reused, a new sweep directory
    r4 = run_sweep(sweep_cfg(run, at=[1024], k=[1, 2], eps=0.05), progress=False)
    assert r4.sweep_dir not in (r1.sweep_dir, r3.sweep_dir)
    assert len(list((run / "branches").rglob("result.json"))) == 4


@pytest.mark.slow
def test_sweep_killed_mid_branch_resumes_to_the_same_curve(parent, tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    ref = fresh_parent(parent, tmp_path / "ref")
    killed = fresh_parent(parent, tmp_path / "killed")
    exe = str(Path(sys.executable).parent / "critbatch")
    args = ["branch", "--at", "1024", "--k", "1,2", "--window-tokens", "16k", "--eval-seqs", "16", "--no-progress",
            "--jobs", "1"]  # one branch at a time: the kill lands inside the first
    r = subprocess.run([exe, *args, "--run", str(ref)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    p = subprocess.Popen([exe, *args, "--run", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((killed / "branches").glob("*/ckpt/resume_tok_*/meta.json")):
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    time.sleep(0.5)  # the worker dies with its parent (PR_SET_PDEATHSIG)
    done_before = len(list((killed / "branches").glob("*/result.json")))
    assert done_before < 2, "killed too late to test anything"
    r = subprocess.run([exe, *args, "--run", str(killed)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a = read_json(next((ref / "sweeps").iterdir()) / "cbs.json")
    b = read_json(next((killed / "sweeps").iterdir()) / "cbs.json")
    assert losses_of(a) == losses_of(b)
    assert [p["cbs_low_seqs"] for p in a["points"]] == [p["cbs_low_seqs"] for p in b["points"]]


def test_adaptive_sweep_and_its_cost(parent, tmp_path):
    run = fresh_parent(parent, tmp_path)
    res = run_sweep(sweep_cfg(run, at=[4096], search="adaptive", k_min=0.25, k_max=4, resolution=0.25), progress=False)
    c = res.curve
    p = c["points"][0]
    assert p["ks"][0] == 0.25 and set(p["ks"]) >= {0.25}
    # the lattice 0.25..4 step 0.25, but only batches (k x 4 sequences) that divide the 32-sequence window
    assert p["full_grid_ks"] == 5 and c["cost"]["full_grid_branch_tokens"] == 5 * 512  # batches 1, 2, 4, 8, 16
    assert c["cost"]["branch_tokens"] == len(p["ks"]) * 512
    # without a resolution: every batch that divides the window (48 sequences: 1, 2, 3, 4, 6, 8, 12, 16 <= 4 x 4)
    run2 = fresh_parent(parent, tmp_path / "b")
    res = run_sweep(sweep_cfg(run2, at=[4096], search="adaptive", k_min=0.25, k_max=4, window_tokens=768),
                    progress=False)
    p = res.curve["points"][0]
    assert res.plan.candidates == [0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4] and p["full_grid_ks"] == 8
    assert all(48 % b == 0 for b in p["batch_seqs"])  # every branch ends on a whole step


def test_diverging_branch_is_a_failed_batch(parent, tmp_path, monkeypatch):
    """A branch whose loss turns NaN is recorded as diverged and decided as a failed batch size."""
    from critbatch.model import gpt

    orig = gpt.GPT.forward

    def forward(self, idx):
        out = orig(self, idx)
        return out * float("nan") if self.training and idx.shape[0] >= 8 else out  # batches of 8+ blow up

    monkeypatch.setattr(gpt.GPT, "forward", forward)
    run = fresh_parent(parent, tmp_path)
    # eps = 1 nat: only divergence can fail a batch here
    res = run_sweep(sweep_cfg(run, at=[4096], k=[0.5, 1, 2, 4], eps=1.0), progress=False)
    p = res.curve["points"][0]
    assert p["diverged"] == [[False], [False], [True], [True]]
    assert p["passes"] == [True, True, False, False] and p["k_star"] == 1 and p["cbs_high_seqs"] == 8
    saved = read_json(res.sweep_dir / "cbs.json")["points"][0]
    assert saved["losses"]["eval"][2] == [None]  # written as null, the JSON stays valid


def test_diverged_reference_branch_leaves_the_point_undetermined(parent, tmp_path, monkeypatch):
    """The smallest batch diverges: the point is undetermined with the reason in cbs.json, on screen
    and in the report, and the schedule derived from it never steps up to it."""
    from critbatch.model import gpt

    orig = gpt.GPT.forward

    def forward(self, idx):
        out = orig(self, idx)
        return out * float("nan") if self.training and idx.shape[0] <= 2 else out  # small batches blow up

    monkeypatch.setattr(gpt.GPT, "forward", forward)
    run = fresh_parent(parent, tmp_path)
    res = run_sweep(sweep_cfg(run, at=[4096], k=[0.5, 1, 2]), progress=False)
    p = read_json(res.sweep_dir / "cbs.json")["points"][0]
    assert p["diverged"][0] == [True] and p["passes"] == [False, False, False]
    assert "k=0.5" in p["undetermined_reason"] and p["cbs_low_seqs"] == 0 and p["cbs_high_seqs"] is None
    assert describe_point(p).startswith("CBS undetermined: the smallest batch (k=0.5) diverged")
    from critbatch.report.html import build_report
    html = build_report(run).read_text()
    assert "undetermined: the smallest batch (k=0.5) diverged" in html


BAD = [
    (dict(at=[999]), ConfigError, "no kept checkpoint at 999 tokens"),
    (dict(k=[0, 1]), ConfigError, "every k must be > 0"),
    (dict(k=[-1, 1]), ConfigError, "every k must be > 0"),
    (dict(window_tokens=100), ConfigError, "the minimum window is 256"),
    (dict(eps=-0.01), ConfigError, "eps=-0.01"),
    (dict(k=[0.3, 1]), ConfigError, "k=0.3 at base batch 4 gives 1.2 sequences"),
    (dict(rule="noninf"), ConfigError, "--replicates 2"),
    (dict(rule="ttest"), ConfigError, "replaced by 'noninf'"),
    (dict(early_stop_gap=0.01), ConfigError, "early_stop_gap=0.01 must be a number above eps=0.01"),
    (dict(early_stop_gap=0.02, cooldown_fraction=0), ConfigError, "early_stop_gap needs a cooldown"),
    (dict(early_stop_gap=0.02, replicates=2, rule="eps"), ConfigError, "early_stop_gap needs replicates=1"),
]


@pytest.mark.parametrize("over,exc,needle", BAD)
def test_bad_sweeps_are_refused_before_writing(parent, tmp_path, over, exc, needle):
    run = fresh_parent(parent, tmp_path)
    with pytest.raises(exc, match=needle.replace("(", r"\(").replace(".", r"\.")):
        run_sweep(sweep_cfg(run, **over), progress=False)
    assert not (run / "sweeps").exists() and not (run / "branches").exists()


def test_missing_point_lists_existing(parent, tmp_path):
    with pytest.raises(ConfigError, match=r"kept checkpoints: 1024, 4096"):
        plan_sweep(sweep_cfg(parent, at=[2000]))


def test_incomplete_or_corrupt_parent(parent, tmp_path):
    run = fresh_parent(parent, tmp_path)
    (run / "result.json").unlink()
    with pytest.raises(DataError, match="incomplete"):
        plan_sweep(sweep_cfg(run))
    run2 = fresh_parent(parent, tmp_path / "x")
    ck = next(p for p in (run2 / "ckpt").iterdir() if p.name.startswith("tok_"))
    (ck / "optim.pt").write_bytes(b"garbage")
    with pytest.raises(DataError, match="corrupt"):
        plan_sweep(sweep_cfg(run2, at=[int(ck.name[4:])]))
    with pytest.raises(DataError, match="no config.json"):
        plan_sweep(sweep_cfg(tmp_path / "nothing"))


def test_cli_branch_bad_input_one_line(parent, tmp_path, capsys):
    from critbatch.cli import main

    run = fresh_parent(parent, tmp_path)
    code = main(["branch", "--run", str(run), "--at", "1024", "--k", "1,2", "--window-tokens", "10"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("critbatch: error: window 10 tokens is shorter") and err.count("\n") == 1
    code = main(["branch", "--run", str(run), "--at", "1024", "--k", "1,2", "--window-tokens", "512", "--eps", "-1"])
    assert code == 2
    code = main(["branch", "--run", str(run), "--at", "1024", "--k", "1,x", "--window-tokens", "512"])
    assert code == 2 and "not a comma-separated list" in capsys.readouterr().err


def test_a_branch_evaluates_once_at_its_end(parent, tmp_path):
    run = fresh_parent(parent, tmp_path)
    plan = plan_sweep(sweep_cfg(run, at=[1024], k=[1, 2]))
    spec = branch_spec(plan, plan.points[0], 2, 0)
    assert spec.config["eval_interval_tokens"] == 0  # no periodic evaluation, not a huge interval
    d = ensure_branch(run, spec)
    run_branch_dir(d)
    evals = [r for r in read_jsonl(d / "metrics.jsonl") if "eval/loss" in r]
    assert len(evals) == 1 and evals[0]["tokens"] == 1024 + plan.window_tokens


def test_a_short_branch_that_explodes_is_flagged_against_its_parents_losses(parent, tmp_path):
    """Issue 24 item 6: the divergence guard of a branch starts from its parent's baselines, so a
    branch of fewer steps than the guard's median window is flagged when its loss explodes."""
    from critbatch.config import merge
    from critbatch.train import Trainer

    ck = parent / "ckpt" / "tok_000000001024"
    cfg = merge(read_cfg(parent), {"optim": {"lr": 3.0}, "total_tokens": 1024 + 6 * 64, "eval_interval_tokens": 0,
                                   "checkpoint_tokens": []})
    res = Trainer(cfg, tmp_path / "b", init_from=ck, progress=False, quiet=True, eval_at_start=False).run()
    assert res["steps"] == 6 and res["diverged"], res
    assert "lowest value" in res["diverged_reason"]


def test_damaged_checkpoints_and_branch_files_are_named_not_misreported(parent, tmp_path, capsys):
    """Issue 24 item 8: a kept checkpoint whose meta.json is damaged is named as damaged (it was reported
    as 'no kept checkpoint at 1024 tokens'); a damaged branch.json of a finished branch is one line
    (it was an AttributeError traceback)."""
    from critbatch.cli import main

    run = fresh_parent(parent, tmp_path)
    (run / "ckpt" / "tok_000000001024" / "meta.json").write_text("{not json")
    code = main(["branch", "--run", str(run), "--at", "1024", "--k", "1,2", "--window-tokens", "512", "--launcher",
                 "inprocess", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "no readable kept checkpoint at 1024 tokens" in err and "tok_000000001024 is damaged" in err
    assert len(err.strip().splitlines()) == 1
    run2 = fresh_parent(parent, tmp_path / "two")
    res = run_sweep(sweep_cfg(run2, at=[1024], k=[1, 2]), progress=False)
    spec = next((run2 / "branches").glob("*/branch.json"))
    spec.write_text('{"id": "x"}')
    code = main(["branch", "--run", str(run2), "--at", "1024", "--k", "1,2", "--window-tokens", "512", "--launcher",
                 "inprocess", "--eval-seqs", "16", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"{spec} is damaged: it has no" in err and len(err.strip().splitlines()) == 1
    assert res.curve["points"]


def test_a_damaged_resume_checkpoint_is_said_not_skipped_silently(data_dir, tmp_path):
    from critbatch.train import Trainer

    cfg = small_cfg(data_dir, total_tokens=2048, save_interval_tokens=512)
    Trainer(cfg, tmp_path / "r", progress=False, stop_after_tokens=1024).run()
    resume = sorted((tmp_path / "r" / "ckpt").glob("resume_*"))[-1]
    (resume / "meta.json").write_text("[]")
    with pytest.warns(UserWarning, match=f"the checkpoint .*{resume.name} is damaged .* starts again from the beginning"):
        t = Trainer(cfg, tmp_path / "r", progress=False)
    assert t.resume_from is None
