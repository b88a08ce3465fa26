"""bench/gpu_check.py runs in its CPU form (--quick): every measurement it makes has a throughput and an
MFU, the sweep ratio is there, and without --quick a CPU-only machine is refused in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env["CRITBATCH_CACHE"] = str(tmp_path / "cache")
    return env


@pytest.mark.slow
def test_gpu_check_quick_on_cpu(tmp_path):
    out = tmp_path / "x.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=_env(tmp_path), cwd=tmp_path)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    d = json.loads(out.read_text())
    assert d["status"] == "complete" and d["in_progress"] is None and d["errors"] == {}
    assert d["device"] == "cpu" and d["quick"] and "measured" in d["peak_source"] and d["peak_flops"] > 0
    for key in ("torch", "critbatch", "device_name", "wall_s"):
        assert d[key], key
    ms = d["measurements"]
    # every non-compiled measurement ran; the compiled ones are skipped on CPU, with the reason
    kinds = {(m["model"], m["loop"], m["batch_seqs"]) for m in ms.values()}
    assert kinds == {("small", "plain", 4), ("small", "plain", 16), ("small", "trainer", 4), ("small", "trainer", 16),
                     ("small", "stacked", 4), ("gpt2-small", "plain", 2)}
    assert len(d["skipped"]) == 6 and all("compiled" in n for n in d["skipped"])
    for name, m in ms.items():
        assert m["tokens_per_s_per_gpu"] > 0, name
        assert 0 < m["mfu"] <= 1, (name, m["mfu"])
        assert m["timed_steps"] >= 3 and m["timed_s"] > 0 and m["wall_s"] > 0, name
        assert not m["compile"], name
    for name in ("small_b4_trainer_eager", "small_b16_trainer_eager"):
        t = ms[name]
        assert t["vocab_size"] == 257 and t["result_json"]["tokens_per_s"] > 0 and 0 < t["result_json"]["mfu"] <= 1
        assert t["stopped_by"] == "time"
    assert ms["gpt2_b2_plain_eager"]["vocab_size"] == 50257
    st = ms["small_b4_trainer_stacked8"]  # 8 runs stepped as one stacked model, tokens of all of them
    assert st["runs_stacked"] == 8 and st["tokens_per_step"] == 8 * 4 * st["seq_len"] and st["final_loss"] > 0
    s = d["sweep"]
    assert d["sweep_branch_tokens_over_base"] > 0 and s["branch_tokens_over_base"] == d["sweep_branch_tokens_over_base"]
    assert s["tokens_from_base"] > 0  # the k = 1 branches started from the base run's checkpoints before their cooldowns
    assert s["branch_tokens"] + s["tokens_from_base"] == s["branches"] * s["window_tokens"]
    assert "small_b16_trainer_eager" in r.stdout and "sweep_branch_tokens_over_base" in r.stdout  # the table


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_gpu_check_refuses_cpu_without_quick(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.json")],
                       capture_output=True, text=True, timeout=120, env=_env(tmp_path), cwd=tmp_path)
    assert r.returncode != 0 and "GPU" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x.json").exists()
