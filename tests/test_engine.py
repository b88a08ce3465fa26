"""Equivalence tests of the training engine: the comparisons critbatch makes are only as good as these."""

import json
import math

import pytest
import torch

from conftest import StreamRecorder, strip_perf
from critbatch.config import merge
from critbatch.io import read_jsonl
from critbatch.optim import lr_rule_multiplier, lr_schedule_factor
from critbatch.train import Trainer, list_checkpoints, load_checkpoint, train
from critbatch.train.checkpoint import copy_checkpoint_state


class RecordPositions(StreamRecorder):
    """The stream positions every step reads, and each step's full gradient."""

    def __init__(self):
        super().__init__()
        self.grads = []

    def on_before_optim_step(self, trainer, record):
        self.grads.append(torch.cat([p.grad.flatten() for p in trainer.params]).clone())


def params_of(run_dir):
    ck = list_checkpoints(run_dir)[-1]
    return load_checkpoint(ck.path)["model"]


def test_same_sequences_whatever_batch_or_micro_batch(cfg_factory, tmp_path):
    runs = {
        "b8": cfg_factory(batch_seqs=8),
        "b8m2": cfg_factory(batch_seqs=8, micro_batch_seqs=2),
        "b4": cfg_factory(batch_seqs=4),
        "b32m4": cfg_factory(batch_seqs=32, micro_batch_seqs=4),
        "sched": cfg_factory(batch_schedule=[[0, 2], [1000, 8], [2500, 16]], micro_batch_seqs=2),
    }
    seen = {}
    for name, cfg in runs.items():
        rec = RecordPositions()
        train(cfg, tmp_path / name, callbacks=[rec], progress=False)
        seen[name] = rec.positions
    n = 4096 // 16  # 256 sequences of 16 tokens
    for name, pos in seen.items():
        assert pos == list(range(n)), name  # every sequence once, in stream order, none skipped
    # and the same positions map to the same token ids (one global order)
    t = Trainer(runs["b8"], None)
    t2 = Trainer(runs["sched"], None)
    assert torch.equal(t.stream.batch(0, n), t2.stream.batch(0, n))


def test_batch_change_mid_run_neither_skips_nor_repeats(cfg_factory, tmp_path):
    cfg = cfg_factory(batch_schedule=[[0, 3], [1000, 6], [2000, 12]], total_tokens=4000, micro_batch_seqs=3)
    rec = RecordPositions()
    res = train(cfg, tmp_path / "r", callbacks=[rec], progress=False)
    assert rec.positions == list(range(len(rec.positions)))
    steps = [r for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if "train/loss" in r]
    # phases switch at the first step starting at/after the threshold: 3*16=48 tok/step
    for r in steps:
        start = r["tokens"] - r["train/batch_tokens"]
        expect = 3 if start < 1000 else 6 if start < 2000 else 12
        assert r["train/batch_seqs"] == expect
    assert res["tokens"] == rec.positions[-1] * 16 + 16 == steps[-1]["tokens"]


def test_accumulation_equals_one_big_batch(cfg_factory, tmp_path):
    grads = {}
    for micro in (8, 4, 2, 1):
        rec = RecordPositions()
        train(cfg_factory(batch_seqs=8, micro_batch_seqs=micro, total_tokens=128 * 3), tmp_path / f"m{micro}",
              callbacks=[rec], progress=False)
        grads[micro] = rec.grads
    for micro in (4, 2, 1):
        for g_big, g_acc in zip(grads[8], grads[micro]):
            assert torch.allclose(g_big, g_acc, rtol=1e-4, atol=1e-7), micro


def test_resume_is_bitwise_identical(cfg_factory, tmp_path):
    cfg = cfg_factory(total_tokens=4096, save_interval_tokens=512, batch_schedule=[[0, 4], [2048, 8]],
                      checkpoint_tokens=[1024])
    full = train(cfg, tmp_path / "full", progress=False)
    assert Trainer(cfg, tmp_path / "half", stop_after_tokens=2048 + 64).run() is None
    assert not (tmp_path / "half" / "result.json").exists()
    half = train(cfg, tmp_path / "half", progress=False)
    pa, pb = params_of(tmp_path / "full"), params_of(tmp_path / "half")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    ma = strip_perf(read_jsonl(tmp_path / "full" / "metrics.jsonl"))
    mb = strip_perf(read_jsonl(tmp_path / "half" / "metrics.jsonl"))
    assert ma == mb
    for key in ("tokens", "steps", "final_eval_loss", "final_train_loss"):
        assert full[key] == half[key]


