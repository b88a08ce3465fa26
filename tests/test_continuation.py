"""A branch whose first steps are the parent's own starts from the parent's kept checkpoint inside
its window (issue 15, "the k = 1 branch is free"): with a cooldown, a k = 1 branch trains only its
cooldown, and its numbers are those of the branch trained whole."""

import dataclasses

import pytest
import torch

from conftest import small_cfg
from critbatch.branch import SweepConfig, plan_sweep, run_branch_dir, run_sweep
from critbatch.branch import (agreeing_steps, branch_spec, continuation_checkpoints, continuation_tokens, ensure_branch,
                                   parent_continuation)
from critbatch.config import merge
from critbatch.io import read_json
from critbatch.train import train


@pytest.fixture(scope="module")
def parent(data_dir, tmp_path_factory):
    """Batch 4 x 16 tokens, cosine LR, kept checkpoints at 1024, 4096 and 4608; trained with one
    thread as the branches are, so that starting from its checkpoints is bit for bit."""
    run = tmp_path_factory.mktemp("cont") / "run"
    cfg = small_cfg(data_dir, total_tokens=8192, batch_seqs=4, checkpoint_tokens=[1024, 4096, 4608],
                    lr_schedule={"kind": "cosine", "warmup_tokens": 512})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg, run, progress=False)
    finally:
        torch.set_num_threads(threads)
    return run


def sweep(run, **over):
    base = dict(run=str(run), at=[1024], k=[1, 2], window_tokens=4096, cooldown_fraction=0.25,
                launcher="inprocess", eval_seqs=16)
    base.update(over)
    return SweepConfig(**base)


def test_k1_cooldown_branch_starts_at_the_parents_checkpoint_and_equals_the_whole_branch(parent):
    # window 4096 from 1024: the cooldown starts at 1024 + 3072 = 4096, a kept checkpoint of the parent
    res = run_sweep(sweep(parent), progress=False)
    plan = res.plan
    point = plan.points[0]
    spec1 = branch_spec(plan, point, 1, 0)
    assert spec1.from_parent_tokens == 3072 and spec1.ckpt.endswith("000000004096")
    r1 = read_json(parent / "branches" / spec1.id / "result.json")
    assert r1["start_tokens"] == 4096 and r1["tokens"] == 1024 + 4096  # trained only its cooldown
    spec2 = branch_spec(plan, point, 2, 0)
    assert spec2.from_parent_tokens == 0  # another batch: its own steps from the point
    cost = res.curve["cost"]
    assert cost["tokens_from_base"] == 3072 and cost["branch_tokens"] == 4096 + 1024
    assert cost["branch_tokens_over_base"] == pytest.approx((4096 + 1024) / 8192)
    assert res.curve["points"][0]["from_parent_tokens"] == [[3072], [0]]
    assert res.curve["points"][0]["steps"] == [[64], [32]]  # the window's steps, the parent's 48 included
    # the same branch trained whole, from the point: the same numbers, bit for bit
    whole = dataclasses.replace(spec1, id="whole_k1", ckpt=str(point.ckpt.path.relative_to(parent)), from_parent_tokens=0,
                 init_loss_ema=None)
    rw = run_branch_dir(ensure_branch(parent, whole), threads=1)
    assert rw["start_tokens"] == 1024
    assert rw["final_eval_loss"] == r1["final_eval_loss"] and rw["final_train_loss"] == r1["final_train_loss"]


def test_only_branches_that_take_the_parents_steps_continue_it(parent):
    plan = plan_sweep(sweep(parent, replicates=2, rule="eps"))
    point = plan.points[0]
    assert branch_spec(plan, point, 1, 0).from_parent_tokens == 3072
    assert branch_spec(plan, point, 1, 1).from_parent_tokens == 0  # replicate 1 reads another window
    # the branch's micro-batch differs from the parent's: float sums differ, so it trains whole
    plan = plan_sweep(sweep(parent, micro_batch_seqs=2))
    assert branch_spec(plan, plan.points[0], 1, 0).from_parent_tokens == 0
    # a cooldown that starts before the parent's 4096 checkpoint: the latest one before it is 1024 itself
    plan = plan_sweep(sweep(parent, cooldown_fraction=0.5))
    assert branch_spec(plan, plan.points[0], 1, 0).from_parent_tokens == 0
    # no cooldown: the plain continuation goes on to the last kept checkpoint inside the window
    plan = plan_sweep(sweep(parent, cooldown_fraction=0))
    spec = branch_spec(plan, plan.points[0], 1, 0)
    assert spec.from_parent_tokens == 4608 - 1024
    # another LR rule changes nothing at k = 1; another base LR would
    plan = plan_sweep(sweep(parent, lr_rule="linear"))
    assert branch_spec(plan, plan.points[0], 1, 0).from_parent_tokens == 3072


