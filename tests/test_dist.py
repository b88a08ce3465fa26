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


def run_worker(nproc, data_dir, out, over, stop=None):
    """The worker's run on ``nproc`` ranks through torchrun; a one-process run in this process (the
    same code without a process group: a subprocess would only add an interpreter and torch's import)."""
    if nproc == 1:
        import dist_worker

        dist_worker.run(str(data_dir), Path(out), over, stop)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(data_dir), str(out), json.dumps(over)] + ([str(stop)] if stop else [])
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [torchrun, "--standalone", f"--nproc-per-node={nproc}", str(WORKER), *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def positions(out):
    """Per step, the sorted stream positions read by all ranks together (all sessions)."""
    steps = {}
    for f in sorted(out.glob("positions_rank*")):
        for step, start, n in json.loads(f.read_text()):
            steps.setdefault(step, []).extend(range(start, start + n))
    return {s: sorted(v) for s, v in steps.items()}


def train_losses(out):
    return [(r["tokens"], r["train/loss"]) for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r]


def test_two_processes_equal_one(data_dir, tmp_path):
    over = {"batch_seqs": 8, "micro_batch_seqs": 2, "total_tokens": 2048}
    run_worker(1, data_dir, tmp_path / "one", over)
    run_worker(2, data_dir, tmp_path / "two", over)
    a, b = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert [t for t, _ in a] == [t for t, _ in b] and len(a) == 16
    for (_, la), (_, lb) in zip(a, b):
        assert la == pytest.approx(lb, rel=2e-5)
    assert positions(tmp_path / "one") == positions(tmp_path / "two")
    ra = json.loads((tmp_path / "one" / "result.json").read_text())
    rb = json.loads((tmp_path / "two" / "result.json").read_text())
    assert ra["final_eval_loss"] == pytest.approx(rb["final_eval_loss"], rel=2e-5)
    # only rank 0 writes: one metrics file, no duplicated records
    assert len(strip_perf(read_jsonl(tmp_path / "two" / "metrics.jsonl"))) == len(strip_perf(read_jsonl(tmp_path / "one" / "metrics.jsonl")))


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_save_at_one_world_size_resume_at_another(data_dir, tmp_path, first, second):
    over = {"batch_seqs": 8, "micro_batch_seqs": 2, "total_tokens": 2048, "save_interval_tokens": 512}
    run_worker(1, data_dir, tmp_path / "ref", over)
    run_worker(first, data_dir, tmp_path / "r", over, stop=1024)
    assert not (tmp_path / "r" / "result.json").exists()
    run_worker(second, data_dir, tmp_path / "r", over)
    ref, got = positions(tmp_path / "ref"), positions(tmp_path / "r")
    assert got == ref  # identical sequence consumption: none skipped, none repeated
    all_pos = [p for s in sorted(got) for p in got[s]]
    assert all_pos == list(range(len(all_pos)))
    for (ta, la), (tb, lb) in zip(train_losses(tmp_path / "ref"), train_losses(tmp_path / "r")):
        assert ta == tb and la == pytest.approx(lb, rel=2e-5)


def test_online_noise_scale_per_rank_matches_micro_batches(data_dir, tmp_path):
    """Under DDP the per-rank gradients (B_small = B / world) against the all-reduced gradient give
    the same estimate as one process whose micro-batches are the ranks' shares."""
    one = {"batch_seqs": 8, "micro_batch_seqs": 4, "total_tokens": 2048, "_gns": True}
    two = {"batch_seqs": 8, "micro_batch_seqs": 2, "total_tokens": 2048, "_gns": True}
    run_worker(1, data_dir, tmp_path / "one", one)
    run_worker(2, data_dir, tmp_path / "two", two)
    a = [r for r in read_jsonl(tmp_path / "one" / "metrics.jsonl") if "gns/b_simple" in r]
    b = [r for r in read_jsonl(tmp_path / "two" / "metrics.jsonl") if "gns/b_simple" in r]
    assert len(a) == len(b) == 16
    assert all(r["gns/b_small"] == 4 for r in a + b)
    for ra, rb in zip(a, b):
        assert rb["gns/step_grad_sq"] == pytest.approx(ra["gns/step_grad_sq"], rel=1e-3)
        assert rb["gns/step_trace_cov"] == pytest.approx(ra["gns/step_trace_cov"], rel=1e-3)


def test_a_signal_to_one_rank_pauses_every_rank_at_the_same_step(data_dir, tmp_path):
    """Preemption under DDP: only rank 1 gets SIGUSR1 (at the end of step 5), yet both ranks stop at
    the same step boundary (a rank that went on alone would hang in the next all-reduce); resuming
    in one process then consumes exactly the sequences of an uninterrupted run."""
    import signal

    over = {"batch_seqs": 8, "micro_batch_seqs": 2, "total_tokens": 8192, "save_interval_tokens": 10**9}
    run_worker(1, data_dir, tmp_path / "ref", over)
    out = tmp_path / "r"
    run_worker(2, data_dir, out, {**over, "_sigusr1_rank1_at_step": 5})
    s0, s1 = (json.loads((out / f"stopped_rank{r}.json").read_text()) for r in (0, 1))
    assert s0 == s1 == {"signal": signal.SIGUSR1, "tokens": 5 * 8 * 16}
    assert not (out / "result.json").exists() and (out / "ckpt" / "resume_tok_000000000640").is_dir()
    run_worker(1, data_dir, out, over)
    assert positions(out) == positions(tmp_path / "ref")
    for (ta, la), (tb, lb) in zip(train_losses(tmp_path / "ref"), train_losses(out)):
        assert ta == tb and la == pytest.approx(lb, rel=2e-5)


def test_fsdp_equals_ddp(data_dir, tmp_path):
    """FSDP2 (fully_shard) over gloo on CPU: same losses and the same sequences as DDP, and under
    both, gradients are reduced once per optimizer step: on its last micro-batch, never before."""
    over = {"batch_seqs": 8, "micro_batch_seqs": 2, "total_tokens": 2048, "_count_syncs": True}
    run_worker(2, data_dir, tmp_path / "ddp", over)
    run_worker(2, data_dir, tmp_path / "fsdp", {**over, "parallel": "fsdp"})
    for mode in ("ddp", "fsdp"):
        for r in (0, 1):
            steps = json.loads((tmp_path / mode / f"syncs_rank{r}.json").read_text())
            assert len(steps) == 16 and all(len(s) == 2 for s in steps)  # 8 / (2 x 2): two micro-batches a step
            before = [0] + [s[-1] for s in steps[:-1]]  # the count when each step began
            assert all(s[0] == b for s, b in zip(steps, before)), (mode, steps)  # none on the first micro-batch
            assert all(s[1] > s[0] for s in steps), (mode, steps)  # and some on the last
    a, b = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "fsdp")
    assert [t for t, _ in a] == [t for t, _ in b] and len(a) == 16
    for (_, la), (_, lb) in zip(a, b):
        assert la == pytest.approx(lb, rel=2e-5)
    assert positions(tmp_path / "ddp") == positions(tmp_path / "fsdp")
    ra = json.loads((tmp_path / "ddp" / "result.json").read_text())
    rb = json.loads((tmp_path / "fsdp" / "result.json").read_text())
    assert ra["final_eval_loss"] == pytest.approx(rb["final_eval_loss"], rel=2e-5)