def test_resume_after_torn_metrics_and_leftover_tmp(cfg_factory, tmp_path):
    """A killed writer leaves a torn metrics line and a .tmp- checkpoint dir: both are ignored."""
    cfg = cfg_factory(total_tokens=2048, save_interval_tokens=512)
    full = train(cfg, tmp_path / "full", progress=False)
    Trainer(cfg, tmp_path / "k", stop_after_tokens=1024).run()
    with open(tmp_path / "k" / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "tokens": 99999, "train/lo')
    (tmp_path / "k" / "ckpt" / ".tmp-abc").mkdir()
    (tmp_path / "k" / "ckpt" / "resume_tok_000000009999").mkdir()  # no meta.json: incomplete
    again = train(cfg, tmp_path / "k", progress=False)
    assert again["final_eval_loss"] == full["final_eval_loss"]
    assert strip_perf(read_jsonl(tmp_path / "k" / "metrics.jsonl")) == strip_perf(read_jsonl(tmp_path / "full" / "metrics.jsonl"))


def test_finished_run_is_a_no_op(cfg_factory, tmp_path):
    cfg = cfg_factory(total_tokens=1024)
    a = train(cfg, tmp_path / "r", progress=False)
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    b = train(cfg, tmp_path / "r", progress=False)
    assert a["final_eval_loss"] == b["final_eval_loss"]
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before


def test_lr_equals_rule_times_schedule_across_batch_changes(cfg_factory, tmp_path):
    for rule in ("sqrt", "linear", "none"):
        cfg = cfg_factory(batch_schedule=[[0, 2], [1000, 4], [2500, 16]], total_tokens=4096,
                          optim={"lr_rule": rule, "lr": 1e-3},
                          lr_schedule={"kind": "cosine", "warmup_tokens": 512, "min_lr_ratio": 0.1})
        train(cfg, tmp_path / rule, progress=False)
        steps = [r for r in read_jsonl(tmp_path / rule / "metrics.jsonl") if "train/loss" in r]
        sched = json.loads((tmp_path / rule / "config.json").read_text())["lr_schedule"]
        assert sched["horizon_tokens"] == 4096
        from critbatch.config import LRScheduleConfig

        sc = LRScheduleConfig(**sched)
        for r in steps:
            start = r["tokens"] - r["train/batch_tokens"]
            expect = 1e-3 * lr_rule_multiplier(rule, r["train/batch_seqs"], 2) * lr_schedule_factor(sc, start)
            assert r["optim/lr"] == pytest.approx(expect, rel=1e-12)
        assert {r["train/batch_seqs"] for r in steps} == {2, 4, 16}


def test_two_runs_from_one_in_memory_checkpoint_do_not_alias(cfg_factory, tmp_path):
    parent = cfg_factory(total_tokens=2048, checkpoint_tokens=[1024])
    train(parent, tmp_path / "parent", progress=False)
    ck_path = [c for c in list_checkpoints(tmp_path / "parent") if c.kept][0].path
    in_memory = load_checkpoint(ck_path)
    pristine = copy_checkpoint_state(in_memory)
    child = cfg_factory(total_tokens=2048, batch_seqs=16, lr_ref_batch_seqs=8)
    a = train(child, tmp_path / "a", init_from=in_memory, progress=False)
    # the first run must not have changed the in-memory state the second one starts from
    for k, v in pristine["optim"]["state"].items():
        for name, t in v.items():
            assert torch.equal(t, in_memory["optim"]["state"][k][name]), (k, name)
    b = train(child, tmp_path / "b", init_from=in_memory, progress=False)
    c = train(child, tmp_path / "c", init_from=ck_path, progress=False)
    assert a["final_eval_loss"] == b["final_eval_loss"] == c["final_eval_loss"]
    assert a["steps"] == (2048 - 1024) // (16 * 16) and a["start_tokens"] == 1024


def test_optimizer_state_is_continued_not_reset(cfg_factory, tmp_path):
    train(cfg_factory(total_tokens=2048, checkpoint_tokens=[1024]), tmp_path / "p", progress=False)
    ck = [c for c in list_checkpoints(tmp_path / "p") if c.kept][0]
    t = Trainer(cfg_factory(total_tokens=2048), tmp_path / "child", init_from=ck.path)
    t._build()
    st = t.optimizer.state_dict()["state"]
    saved = load_checkpoint(ck.path)["optim"]["state"]
    assert st and all(torch.equal(st[k]["exp_avg"], saved[k]["exp_avg"]) for k in saved)
    assert float(st[0]["step"]) == ck.meta["step"]


def test_checkpoints_kept_at_requested_tokens_and_evaluated(cfg_factory, tmp_path):
    cfg = cfg_factory(total_tokens=4096, checkpoint_tokens=[0, 1000, 2048], batch_seqs=8)  # 128 tok/step
    train(cfg, tmp_path / "r", progress=False)
    kept = [c for c in list_checkpoints(tmp_path / "r") if c.kept]
    assert [(c.requested_tokens, c.tokens) for c in kept] == [(0, 0), (1000, 1024), (2048, 2048)]
    for c in kept:
        # evaluated kept checkpoints also hold their per-sequence held-out losses
        assert set(p.name for p in c.path.iterdir()) == {"model.pt", "optim.pt", "state.pt", "meta.json",
                                                          "eval_seq_losses.npy"}
        assert c.meta["offset_seqs"] * 16 == c.tokens and c.meta["eval_loss"] is not None
    recs = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert all("step" in r and "tokens" in r for r in recs)
    evals = [r["tokens"] for r in recs if "eval/loss" in r]
    assert evals == [0, 1024, 2048, 3072, 4096]
    res = json.loads((tmp_path / "r" / "result.json").read_text())
    assert {"tokens", "steps", "final_eval_loss", "final_train_loss"} <= set(res)
    assert json.loads((tmp_path / "r" / "env.json").read_text())["torch"] == torch.__version__


def test_checkpoints_without_evaluation_train_the_same_weights(cfg_factory, tmp_path):
    """eval_at_checkpoints off: kept checkpoints are saved without an evaluation (one on the eval
    interval keeps it), the run evaluates only on its interval and at the end, and every weight is
    bit for bit the evaluated run's."""
    cfg = cfg_factory(total_tokens=4096, checkpoint_tokens=[1000, 2048, 2560], batch_seqs=8, eval_interval_tokens=2048)
    train(cfg, tmp_path / "with", progress=False)
    train(merge(cfg, {"eval_at_checkpoints": False}), tmp_path / "without", progress=False)
    evals = {n: [r["tokens"] for r in read_jsonl(tmp_path / n / "metrics.jsonl") if "eval/loss" in r]
             for n in ("with", "without")}
    assert evals == {"with": [0, 1024, 2048, 2560, 4096], "without": [0, 2048, 4096]}
    kept = {n: [c for c in list_checkpoints(tmp_path / n) if c.kept] for n in ("with", "without")}
    assert [(c.tokens, c.meta["eval_loss"] is not None) for c in kept["without"]] == [(1024, False), (2048, True),
                                                                                     (2560, False)]
    assert not (kept["without"][0].path / "eval_seq_losses.npy").exists()
    for a, b in zip(kept["with"], kept["without"]):
        wa, wb = load_checkpoint(a.path)["model"], load_checkpoint(b.path)["model"]
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    fa, fb = (json.loads((tmp_path / n / "result.json").read_text())["final_eval_loss"] for n in ("with", "without"))
    assert fa == fb
    # the evaluations' wall time is recorded apart (the final one falls outside the training loop's)
    assert all(json.loads((tmp_path / n / "result.json").read_text())["eval_time_s"] > 0 for n in ("with", "without"))


def test_divergence_is_recorded_not_raised(cfg_factory, tmp_path):
    cfg = cfg_factory(optim={"name": "sgd", "lr": 1e6, "max_grad_norm": None}, total_tokens=2048,
                      lr_schedule={"kind": "constant", "warmup_tokens": 0})
    res = train(cfg, tmp_path / "d", progress=False)
    assert res["diverged"] is True and res["final_eval_loss"] is None
    assert res["diverged_at_tokens"] < 2048
    saved = json.loads((tmp_path / "d" / "result.json").read_text())  # valid JSON, no NaN
    assert saved["diverged"] is True
    assert any(r.get("train/diverged") for r in read_jsonl(tmp_path / "d" / "metrics.jsonl"))


def test_loss_explosion_without_nan_is_a_divergence(cfg_factory, tmp_path):
    """AdamW at LR 3 sends the loss from 5.5 to ~55 without a NaN: recorded as diverged, with why."""
    cfg = cfg_factory(optim={"lr": 3.0}, total_tokens=4096, lr_schedule={"kind": "constant", "warmup_tokens": 0})
    res = train(cfg, tmp_path / "x", progress=False)
    assert res["diverged"] is True and res["final_eval_loss"] is None and res["diverged_at_tokens"] < 4096
    assert res["diverged_reason"].startswith("the eval loss rose to ")  # 319 at the first eval, from 5.5
    assert json.loads((tmp_path / "x" / "result.json").read_text())["diverged_reason"] == res["diverged_reason"]
    assert [r["train/diverged_reason"] for r in read_jsonl(tmp_path / "x" / "metrics.jsonl")
            if r.get("train/diverged")] == [res["diverged_reason"]]


def test_divergence_guard_rule():
    """Above both 2x the lowest value and the lowest + 1 nat; a spike within either limit is not, and
    neither is a one-step training-loss spike the run recovers from (the quick demo's large-batch
    control had one: 3.10 -> 9.65 -> 3.04)."""
    from critbatch.train.callbacks import DivergenceGuard

    class T:
        tokens, why = 0, None

        def diverge(self, tokens, reason):
            self.why = reason

        def log(self, record):
            assert record["train/diverged"]

    def feed(key, seq, guard=None):
        g, t = guard or DivergenceGuard(), T()
        for v in seq:
            g.on_log(t, {key: v})
        return t.why

    for seq, diverged in [([9.0, 4.0, 7.9], False), ([0.5, 0.3, 0.9], False), ([9.0, 4.0, 8.1], True),
                          ([9.0, 3.0, 2.0, 5.5], True)]:
        assert (feed("eval/loss", seq) is not None) == diverged, seq
    spike = [5.5, 4.0] + [3.1] * 12 + [9.65] + [3.04] * 10
    assert feed("train/loss", spike) is None
    explosion = [5.5, 4.0] + [3.1] * 12 + [9.65, 12, 30, 55, 80, 120]
    assert "median training loss of the last 9 steps rose to" in feed("train/loss", explosion)
    g = DivergenceGuard()
    g.load_state_dict(DivergenceGuard().state_dict() | {"best": {"eval": 2.0}})  # resumed: keeps its best
    assert "lowest value 2 " in feed("eval/loss", [4.5], g)


def test_sgd_and_wsd_train(cfg_factory, tmp_path):
    res = train(cfg_factory(optim={"name": "sgd", "lr": 0.3, "lr_rule": "linear"},
                            lr_schedule={"kind": "wsd", "warmup_tokens": 256, "decay_tokens": 1024}), tmp_path / "s",
                progress=False)
    assert math.isfinite(res["final_eval_loss"]) and res["final_eval_loss"] < 5.0
    steps = [r for r in read_jsonl(tmp_path / "s" / "metrics.jsonl") if "optim/lr" in r]
    assert steps[-1]["optim/lr"] < 0.3 * 0.2  # annealing towards 0 at the end


def test_training_reduces_loss(cfg_factory, tmp_path):
    res = train(cfg_factory(total_tokens=16384, batch_seqs=8), tmp_path / "t", progress=False)
    first_eval = read_jsonl(tmp_path / "t" / "metrics.jsonl")[0]["eval/loss"]
    assert first_eval == pytest.approx(math.log(257), abs=0.1)
    assert res["final_eval_loss"] < first_eval - 1.5


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(data_dir, tmp_path):
    """A real SIGKILL at an arbitrary moment; running the same command again finishes identically."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    exe = str(Path(sys.executable).parent / "critbatch")
    args = ["train", "--preset", "tiny", "--data", str(data_dir), "--total-tokens", "40k", "--save-interval-tokens", "5k",
            "--eval-seqs", "16", "--no-progress"]
    ref = subprocess.run([exe, *args, "--out", str(tmp_path / "ref")], capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    p = subprocess.Popen([exe, *args, "--out", str(tmp_path / "k")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not any((tmp_path / "k" / "ckpt").glob("resume_tok_*/meta.json")):
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "k" / "result.json").exists(), "killed too late to test anything"
    again = subprocess.run([exe, *args, "--out", str(tmp_path / "k")], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    pa, pb = params_of(tmp_path / "ref"), params_of(tmp_path / "k")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert strip_perf(read_jsonl(tmp_path / "ref" / "metrics.jsonl")) == strip_perf(read_jsonl(tmp_path / "k" / "metrics.jsonl"))


def test_eval_loss_has_its_standard_error_and_per_sequence_losses(cfg_factory, tmp_path):
    import math

    import numpy as np

    from critbatch.train import kept_checkpoints

    res = train(cfg_factory(eval_seqs=64, checkpoint_tokens=[2048]), tmp_path / "r", progress=False)
    per = np.load(tmp_path / "r" / "eval_seq_losses.npy")
    assert per.shape == (64,) and res["eval_seqs"] == 64
    assert res["final_eval_loss"] == pytest.approx(per.mean(), rel=1e-12)
    assert res["final_eval_loss_se"] == pytest.approx(per.std(ddof=1) / math.sqrt(64), rel=1e-9)
    evals = [r for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if "eval/loss" in r]
    assert all(r["eval/loss_se"] > 0 for r in evals)
    ck = kept_checkpoints(tmp_path / "r")[0]
    at = np.load(ck.path / "eval_seq_losses.npy")
    assert ck.meta["eval_loss"] == pytest.approx(at.mean(), rel=1e-12) and ck.meta["eval_loss_se"] > 0


def test_adam_sde_rule_follows_the_batch(cfg_factory, tmp_path):
    """Malladi et al.'s rule: at k = B/B_ref, 1 - beta scales by k and eps by 1/sqrt(k); 'sde-beta2'
    leaves beta1. The LR rule is applied as before."""
    import math

    from critbatch.errors import ConfigError
    from critbatch.train import Callback, Trainer

    class Seen(Callback):
        name = "seen"

        def __init__(self):
            self.rows = []

        def on_step_end(self, trainer, rec):
            g = trainer.optimizer.param_groups[0]
            self.rows.append((rec["train/batch_seqs"], g["betas"], g["eps"], g["lr"]))

    for rule, b1_scaled in (("sde", True), ("sde-beta2", False)):
        seen = Seen()
        cfg = cfg_factory(batch_schedule=[[0, 2], [1024, 8]], total_tokens=2048, optim={"adam_rule": rule},
                          lr_schedule={"kind": "constant", "warmup_tokens": 0})
        Trainer(cfg, None, callbacks=[seen], progress=False).run()
        for b, (b1, b2), eps, lr in seen.rows:
            k = b / 2
            assert b2 == pytest.approx(1 - k * (1 - cfg.optim.beta2))
            assert b1 == pytest.approx(1 - k * (1 - cfg.optim.beta1) if b1_scaled else cfg.optim.beta1)
            assert eps == pytest.approx(cfg.optim.eps / math.sqrt(k))
            assert lr == pytest.approx(cfg.optim.lr * math.sqrt(k))
        assert {b for b, *_ in seen.rows} == {2, 8}
    with pytest.raises(ConfigError, match="beta1 < 0"):  # k = 16: 16 x (1 - 0.9) > 1
        Trainer(cfg_factory(batch_schedule=[[0, 2], [1024, 32]], optim={"adam_rule": "sde"}), None)


def test_the_start_checkpoint_is_not_kept_for_the_run(cfg_factory, tmp_path):
    """Once the model and optimizer hold it, the loaded checkpoint is dropped (at the olmo-1b size it
    is several GB)."""
    from critbatch.train import Callback

    train(cfg_factory(checkpoint_tokens=[1024]), tmp_path / "p", progress=False)
    ck = [c for c in list_checkpoints(tmp_path / "p") if c.kept][0]
    seen = []

    class Look(Callback):
        def on_train_start(self, trainer):
            seen.append([k for k, v in vars(trainer).items() if isinstance(v, dict) and "optim" in v and "model" in v])

    t = Trainer(cfg_factory(total_tokens=2048), tmp_path / "b", init_from=ck.path, callbacks=[Look()], progress=False)
    t.run()
    assert seen == [[]]


def test_every_trainer_attribute_is_declared_in_init(cfg_factory, tmp_path):
    """Issue 21: a Trainer's attributes are all set in __init__ (a run adds none), its state is a
    TrainerState, and its options are grouped."""
    from critbatch.train import Display, RunOptions, Trainer, TrainerState

    t = Trainer(cfg_factory(total_tokens=512), tmp_path / "r", progress=False, quiet=True)
    declared = set(vars(t))
    assert isinstance(t.state, TrainerState) and isinstance(t.display, Display) and isinstance(t.options, RunOptions)
    t.run()
    assert set(vars(t)) - declared == set()
