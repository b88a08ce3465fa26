"""Launchers: submitit (local executor) against in-process, preemption and requeue, data-parallel
jobs in the local pool, Slurm options, and bad input under torchrun."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import small_cfg, strip_perf
from critbatch.branch import SweepConfig, plan_sweep, run_sweep
from critbatch.errors import ConfigError, CritbatchError
from critbatch.io import read_json, read_jsonl
from critbatch.launch import run_job, run_jobs, write_job
from critbatch.launch import worker_env as _worker_env
from critbatch.train import train
from critbatch.train.checkpoint import list_checkpoints

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def parent(data_dir, tmp_path_factory):
    """A finished parent run with a kept checkpoint at 1024 tokens (batch 4 sequences of 16)."""
    run = tmp_path_factory.mktemp("parent") / "run"
    train(small_cfg(data_dir, total_tokens=2048, batch_seqs=4, checkpoint_tokens=[1024]), run, progress=False)
    return run


def sweep(run, **over):
    return SweepConfig(**{"run": str(run), "at": [1024], "k": [0.5, 1, 2], "window_tokens": 256, "eval_seqs": 16,
                          "launcher": "inprocess", **over})


def long_job_cfg(data_dir):
    """About 3 s of training (1024 steps), so that a signal reliably arrives mid-run; no periodic
    resume checkpoints, so any checkpoint found after a signal was written because of it."""
    return small_cfg(data_dir, total_tokens=131072, eval_interval_tokens=32768, save_interval_tokens=10**9)


def wait_for_training(run_dir: Path, procs_alive, timeout=60.0):
    """Block until the run has logged a training step (it is then inside the step loop)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        m = run_dir / "metrics.jsonl"
        if m.is_file() and '"train/loss"' in m.read_text():
            return
        assert procs_alive(), "the job ended before it could be signalled"
        time.sleep(0.02)
    raise AssertionError("the job did not start training in time")


def same_run(a: Path, b: Path):
    assert strip_perf(read_jsonl(a / "metrics.jsonl")) == strip_perf(read_jsonl(b / "metrics.jsonl"))
    ra, rb = read_json(a / "result.json"), read_json(b / "result.json")
    for key in ("tokens", "global_step", "final_eval_loss", "final_train_loss", "final_train_loss_last_step"):
        assert ra[key] == rb[key], key


# ---- submitit ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_submitit_local_sweep_equals_inprocess(parent, tmp_path):
    """Through submitit's code path, one job a task and three (several branches one process), the
    same numbers as in process."""
    runs = {}
    for name, slurm in (("inprocess", None), ("submitit-local", None), ("submitit-local", {"jobs_per_task": 3})):
        key = name + ("-x3" if slurm else "")
        runs[key] = tmp_path / key
        shutil.copytree(parent, runs[key])
        run_sweep(sweep(runs[key], launcher=name, jobs=2, slurm=slurm), progress=False)
    curves = {n: read_json(next((r / "sweeps").iterdir()) / "cbs.json") for n, r in runs.items()}
    a, b, c = (curves[n]["points"][0] for n in ("inprocess", "submitit-local", "submitit-local-x3"))
    assert a["losses"] == b["losses"] == c["losses"] and len(a["losses"]["eval"]) == 3
    assert (a["cbs_low_seqs"], a["cbs_high_seqs"]) == (b["cbs_low_seqs"], b["cbs_high_seqs"])
    assert (runs["submitit-local"] / "submitit").is_dir()  # its scripts and logs live beside the run
    assert not (runs["inprocess"] / "submitit").exists()
    tasks = {p.name.split("_")[0] for p in (runs["submitit-local-x3"] / "submitit").glob("*_log.out")}
    assert len(tasks) == 1  # the three branches: one task


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # field 4 of /proc/PID/stat: the parent's pid
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
def test_submitit_preempted_job_checkpoints_requeues_and_resumes(data_dir, tmp_path):
    from critbatch.launch.slurm import JobTask, make_executor, slurm_config

    cfg = long_job_cfg(data_dir)
    ref = write_job(tmp_path / "ref", cfg)
    run_job(ref, threads=1)
    d = write_job(tmp_path / "job", cfg)
    ex = make_executor("submitit-local", tmp_path / "submitit", slurm_config({}), 1)
    job = ex.submit(JobTask(threads=1), str(d))
    wait_for_training(d, lambda: not job.done())
    (task,) = _children(job._process.pid)  # the controller's one task: the Python process training
    os.kill(task, signal.SIGUSR2)  # what Slurm sends before the time limit (submitit's --signal)
    job.result()  # waits; raises if the job failed
    assert "stopped by SIGUSR2" in job.stderr()  # it was interrupted, checkpointed...
    assert "Requeued job" in job.stdout() and job.stdout().count("Starting with") == 2  # ...and requeued once
    same_run(ref, d)  # ...and resumed from its own checkpoint to the uninterrupted result


