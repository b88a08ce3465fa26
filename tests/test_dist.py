"""Data parallelism over gloo on CPU, through torchrun (two processes)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import strip_perf
from critbatch.io import read_jsonl

pytestmark = [pytest.mark.dist, pytest.mark.slow]
WORKER = Path(__file__).parent / "dist_worker.py"


def run_in_process(data_dir, out, over, stop=None):
    """A one-process run in this process (the worker's code without a process group: a subprocess
    would only add an interpreter and torch's import)."""
    import dist_worker

    dist_worker.run(str(data_dir), Path(out), over, stop)


def run_two_ranks(data_dir, runs):
    """``runs`` ([out, over, stop]) one after another on two ranks, in one torchrun launch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [torchrun, "--standalone", "--nproc-per-node=2", str(WORKER), str(data_dir),
           json.dumps([[str(out), over, stop] for out, over, stop in runs])]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


BASE = {"batch_seqs": 8, "micro_batch_seqs": 2, "total_tokens": 2048}
SAVING = {**BASE, "save_interval_tokens": 512}
LONG = {**BASE, "total_tokens": 8192, "save_interval_tokens": 10**9}


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """Every run of this module's tests, in three phases: the one-process references and the
    one-process halves that two ranks resume; every two-rank run in one torchrun launch; the
    one-process resumes of what two ranks stopped. What a test checks between the halves of a
    resumed run is recorded here between the phases (``seen``)."""
    root = tmp_path_factory.mktemp("dist")
    seen = {}
    for name, over, stop in (("one", BASE, None), ("ref", SAVING, None), ("r12", SAVING, 1024),
                             ("gns1", {**BASE, "micro_batch_seqs": 4, "_gns": True}, None), ("sigref", LONG, None),
                             ("one1024", SAVING, 1024), ("ck12", SAVING, 1024)):
        run_in_process(data_dir, root / name, over, stop)
    run_two_ranks(data_dir, [
        (root / "two", BASE, None),
        (root / "r21", SAVING, 1024),
        (root / "r12", SAVING, None),
        (root / "gns2", {**BASE, "_gns": True}, None),
        (root / "ddp", {**BASE, "_count_syncs": True}, None),
        (root / "fsdp", {**BASE, "_count_syncs": True, "parallel": "fsdp"}, None),
        (root / "ck21", {**SAVING, "parallel": "fsdp"}, 1024),
        (root / "ck12", {**SAVING, "parallel": "fsdp"}, None),
        (root / "sig", {**LONG, "_sigusr1_rank1_at_step": 5}, None),  # last: it ends on a signal
    ])
    seen["r21 result"] = (root / "r21" / "result.json").exists()
    seen["sig result"] = (root / "sig" / "result.json").exists()
    seen["sig ckpt"] = sorted(p.name for p in (root / "sig" / "ckpt").iterdir())
    shutil.copytree(root / "ck21" / "ckpt", root / "ck21-ckpt-1024")
    for name, over in (("r21", SAVING), ("sig", LONG), ("ck21", SAVING)):
        run_in_process(data_dir, root / name, over)
    return root, seen


def positions(out):
    """Per step, the sorted stream positions read by all ranks together (all sessions)."""
    steps = {}
    for f in sorted(out.glob("positions_rank*")):
        for step, start, n in json.loads(f.read_text()):
            steps.setdefault(step, []).extend(range(start, start + n))
    return {s: sorted(v) for s, v in steps.items()}


def train_losses(out):
    return [(r["tokens"], r["train/loss"]) for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r]


def test_two_processes_equal_one(runs):
    root, _ = runs
    a, b = train_losses(root / "one"), train_losses(root / "two")
    assert [t for t, _ in a] == [t for t, _ in b] and len(a) == 16
    for (_, la), (_, lb) in zip(a, b):
        assert la == pytest.approx(lb, rel=2e-5)
    assert positions(root / "one") == positions(root / "two")
    ra = json.loads((root / "one" / "result.json").read_text())
    rb = json.loads((root / "two" / "result.json").read_text())
    assert ra["final_eval_loss"] == pytest.approx(rb["final_eval_loss"], rel=2e-5)
    # only rank 0 writes: one metrics file, no duplicated records
    assert len(strip_perf(read_jsonl(root / "two" / "metrics.jsonl"))) == len(strip_perf(read_jsonl(root / "one" / "metrics.jsonl")))


@pytest.mark.parametrize("name", ["r21", "r12"])  # saved on 2 ranks, resumed on 1; and the reverse
def test_save_at_one_world_size_resume_at_another(runs, name):
    root, seen = runs
    if name == "r21":
        assert seen["r21 result"] is False  # stopped at 1024 on two ranks, unfinished
    ref, got = positions(root / "ref"), positions(root / name)
    assert got == ref  # identical sequence consumption: none skipped, none repeated
    all_pos = [p for s in sorted(got) for p in got[s]]
    assert all_pos == list(range(len(all_pos)))
    for (ta, la), (tb, lb) in zip(train_losses(root / "ref"), train_losses(root / name)):
        assert ta == tb and la == pytest.approx(lb, rel=2e-5)


def test_online_noise_scale_per_rank_matches_micro_batches(runs):
    """Under DDP the per-rank gradients (B_small = B / world) against the all-reduced gradient give
    the same estimate as one process whose micro-batches are the ranks' shares (gns1: micro-batches
    of 4; gns2: two ranks of 2 sequences twice)."""
    root, _ = runs
    a = [r for r in read_jsonl(root / "gns1" / "metrics.jsonl") if "gns/b_simple" in r]
    b = [r for r in read_jsonl(root / "gns2" / "metrics.jsonl") if "gns/b_simple" in r]
    assert len(a) == len(b) == 16
    assert all(r["gns/b_small"] == 4 for r in a + b)
    for ra, rb in zip(a, b):
        assert rb["gns/step_grad_sq"] == pytest.approx(ra["gns/step_grad_sq"], rel=1e-3)
        assert rb["gns/step_trace_cov"] == pytest.approx(ra["gns/step_trace_cov"], rel=1e-3)


def test_a_signal_to_one_rank_pauses_every_rank_at_the_same_step(runs):
    """Preemption under DDP: only rank 1 gets SIGUSR1 (at the end of step 5), yet both ranks stop at
    the same step boundary (a rank that went on alone would hang in the next all-reduce); resuming
    in one process then consumes exactly the sequences of an uninterrupted run."""
    import signal

    root, seen = runs
    out = root / "sig"
    s0, s1 = (json.loads((out / f"stopped_rank{r}.json").read_text()) for r in (0, 1))
    assert s0 == s1 == {"signal": signal.SIGUSR1, "tokens": 5 * 8 * 16}
    assert seen["sig result"] is False and seen["sig ckpt"] == ["resume_tok_000000000640"]
    assert positions(out) == positions(root / "sigref")
    for (ta, la), (tb, lb) in zip(train_losses(root / "sigref"), train_losses(out)):
        assert ta == tb and la == pytest.approx(lb, rel=2e-5)


def test_fsdp_equals_ddp(runs):
    """FSDP2 (fully_shard) over gloo on CPU: same losses and the same sequences as DDP, and under
    both, gradients are reduced once per optimizer step: on its last micro-batch, never before."""
    root, _ = runs
    for mode in ("ddp", "fsdp"):
        for r in (0, 1):
            steps = json.loads((root / mode / f"syncs_rank{r}.json").read_text())
            assert len(steps) == 16 and all(len(s) == 2 for s in steps)  # 8 / (2 x 2): two micro-batches a step
            before = [0] + [s[-1] for s in steps[:-1]]  # the count when each step began
            assert all(s[0] == b for s, b in zip(steps, before)), (mode, steps)  # none on the first micro-batch
            assert all(s[1] > s[0] for s in steps), (mode, steps)  # and some on the last
    a, b = train_losses(root / "ddp"), train_losses(root / "fsdp")
    assert [t for t, _ in a] == [t for t, _ in b] and len(a) == 16
    for (_, la), (_, lb) in zip(a, b):
        assert la == pytest.approx(lb, rel=2e-5)
    assert positions(root / "ddp") == positions(root / "fsdp")
    ra = json.loads((root / "ddp" / "result.json").read_text())
    rb = json.loads((root / "fsdp" / "result.json").read_text())
    assert ra["final_eval_loss"] == pytest.approx(rb["final_eval_loss"], rel=2e-5)


@pytest.mark.parametrize("name", ["ck21", "ck12"])
def test_fsdp_checkpoints_are_full_and_resume_anywhere(runs, name):
    """Saved under FSDP on two ranks, resumed in one plain process (ck21), and the reverse (ck12):
    the checkpoint holds the full, unsharded model and optimizer state in the single-process format."""
    import torch

    root, _ = runs
    if name == "ck21":  # the gathered checkpoint equals the one a single process saves at 1024
        (a,), (b,) = (root / "ck21-ckpt-1024").iterdir(), (root / "one1024" / "ckpt").iterdir()
        for f in ("model.pt", "optim.pt"):
            sa, sb = torch.load(a / f, weights_only=True), torch.load(b / f, weights_only=True)
            if f == "optim.pt":
                assert sa["param_groups"] == sb["param_groups"]
                sa, sb = sa["state"], sb["state"]  # keyed by parameter index, as a plain optimizer's
                sa = {f"{i}.{k}": v for i, st in sa.items() for k, v in st.items()}
                sb = {f"{i}.{k}": v for i, st in sb.items() for k, v in st.items()}
            assert sa.keys() == sb.keys()
            for k in sa:
                torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-6)
    assert positions(root / name) == positions(root / "ref")
    for (ta, la), (tb, lb) in zip(train_losses(root / "ref"), train_losses(root / name)):
        assert ta == tb and la == pytest.approx(lb, rel=2e-5)


def test_a_joined_process_group_is_left_at_exit(tmp_path):
    """A process that joined torchrun's group leaves it while the interpreter is whole (atexit),
    even when its code never does: gloo's threads met at interpreter finalization can abort it."""
    script = tmp_path / "w.py"
    script.write_text(
        "import atexit, os, pathlib, torch.distributed as dist\n"
        "out = pathlib.Path(os.environ['OUT'])\n"
        "# registered first, so it runs last: after critbatch's own exit handler\n"
        "atexit.register(lambda: (out / f\"rank{os.environ['RANK']}\").write_text(str(dist.is_initialized())))\n"
        "from critbatch.dist import init_distributed, all_reduce_sum\n"
        "import torch\n"
        "info = init_distributed('cpu')\n"
        "assert all_reduce_sum(torch.ones(1), info).item() == 2\n")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    r = subprocess.run([torchrun, "--standalone", "--nproc-per-node=2", str(script)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert [(tmp_path / f"rank{i}").read_text() for i in (0, 1)] == ["False", "False"]
