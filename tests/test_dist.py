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

pytestmark = pytest.mark.dist
WORKER = Path(__file__).parent / "dist_worker.py"


def run_worker(nproc, data_dir, out, over, stop=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(data_dir), str(out), json.dumps(over)] + ([str(stop)] if stop else [])
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), *args]
    else:
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