# ---- preemption of a plain worker ------------------------------------------------------------------


@pytest.mark.slow
def test_worker_pauses_on_sigusr1_with_a_checkpoint_and_resumes_to_the_same_result(data_dir, tmp_path):
    cfg = long_job_cfg(data_dir)
    ref = write_job(tmp_path / "ref", cfg)
    run_job(ref, threads=1)
    d = write_job(tmp_path / "job", cfg)
    cmd = [sys.executable, "-m", "critbatch.launch", str(d), "--threads", "1"]
    p = subprocess.Popen(cmd, env=ENV, stderr=subprocess.PIPE, text=True)
    wait_for_training(d, lambda: p.poll() is None)
    p.send_signal(signal.SIGUSR1)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGUSR1, err
    assert "stopped by SIGUSR1" in err and "Traceback" not in err
    assert not (d / "result.json").exists()
    (ck,) = list_checkpoints(d)
    assert 0 < ck.tokens < cfg.total_tokens  # saved at the step boundary after the signal
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    same_run(ref, d)


def test_stop_handlers_are_restored_after_a_run(data_dir, tmp_path):
    """A Trainer armed for preemption gives the caller's own signal handlers back when it returns."""
    seen = []
    old = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        from critbatch.train import Trainer

        t = Trainer(small_cfg(data_dir, total_tokens=512), None, progress=False, stop_on_signals=True)
        t.run()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1] and t.stop_signal is None
    finally:
        signal.signal(signal.SIGUSR1, old)


# ---- data-parallel jobs in the local pool --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.dist
def test_local_pool_runs_a_job_data_parallel_under_torchrun(data_dir, tmp_path):
    cfg = small_cfg(data_dir, batch_seqs=8, micro_batch_seqs=2, total_tokens=2048)
    one, two = write_job(tmp_path / "one", cfg), write_job(tmp_path / "two", cfg)
    run_jobs([one], 1, 1, "inprocess")
    run_jobs([two], 1, 1, "local", nproc_per_job=2)
    a = [r["train/loss"] for r in read_jsonl(one / "metrics.jsonl") if "train/loss" in r]
    b = [r["train/loss"] for r in read_jsonl(two / "metrics.jsonl") if "train/loss" in r]
    assert len(a) == len(b) == 16
    assert b == pytest.approx(a, rel=2e-5)
    assert read_json(two / "result.json")["final_eval_loss"] == pytest.approx(read_json(one / "result.json")["final_eval_loss"], rel=2e-5)


def test_gpu_groups_of_data_parallel_jobs(monkeypatch):
    monkeypatch.setenv("CRITBATCH_GPUS", "0,1,2,3")
    assert [_worker_env(1, s)["CUDA_VISIBLE_DEVICES"] for s in range(6)] == ["0", "1", "2", "3", "0", "1"]
    assert [_worker_env(1, s, 2)["CUDA_VISIBLE_DEVICES"] for s in range(3)] == ["0,1", "2,3", "0,1"]


