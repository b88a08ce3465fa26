"""Engine throughput: tokens/s, MFU and peak memory for the presets, on CPU (and CUDA when present).

Each configuration runs in its own process so peak memory is its own. On CPU there is no vendor
peak, so MFU is given against the fp32 matmul rate measured here (a 2048^2 GEMM), stated as such.
The second table holds the micro-batch fixed and grows the global batch: peak memory must not grow.

    python bench/engine_throughput.py            # all, ~2 minutes on a 2-core CPU
    python bench/engine_throughput.py --quick    # a few seconds, for tests
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from critbatch.perf import matmul_flops


def one(spec: dict) -> dict:
    import torch

    from critbatch import presets
    from critbatch.config import merge
    from critbatch.train import Trainer

    cfg = presets.get(spec["preset"])
    over = {"total_tokens": spec["tokens"], "eval_seqs": 8, "eval_interval_tokens": 10**15, "device": spec["device"],
            "batch_seqs": spec["batch"], "micro_batch_seqs": spec["micro"], "data": {"tokenizer": "bytes"}}
    cfg = merge(cfg, over)
    t = Trainer(cfg, None, progress=False, quiet=True)
    if spec["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = t.run()
    wall = time.perf_counter() - t0
    out = {**spec, "params": res["params"], "tokens_per_s": res["tokens"] / wall,
           "flops_per_token": res["flops_per_token"]}
    if spec["device"] == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["mfu"] = out["tokens_per_s"] * res["flops_per_token"] / (t.peak_flops or matmul_flops("cuda"))
    else:
        # Whole-process peak RSS (Python + torch + data pages touched), comparable across rows.
        out["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    return out


def run_spec(spec: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default=None)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(json.loads(a.one))))
        return
    import torch

    devices = [a.device] if a.device else (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    scale = 0.05 if a.quick else 1.0
    rows = []
    for dev in devices:
        peak = matmul_flops(dev)
        print(f"\n== {dev}: measured fp32 2048^2 matmul {peak / 1e9:.1f} GFLOP/s"
              + (" (MFU below is against this, not a vendor peak)" if dev == "cpu" else ""))
        if dev == "cpu":
            grid = [("tiny", 8, 8, 300_000), ("tiny", 32, 32, 300_000), ("mini", 8, 8, 100_000)]
            if not a.quick:
                grid.append(("small", 4, 4, 20_000))
        else:
            grid = [("tiny", 64, 64, 5_000_000), ("mini", 64, 64, 5_000_000), ("small", 64, 64, 10_000_000),
                    ("gpt2-small", 32, 16, 2_000_000)]
        print(f"{'preset':10s} {'params':>8s} {'batch':>6s} {'micro':>6s} {'tokens/s':>10s} {'MFU':>7s} {'peak MB':>9s}")
        for preset, batch, micro, tokens in grid:
            r = run_spec({"preset": preset, "batch": batch, "micro": micro, "tokens": max(int(tokens * scale), 4096),
                          "device": dev})
            mfu = r.get("mfu", r["tokens_per_s"] * r["flops_per_token"] / peak)
            rows.append({**r, "mfu": mfu})
            print(f"{preset:10s} {r['params'] / 1e6:7.2f}M {batch:6d} {micro:6d} {r['tokens_per_s']:10,.0f} {mfu:7.1%} "
                  f"{r['peak_mem_mb']:9.1f}")
        print(f"\n-- {dev}: fixed micro-batch 8, growing global batch (peak memory must stay flat)")
        for batch in (8, 64, 256):
            # same tokens for every row, so the data pages touched are the same
            r = run_spec({"preset": "tiny", "batch": batch, "micro": 8, "tokens": 65_536 if a.quick else 393_216,
                          "device": dev})
            rows.append(r)
            print(f"tiny batch={batch:4d} micro=8: {r['tokens_per_s']:10,.0f} tokens/s  peak {r['peak_mem_mb']:7.1f} MB")


if __name__ == "__main__":
    main()
