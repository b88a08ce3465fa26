"""Branches of one shape trained together as one stacked model (critbatch.train.stacked) end where
each would alone: the same per-step training losses and final held-out losses to 1e-5 in fp32."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import small_cfg
from critbatch.branch import SweepConfig, plan_sweep
from critbatch.branch import branch_spec
from critbatch.config import TrainConfig, from_dict
from critbatch.io import read_json, read_jsonl
from critbatch.launch import run_job, write_job
from critbatch.train import train
from critbatch.train.stacked import run_jobs_stacked, stack_key


@pytest.fixture(scope="module")
def parents(data_dir, tmp_path_factory):
    """One parent run with kept checkpoints at 1024 and 2048 tokens, and an identical copy."""
    root = tmp_path_factory.mktemp("stacked")
    cfg = small_cfg(data_dir, checkpoint_tokens=[1024, 2048], optim={"weight_decay": 0.1, "max_grad_norm": 0.5})
    train(cfg, root / "a", progress=False, quiet=True)
    shutil.copytree(root / "a", root / "b")
    return root


def jobs(run, ks_points, window=512):
    """Branch jobs of a sweep of ``run`` (cooldown windows), each keeping its final checkpoint."""
    plan = plan_sweep(SweepConfig(run=str(run), at=[1024, 2048], k=[1.0, 2.0], window_tokens=window, replicates=2,
                                  launcher="inprocess"))
    out = []
    for point in plan.points:
        for k, r in ks_points:
            spec = branch_spec(plan, point, k, r)
            d = run / "jobs" / spec.id
            write_job(d, from_dict(TrainConfig, spec.config), run / spec.ckpt, eval_at_start=False,
                      keep_final_checkpoint=True)
            out.append(d)
    return out


def test_stacked_branches_equal_separate_branches(parents):
    which = [(1.0, 0), (1.0, 1), (2.0, 0)]  # per point: two replicates of k=1 (stack) and one k=2 (alone at its batch)
    alone = jobs(parents / "a", which)
    together = jobs(parents / "b", which)
    for d in alone:
        run_job(d, threads=1)
    res = run_jobs_stacked(together, threads=1)
    assert len({stack_key(from_dict(TrainConfig, read_json(d / "job.json")["config"])) for d in together}) == 2
    for a, b, r in zip(alone, together, res):
        ra = read_json(a / "result.json")
        assert r == read_json(b / "result.json")
        assert r["steps"] == ra["steps"] and r["tokens"] == ra["tokens"] and not r["diverged"]
        assert abs(r["final_eval_loss"] - ra["final_eval_loss"]) < 1e-5
        la = [m["train/loss"] for m in read_jsonl(a / "metrics.jsonl") if "train/loss" in m]
        lb = [m["train/loss"] for m in read_jsonl(b / "metrics.jsonl") if "train/loss" in m]
        assert len(la) == len(lb) == r["steps"] and np.allclose(la, lb, rtol=0, atol=1e-5)
        ga = [m["train/grad_norm"] for m in read_jsonl(a / "metrics.jsonl") if "train/grad_norm" in m]
        gb = [m["train/grad_norm"] for m in read_jsonl(b / "metrics.jsonl") if "train/grad_norm" in m]
        assert np.allclose(ga, gb, rtol=1e-4, atol=1e-6)
        pa = np.load(a / "eval_losses.npy") if (a / "eval_losses.npy").exists() else None
        if pa is not None:
            assert np.allclose(pa, np.load(b / "eval_losses.npy"), atol=1e-5)
        # each checkpoint holds its own model, not the stack's storage
        ca = sorted((a / "ckpt").rglob("*.pt")) + sorted((a / "ckpt").rglob("*.safetensors"))
        cb = sorted((b / "ckpt").rglob("*.pt")) + sorted((b / "ckpt").rglob("*.safetensors"))
        assert [f.stat().st_size for f in ca] == pytest.approx([f.stat().st_size for f in cb], rel=0.01)
    # the learning rates differ between the two points: the stack kept each branch's own
    lrs = {read_jsonl(d / "metrics.jsonl")[0]["optim/lr"] for d in together}
    assert len(lrs) >= 2
    # a finished stack is returned as it is
    assert run_jobs_stacked(together, threads=1) == res


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["inprocess", "local"])
def test_a_sweep_with_stacked_branches_decides_as_one_without(parents, launcher, tmp_path):
    """Replicates of each k trained two to a stack (in process, or one worker process per stack)
    give the decisions of the same sweep trained branch by branch, and cbs.json says which ran."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(parents / "a", a, ignore=shutil.ignore_patterns("jobs", "branches", "sweeps"))
    shutil.copytree(a, b)
    kw = dict(at=[1024, 2048], k=[1.0, 2.0], window_tokens=512, replicates=2, launcher=launcher, jobs=1)
    from critbatch.branch import run_sweep

    plain = run_sweep(SweepConfig(run=str(a), stack=1, **kw), progress=False).curve
    stacked = run_sweep(SweepConfig(run=str(b), stack=2, **kw), progress=False).curve
    assert plain["cost"]["trained"] == {"alone": 8}
    assert stacked["cost"]["trained"] == {"stacked x2": 8}
    for p, q in zip(plain["points"], stacked["points"]):
        assert p["status"] == q["status"] and p["cbs_low_seqs"] == q["cbs_low_seqs"]
        assert np.allclose(p["losses"]["eval"], q["losses"]["eval"], rtol=0, atol=1e-5)
    assert plain["sweep_id"] == stacked["sweep_id"]  # how the branches ran does not define the sweep