def test_pool_stays_on_the_gpus_it_was_given(monkeypatch):
    """Started with CUDA_VISIBLE_DEVICES=2,3, the workers get physical GPUs 2 and 3, not 0 and 1."""
    import torch

    monkeypatch.delenv("CRITBATCH_GPUS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [_worker_env(1, s)["CUDA_VISIBLE_DEVICES"] for s in range(4)] == ["2", "3", "2", "3"]


@pytest.mark.slow
@pytest.mark.dist
def test_a_failed_job_under_torchrun_reports_its_own_error(data_dir, tmp_path):
    cfg = small_cfg(data_dir, batch_seqs=8, micro_batch_seqs=4, total_tokens=2048)  # 8 % (4 x 3) != 0
    d = write_job(tmp_path / "job", cfg)
    with pytest.raises(CritbatchError, match=r"job job failed: critbatch: error: batch 8 sequences of phase 0 .* world size 3$"):
        run_jobs([d], 1, 1, "local", nproc_per_job=3)
    assert not (d / "config.json").exists()


# ---- Slurm options --------------------------------------------------------------------------------


def test_slurm_options_become_sbatch_lines(tmp_path, monkeypatch):
    from critbatch.launch.slurm import make_executor, slurm_config

    fake = tmp_path / "bin"
    fake.mkdir()
    for exe in ("srun", "sbatch"):
        (fake / exe).write_text("#!/bin/sh\n")
        (fake / exe).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    cfg = slurm_config({"partition": "gpu", "account": "proj", "time_min": 30, "gpus_per_task": 1,
                        "cpus_per_task": 6, "mem_gb": 200, "array_parallelism": 16,
                        "setup": ["module load cuda"], "additional": {"reservation": "r1"}})
    ex = make_executor("slurm", tmp_path / "sub", cfg, nproc_per_job=4)
    text = ex._executor._make_submission_file_text("python -m submitit.core._submit X", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --time=30", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --ntasks-per-node=4", "#SBATCH --cpus-per-task=6", "#SBATCH --mem=200GB",
                 "#SBATCH --signal=USR2@120", "#SBATCH --reservation=r1", "module load cuda"):
        assert line in text, line
    assert ex._executor.max_num_timeout == 3


def test_slurm_launcher_without_slurm_is_one_clear_error(parent, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    run = tmp_path / "run"
    shutil.copytree(parent, run)
    with pytest.raises(CritbatchError, match=r"^launcher 'slurm' needs a Slurm cluster \(no srun/sbatch on PATH here\); "
                                             r"use 'local' or 'submitit-local'$"):
        run_sweep(sweep(run, launcher="slurm"), progress=False)
    assert not (run / "sweeps").exists() and not (run / "branches").exists()  # refused before writing


@pytest.mark.slow
@pytest.mark.dist
def test_submitit_job_of_two_tasks_is_data_parallel(data_dir, tmp_path):
    """nproc_per_job=2 through submitit: one job of two tasks, ranks from TorchDistributedEnvironment."""
    cfg = small_cfg(data_dir, batch_seqs=8, micro_batch_seqs=2, total_tokens=2048)
    one, two = write_job(tmp_path / "one", cfg), write_job(tmp_path / "two", cfg)
    run_jobs([one], 1, 1, "inprocess")
    run_jobs([two], 1, 1, "submitit-local", nproc_per_job=2, slurm={"folder": str(tmp_path / "logs")})
    a = [r["train/loss"] for r in read_jsonl(one / "metrics.jsonl") if "train/loss" in r]
    b = [r["train/loss"] for r in read_jsonl(two / "metrics.jsonl") if "train/loss" in r]
    assert len(a) == len(b) == 16 and b == pytest.approx(a, rel=2e-5)
    assert len(list((tmp_path / "logs").glob("*_1_log.out"))) == 1  # a second task ran: rank 1


def test_a_failed_submitit_job_is_reported_with_its_error_and_log(data_dir, tmp_path):
    d = write_job(tmp_path / "job", small_cfg(data_dir, batch_seqs=8, micro_batch_seqs=3))
    with pytest.raises(CritbatchError, match=r"^1 job\(s\) failed; first: job job failed: critbatch: error: batch 8 "
                                             r"sequences of phase 0 .* \(log: .*/logs/\d+_0_log\.err\)$"):
        run_jobs([d], 1, 1, "submitit-local", slurm={"folder": str(tmp_path / "logs")})
    assert not (d / "config.json").exists()


def test_sweep_refuses_to_run_under_torchrun(parent, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"^a branch sweep runs as one process, not under torchrun \(WORLD_SIZE=2\); "
                                          r"to train each job on N ranks give it nproc_per_job=N"):
        plan_sweep(sweep(parent))


@pytest.mark.parametrize("over,needle", [
    ({"slurm": {"partitoin": "gpu"}}, r"unknown slurm option 'slurm.partitoin'; accepted: partition, account"),
    ({"slurm": {"time_min": 0}}, r"slurm.time_min=0 must be >= 1"),
    ({"nproc_per_job": 2}, r"nproc_per_job=2 needs launcher local, slurm or submitit-local"),
    ({"nproc_per_job": 0, "launcher": "local"}, r"nproc_per_job=0 must be a whole number >= 1"),
])
def test_bad_launch_options_are_refused_before_writing(parent, tmp_path, over, needle):
    run = tmp_path / "run"
    shutil.copytree(parent, run)
    with pytest.raises(ConfigError, match=needle):
        plan_sweep(sweep(run, **over))
    assert not (run / "sweeps").exists() and not (run / "branches").exists()


def test_comparison_refuses_bad_launch_options_before_writing(tmp_path, monkeypatch):
    from critbatch.warmup import CompareConfig, run_compare

    out = tmp_path / "cmp"
    with pytest.raises(ConfigError, match=r"unknown slurm option 'slurm.gpus'; accepted: partition"):
        run_compare(CompareConfig(out=str(out), schedule="0:8,1k:16", preset="tiny", launcher="submitit-local",
                                  slurm={"gpus": 1}))
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"^a comparison runs as one process, not under torchrun"):
        run_compare(CompareConfig(out=str(out), schedule="0:8,1k:16", preset="tiny"))
    assert not out.exists()


# ---- bad input under torchrun -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.dist
def test_torchrun_train_refuses_a_schedule_phase_not_divisible_by_micro_times_world(data_dir, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--config", str(tiny_config(tmp_path)), "--data", str(data_dir),
            "--device", "cpu", "--total-tokens", "2048", "--batch-schedule", "0:8,1024:6", "--micro-batch-seqs", "2",
            "--no-progress"]
    r = torchrun_cli(args)
    assert_usage_error(r, "batch 6 sequences of phase 1 (from 1024 tokens) is not divisible by micro-batch 2 x world size 2")
    assert not out.exists()  # nothing written
    # the same schedule divides in one process: the world size is what made it wrong
    from critbatch.cli import main

    assert main([*args[:2], str(tmp_path / "one"), *args[3:]]) == 0


@pytest.mark.slow
@pytest.mark.dist
def test_torchrun_fsdp_refuses_the_online_noise_scale(data_dir, tmp_path):
    out = tmp_path / "run"
    r = torchrun_cli(["train", "--out", str(out), "--config", str(tiny_config(tmp_path, parallel="fsdp")), "--data",
                      str(data_dir), "--device", "cpu", "--total-tokens", "2048", "--micro-batch-seqs", "2", "--gns"])
    assert_usage_error(r, "the online noise scale (gns) needs parallel='ddp'; it is not available with parallel='fsdp'")
    assert not out.exists()


def assert_usage_error(r: subprocess.CompletedProcess, message: str) -> None:
    """Ranks print the one-line error and exit with status 2 (torchrun reports each rank's status and
    itself exits 1; a rank it stops first, once the other failed, shows -15)."""
    import re

    assert f"critbatch: error: {message}" in r.stderr
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", r.stderr)
    assert "2" in codes and set(codes) <= {"2", "-15"}, codes
    assert not re.search(r'File "[^"]*(src|site-packages)/critbatch/', r.stderr)  # no traceback through our code
    assert r.returncode != 0


def tiny_config(tmp_path, **over) -> Path:
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps({"model": {"n_layer": 2, "n_head": 2, "d_model": 32, "seq_len": 16}, "eval_seqs": 16, **over}))
    return p