@pytest.mark.parametrize("first,second", [((2, "fsdp"), (1, "ddp")), ((1, "ddp"), (2, "fsdp"))])
def test_fsdp_checkpoints_are_full_and_resume_anywhere(data_dir, tmp_path, first, second):
    """Saved under FSDP on two ranks, resumed in one plain process (and the reverse): the checkpoint
    holds the full, unsharded model and optimizer state in the single-process format."""
    import torch

    over = {"batch_seqs": 8, "micro_batch_seqs": 2, "total_tokens": 2048, "save_interval_tokens": 512}
    run_worker(1, data_dir, tmp_path / "ref", over)
    run_worker(first[0], data_dir, tmp_path / "r", {**over, "parallel": first[1]}, stop=1024)
    if first[1] == "fsdp":  # the gathered checkpoint equals the one a single process saves at 1024
        run_worker(1, data_dir, tmp_path / "one", over, stop=1024)
        (a,), (b,) = (tmp_path / "r" / "ckpt").iterdir(), (tmp_path / "one" / "ckpt").iterdir()
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
    run_worker(second[0], data_dir, tmp_path / "r", {**over, "parallel": second[1]})
    assert positions(tmp_path / "r") == positions(tmp_path / "ref")
    for (ta, la), (tb, lb) in zip(train_losses(tmp_path / "ref"), train_losses(tmp_path / "r")):
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
