"""Branch-sweep throughput with one and with several branches per GPU (the local process pool).

One invocation trains a short base run of ``--preset`` with a kept checkpoint, then runs the same
branch sweep from two copies of it: with 1 branch per GPU (``jobs`` = GPUs) and with 4 per GPU
(``jobs`` = 4 x GPUs; ``_worker_env`` gives slot s the GPU s mod GPUs). For each it prints the
sweep's tokens/s per GPU — all branch tokens over the sweep's wall time, process start-up included,
divided by the GPUs — and the MFU that is, against the GPU's dense bf16 peak
(``critbatch.perf.peak_flops``; ``CRITBATCH_PEAK_FLOPS`` overrides). Both sweeps compute the
same branches, so their losses must agree (bitwise on CPU; GPU kernels need not be bitwise
deterministic, so there it fails only beyond 1% relative). Figures go to ``OUT/bench.json``.

On a CUDA machine (every visible GPU is used; restrict with CUDA_VISIBLE_DEVICES):

    python bench/gpu_sweep.py --out runs/gpu-sweep                 # sized for minutes per GPU (not yet run on one)
    python bench/gpu_sweep.py --out runs/gpu-sweep --per-gpu 1,2,4,8

Without CUDA a "GPU" is a process slot of ``--threads`` cores and MFU is against the fp32 matmul
rate measured here with that many threads (stated as such):

    python bench/gpu_sweep.py --quick                               # ~25 s on a 2-core CPU (1 slot)
    python bench/gpu_sweep.py --quick --gpus 2                      # both cores as two slots
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path


def branch_tokens(run: Path) -> tuple[int, float]:
    """(tokens trained, summed training-loop seconds) over the run's branches."""
    tokens, loop_s = 0, 0.0
    for r in (run / "branches").glob("*/result.json"):
        res = json.loads(r.read_text())
        tokens += res["tokens"] - res["start_tokens"]
        loop_s += res["wall_time_s"]
    return tokens, loop_s