def torchrun_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "critbatch", *args], env=ENV, capture_output=True, text=True, timeout=120)


def test_inprocess_threads_respect_omp_num_threads(monkeypatch):
    """A run in this process takes OMP_NUM_THREADS when the user set it (two threads beside one busy
    core made OpenMP spin: 100x slower demo branches), else the cores this process may use."""
    from critbatch.demo import DemoConfig, _threads
    from critbatch.launch import inprocess_threads, usable_cores

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert inprocess_threads() == 1 and _threads(DemoConfig(launcher="inprocess")) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert inprocess_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert inprocess_threads() == usable_cores() == len(os.sched_getaffinity(0))
    assert _threads(DemoConfig(launcher="local")) == 1


# ---- warm workers (critbatch.launch.warm): the local pool's processes train many jobs each ----------

@pytest.mark.slow
def test_warm_workers_train_many_jobs_each_with_the_results_of_in_process(data_dir, tmp_path, monkeypatch):
    from critbatch.launch import warm

    started = []
    orig = warm.Worker.__init__

    def counting(self, slot, threads):
        started.append(slot)
        orig(self, slot, threads)

    monkeypatch.setattr(warm.Worker, "__init__", counting)
    cfgs = [small_cfg(data_dir, total_tokens=512, seed=s) for s in range(5)]
    warm_dirs = [write_job(tmp_path / "warm" / f"j{i}", c) for i, c in enumerate(cfgs)]
    ref_dirs = [write_job(tmp_path / "ref" / f"j{i}", c) for i, c in enumerate(cfgs)]
    done = []
    run_jobs(warm_dirs, jobs=2, threads=1, launcher="local", on_done=done.append)
    assert sorted(started) == [0, 1] and sorted(done) == sorted(warm_dirs)  # two processes for five jobs
    run_jobs(ref_dirs, jobs=1, threads=1, launcher="inprocess")
    for a, b in zip(warm_dirs, ref_dirs):
        same_run(a, b)