def test_without_the_parents_step_losses_the_branch_trains_whole(parent, tmp_path):
    """The smoothed training loss the branch would have reached comes from the parent's logged step
    losses; when one is missing the branch cannot reproduce it and trains its whole window."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(parent, run, ignore=shutil.ignore_patterns("branches", "sweeps"))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(l for l in lines if '"tokens": 2048,' not in l) + "\n")
    plan = plan_sweep(sweep(run))
    assert branch_spec(plan, plan.points[0], 1, 0).from_parent_tokens == 0


def test_a_sweep_says_which_kept_checkpoints_would_have_saved_tokens(parent, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(parent, run, ignore=shutil.ignore_patterns("branches", "sweeps"))
    # the cooldown starts at 1024 + 2048 = 3072; the step from there still runs at the full LR
    res = run_sweep(sweep(run, cooldown_fraction=0.5), progress=False)
    assert res.curve["cost"]["tokens_from_base"] == 0
    note = next(n for n in res.curve["notes"] if "kept checkpoints of the parent" in n)
    assert "at 3,136 tokens" in note and "saved 2,112 branch tokens" in note
    # the helper a base run uses to keep them, for points it rounds up to its step boundaries
    assert continuation_checkpoints([1000], 4096, 0.5, 64) == [3136]
    assert continuation_checkpoints([1024, 4096], 4096, 0.25, 64) == [4160, 7232]
    assert continuation_checkpoints([1024], 4096, 0.0, 64) == [5056]  # no cooldown: the last step before the end


def test_agreeing_steps_compares_every_step(parent):
    plan = plan_sweep(sweep(parent))
    point = plan.points[0]
    cfg = plan.parent
    off = point.ckpt.meta["offset_seqs"]
    steps = agreeing_steps(cfg, cfg, 1024, 2048, off)
    assert steps == list(range(1024 + 64, 2048 + 1, 64))  # a run agrees with itself at every step boundary
    assert agreeing_steps(cfg, merge(cfg, {"optim": {"lr": cfg.optim.lr * 1.01}}), 1024, 2048, off) == []
    assert agreeing_steps(cfg, merge(cfg, {"optim": {"weight_decay": 0.0}}), 1024, 2048, off) == []
    assert agreeing_steps(cfg, merge(cfg, {"data": {"stream_shift_seqs": 1}}), 1024, 2048, off) == []
    assert agreeing_steps(cfg, merge(cfg, {"precision": "bf16"}), 1024, 2048, off) == []
    # a batch change at 1536 tokens: the steps agree up to it
    sched = merge(cfg, {"batch_schedule": [[0, 4], [1536, 8]]})
    assert agreeing_steps(cfg, sched, 1024, 2048, off) == list(range(1024 + 64, 1536 + 1, 64))
    # an LR cooldown over the last 512 tokens, from 1536
    cool = merge(cfg, {"total_tokens": 2048, "lr_schedule": {"cooldown_tokens": 512, "cooldown_end_tokens": None}})
    assert agreeing_steps(cfg, cool, 1024, 2048, off)[-1] == 1600  # the step from 1536 still runs at full LR
    spec_cfg = dataclasses.replace(cfg)
    assert continuation_tokens(plan, point, spec_cfg) == 1024 + 4096 - 64  # the parent itself: up to the window's end
    assert parent_continuation(plan, point, spec_cfg)[0].tokens == 4608


def test_kept_before_the_cooldown_a_branch_is_where_a_run_raised_to_its_batch_goes_on(parent):
    """``keep_before_cooldown``: each branch keeps a checkpoint at its last step before the cooldown,
    changing no number; a run that raises its batch to the branch's at the point takes exactly the
    branch's steps up to there (LR and Adam as the run takes them: the closed loop continues from it)."""
    from critbatch.branch.spec import BranchSpec
    from critbatch.train import kept_checkpoints

    plain = run_sweep(sweep(parent), progress=False)
    kept = run_sweep(sweep(parent, keep_before_cooldown=True), progress=False)
    for key in ("losses", "status", "cbs_low_seqs", "cbs_high_seqs"):
        assert kept.curve["points"][0][key] == plain.curve["points"][0][key]
    # each branch's final evaluation is timed apart from its training (what a sweep's overhead is set against)
    assert kept.curve["cost"]["branch_eval_seconds"] > 0 and kept.curve["points"][0]["branch_eval_seconds"] > 0
    plan, point = kept.plan, kept.plan.points[0]
    # k = 2 (128 tokens a step) from 1024: window 4096, cooldown 1024; the step from 4096 still runs at full LR
    spec2 = branch_spec(plan, point, 2, 0)
    d2 = parent / "branches" / spec2.id
    assert [c.tokens for c in kept_checkpoints(d2)] == [1024 + 3200]
    assert not (kept_checkpoints(d2)[0].path / "eval_seq_losses.npy").exists()  # not evaluated there
    # the k = 1 branch starts at the parent's 4096 and keeps its own last step before the cooldown
    assert [c.tokens for c in kept_checkpoints(parent / "branches" / branch_spec(plan, point, 1, 0).id)] == [4160]
    raised = merge(plan.parent, {"batch_schedule": [[0, 4], [1024, 8]]})
    off = point.ckpt.meta["offset_seqs"]
    assert agreeing_steps(raised, BranchSpec.read(d2).train_config(), 1024, 4224, off)[-1] == 4224