def main() -> None:
    import torch

    from critbatch import presets
    from critbatch.branch import SweepConfig, run_sweep
    from critbatch.config import merge
    from critbatch.train import train
    from critbatch.perf import matmul_flops, peak_flops

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo", help="size preset of the base run and its branches (the demo's)")
    ap.add_argument("--out", default="runs/gpu-sweep")
    ap.add_argument("--quick", action="store_true", help="short base run and windows: a smoke test")
    ap.add_argument("--per-gpu", default="1,4", help="branches per GPU to compare (comma-separated)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per branch process")
    ap.add_argument("--gpus", type=int, default=None,
                    help="GPUs to use (on CPU: process slots); default all visible GPUs, or cores / threads "
                         "(1 with --quick on CPU, where process start-up dominates)")
    ap.add_argument("--waves", type=int, default=1, help="branches = GPUs x max(per-gpu) x waves")
    ap.add_argument("--window-tokens", type=int, default=None,
                    help="tokens per branch (default: 512 steps of the largest branch batch; 4 with --quick)")
    a = ap.parse_args()

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    slots = a.gpus or (torch.cuda.device_count() if cuda else 1 if a.quick else max(1, _cores() // a.threads))
    if cuda and a.gpus:
        import os

        from critbatch.launch import visible_gpus

        os.environ["CRITBATCH_GPUS"] = ",".join(visible_gpus()[:slots])  # the pool hands out these
    per_gpu = [int(x) for x in a.per_gpu.split(",") if x.strip()]
    waves = a.waves
    out = Path(a.out)
    for old in [out / "base", *out.glob("per_gpu_*")]:  # fresh work: finished branches would be skipped
        if old.exists():
            shutil.rmtree(old)

    base_cfg = presets.get(a.preset)
    B, T = base_cfg.batch_seqs, base_cfg.model.seq_len
    ks = [0.5, 1.0, 2.0, 4.0]
    step_max = int(max(ks) * B) * T  # tokens of one step of the largest branch batch
    point = 16 * B * T if a.quick else 256 * B * T
    window = a.window_tokens or (4 if a.quick else 512) * step_max
    n_branches = slots * max(per_gpu) * waves
    replicates = math.ceil(n_branches / len(ks))
    cfg = merge(base_cfg, {"total_tokens": point, "checkpoint_tokens": [point], "device": device,
                           "eval_seqs": 32 if a.quick else 256, "data": {"allow_repeat": True},
                           "save_interval_tokens": point})

    print(f"device {device}: {slots} {'GPU(s)' if cuda else f'process slot(s) of {a.threads} thread(s)'}; "
          f"preset {a.preset}, base batch {B} x {T} tokens")
    t0 = time.perf_counter()
    base = train(cfg, out / "base", progress=False)
    print(f"base run: {base['tokens']:,} tokens in {time.perf_counter() - t0:.1f}s")
    if cuda:
        torch.cuda.empty_cache()  # the branches get the GPUs; this process keeps only its context
    fpt = base["flops_per_token"]
    if cuda:
        peak, peak_note = peak_flops(torch.device("cuda")), "dense bf16 peak"
        if peak is None:
            peak, peak_note = matmul_flops("cuda", a.threads), "measured fp32 matmul (unknown GPU)"
    else:
        peak, peak_note = matmul_flops("cpu", a.threads), f"measured fp32 matmul on {a.threads} thread(s)"
    print(f"branches: {len(ks) * replicates} (k {', '.join(f'{k:g}' for k in ks)} x {replicates} replicates), "
          f"window {window:,} tokens; MFU against {peak / 1e12:.3g} TFLOP/s per {'GPU' if cuda else 'slot'} "
          f"({peak_note})\n")

    rows, curves = [], {}
    head = f"{'per GPU':>7s} {'jobs':>5s} {'wall s':>8s} {'tokens':>12s} {'tok/s per GPU':>14s} {'MFU':>7s} {'tok/s per branch':>17s}"
    print(head)
    for n in per_gpu:
        run = out / f"per_gpu_{n}"
        shutil.copytree(out / "base", run, ignore=shutil.ignore_patterns("branches", "sweeps"))
        sc = SweepConfig(run=str(run), at=[point], k=ks, window_tokens=window, replicates=replicates,
                         launcher="local", jobs=slots * n, threads_per_branch=a.threads, device=device,
                         eval_seqs=32 if a.quick else 256)
        t = time.perf_counter()
        res = run_sweep(sc, progress=False)
        wall = time.perf_counter() - t
        tokens, loop_s = branch_tokens(run)
        per_slot = tokens / wall / slots
        mfu = per_slot * fpt / peak
        per_branch = tokens / loop_s  # inside the training loop, without process start-up
        rows.append({"per_gpu": n, "jobs": slots * n, "wall_s": wall, "tokens": tokens, "tokens_per_s_per_gpu": per_slot,
                     "mfu": mfu, "branch_loop_tokens_per_s": per_branch})
        curves[n] = [v for p in res.curve["points"] for by in p["losses"].values() for vals in by for v in vals]
        print(f"{n:7d} {slots * n:5d} {wall:8.1f} {tokens:12,d} {per_slot:14,.0f} {mfu:7.2%} {per_branch:17,.0f}")
    first = curves[per_gpu[0]]
    diff = max((0.0 if x == y else abs(x - y) / abs(y)) for c in curves.values() for x, y in zip(c, first))
    same = diff == 0.0
    print("\nbranch losses across branches-per-GPU settings: "
          + ("identical" if same else f"max relative difference {diff:.2e}"))
    summary = {"device": device, "slots": slots, "preset": a.preset, "quick": a.quick, "threads": a.threads,
               "flops_per_token": fpt, "peak_flops": peak, "peak_note": peak_note, "window_tokens": window,
               "branches": len(ks) * replicates, "rows": rows, "losses_identical": same, "max_rel_loss_diff": diff,
               "gpu_name": torch.cuda.get_device_name(0) if cuda else None}
    (out / "bench.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{out / 'bench.json'}")
    if diff > (0.0 if device == "cpu" else 1e-2):
        raise SystemExit("the sweeps disagree: results must not depend on how many branches share a GPU")


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


if __name__ == "__main__":
    main()