@pytest.mark.slow
def test_a_killed_warm_worker_fails_only_its_job_and_the_rerun_resumes_it(data_dir, tmp_path, monkeypatch):
    from critbatch.launch import warm

    workers = []
    orig = warm.Worker.__init__

    def keep(self, slot, threads):
        orig(self, slot, threads)
        workers.append(self)

    monkeypatch.setattr(warm.Worker, "__init__", keep)
    long = write_job(tmp_path / "long", long_job_cfg(data_dir))
    short = [write_job(tmp_path / f"short{i}", small_cfg(data_dir, total_tokens=512, seed=i)) for i in range(2)]
    import threading

    box = {}
    t = threading.Thread(target=lambda: box.setdefault("err", _run_catching([long, *short])))
    t.start()
    wait_for_training(long, lambda: t.is_alive())
    workers[0].proc.send_signal(signal.SIGKILL)  # the worker holding the long job
    t.join(timeout=120)
    err = box["err"]
    assert isinstance(err, CritbatchError) and f"job {long.name} failed" in str(err) and "exit status -9" in str(err)
    assert all((d / "result.json").is_file() for d in short)  # a fresh worker trained the rest
    assert len(workers) == 2
    run_jobs([long], jobs=1, threads=1, launcher="local")  # again: it resumes and finishes
    ref = write_job(tmp_path / "ref", long_job_cfg(data_dir))
    run_jobs([ref], jobs=1, threads=1, launcher="inprocess")
    assert read_json(long / "result.json")["final_eval_loss"] == read_json(ref / "result.json")["final_eval_loss"]


def _run_catching(dirs):
    try:
        run_jobs(dirs, jobs=1, threads=1, launcher="local")
    except CritbatchError as e:
        return e
    return None


def test_workers_do_not_import_from_the_callers_directory(data_dir, tmp_path, monkeypatch):
    """A concurrent.py in the directory a sweep is started from would replace the standard package in
    a worker that put that directory first on its import path (issue 24 item 7)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "concurrent.py").write_text("raise SystemExit('imported the caller\\'s concurrent.py')\n")
    (cwd / "json.py").write_text("raise SystemExit('imported the caller\\'s json.py')\n")
    monkeypatch.chdir(cwd)
    d = write_job(cwd / "job", small_cfg(data_dir, total_tokens=512))
    run_jobs([Path("job")], jobs=1, threads=1, launcher="local")  # relative, from the hostile directory
    assert (d / "result.json").is_file()