def test_stacks_group_jobs_of_one_shape(parents):
    ds = jobs(parents / "a", [(1.0, 0), (1.0, 1), (2.0, 0), (2.0, 1)])  # 2 points x 4
    from critbatch.train.stacked import stacks

    groups = stacks(ds, 3)
    assert sorted(len(g) for g in groups) == [1, 1, 3, 3]
    assert all(len({read_json(d / "job.json")["config"]["batch_seqs"] for d in g}) == 1 for g in groups)
    assert stacks(ds, 1) == [[d] for d in ds]
    with pytest.raises(Exception, match="stack=0 must be >= 1"):
        plan_sweep(SweepConfig(run=str(parents / "a"), at=[1024], k=[1.0, 2.0], window_tokens=512, stack=0))


def test_branch_command_says_which_path_trained(parents, tmp_path, capsys):
    from critbatch.cli import main

    run = tmp_path / "r"
    shutil.copytree(parents / "a", run, ignore=shutil.ignore_patterns("jobs", "branches", "sweeps"))
    assert main(["branch", "--run", str(run), "--at", "1024", "--k", "1,2", "--window-tokens", "512",
                 "--replicates", "2", "--stack", "2", "--launcher", "inprocess"]) == 0
    assert "(4 stacked x2)" in capsys.readouterr().out


@pytest.mark.slow
def test_a_killed_stack_resumes_to_the_runs_trained_alone(parents):
    """SIGKILL of a worker training a stack after each run saved a resume checkpoint; training the
    stack again continues every run from its own checkpoint and ends where each run alone ends."""
    which = [(1.0, 0), (1.0, 1)]
    alone = jobs(parents / "a", which, window=8192)[:2]
    together = jobs(parents / "b", which, window=8192)[:2]
    for d in alone:
        run_job(d, threads=1)
    p = subprocess.Popen([sys.executable, "-m", "critbatch.launch", *map(str, together), "--threads", "1"],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE)
    t0 = time.time()
    while not all(list((d / "ckpt").glob("resume_*")) for d in together):
        assert p.poll() is None and time.time() - t0 < 120, "the stack ended before it could be killed"
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not any((d / "result.json").exists() for d in together)
    res = run_jobs_stacked(together, threads=1)
    for a, r in zip(alone, res):
        ra = read_json(a / "result.json")
        assert r["steps"] == ra["steps"] and abs(r["final_eval_loss"] - ra["final_eval_loss"]) < 1e-5
    for a, b in zip(alone, together):
        la = [m["train/loss"] for m in read_jsonl(a / "metrics.jsonl") if "train/loss" in m]
        lb = [m["train/loss"] for m in read_jsonl(b / "metrics.jsonl") if "train/loss" in m]
        assert len(la) == len(lb) and np.allclose(la, lb, rtol=0, atol=1e-5)


def test_the_sweep_chooses_stacking_by_measuring_it(parents):
    """Without --stack a sweep on CUDA times stacked against alone and takes the faster; forced to
    measure here on CPU, the choice follows the measurement; on CPU by default it is alone, unmeasured."""
    from critbatch.branch import STACK_CUDA, choose_stack

    plan = plan_sweep(SweepConfig(run=str(parents / "a"), at=[1024], k=[1.0, 2.0], window_tokens=512,
                                  launcher="inprocess"))
    stack, why = choose_stack(plan, measure=True)
    assert why["runs"] == STACK_CUDA and why["batch_seqs"] == 8 and why["alone_s_per_step"] > 0
    assert stack == (STACK_CUDA if why["stacked_s_per_step"] < why["alone_s_per_step"] else 1)
    assert why["chosen_by"].startswith("measured")
    assert choose_stack(plan) == (1, {"stack": 1, "chosen_by": "CPU: stacking measured no faster (docs/LOG.md)"})
    given = plan_sweep(SweepConfig(run=str(parents / "a"), at=[1024], k=[1.0, 2.0], window_tokens=512, stack=3))
    assert choose_stack(given) == (3, {"stack": 3, "chosen_by": "--stack"})


def _count_device_reads(monkeypatch):
    """Counts of tensor reads to the host (``item``, ``float()``, ``tolist``) made by critbatch's own
    code: each makes the host wait for the device (the optimizer's reads of its CPU step counters
    are torch's, and not counted)."""
    import collections
    import torch

    calls = collections.Counter()
    for name in ("item", "tolist", "__float__"):
        orig = getattr(torch.Tensor, name)

        def wrap(self, *a, _orig=orig, _name=name, **k):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("critbatch"):
                calls[_name] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrap)
    return calls


def test_a_step_waits_on_the_device_once(parents, tmp_path, monkeypatch):
    """The loss and the gradient norm of a step reach the host together: one read a step, and one
    for a whole stack of N runs, not 2N (on a GPU each read stalls the queue of kernel launches)."""
    from critbatch.train import Trainer
    from critbatch.train.stacked import Stack

    cfg = from_dict(TrainConfig, read_json(parents / "a" / "config.json"))
    ts = [Trainer(cfg, None, init_from=parents / "a" / "ckpt" / "tok_000000001024", progress=False, quiet=True)
          for _ in range(3)]
    for t in ts:
        t.begin()
    calls = _count_device_reads(monkeypatch)
    plan = ts[0].plan_step()
    loss, grad_norm, _ = ts[0].train_step(plan)
    assert dict(calls) == {"tolist": 1} and loss > 0 and grad_norm > 0
    calls.clear()
    out = Stack(ts).step([t.plan_step() for t in ts])
    assert dict(calls) == {"tolist": 1} and len(out) == 3 and all(o[0] > 0 for o in out)
