"""Does the CBS measured on a cheap proxy transfer to a larger model on the same data? The study of
docs/LOG.md ("proxy to target transfer", issue 23), one command, resumable.

Stage ``measure``: for each corpus and model size, a base run with kept checkpoints at log-spaced
points and an adaptive branch search at each (the demo's settings: cooldown probes, eval-decided,
early stopping of settled failures). Every size trains the same tokens a step (512) with the same
LR schedule shape in tokens (constant after a 10k-token warmup), each at its own peak LR: the transfer
assumes the target's LR schedule matched in tokens, and the study holds it so. Runs and sweeps are
content-addressed: a rerun trains only what is missing.

Stage ``predict`` (once ``critbatch.transfer`` exists): leave one size out, predict it from the
others, and report the fraction of its measured intervals the 90% band overlaps, the fitted size
exponent with its interval, and the proxy compute over the target run's.

    OMP_NUM_THREADS=1 python bench/transfer_study.py --out runs/transfer-study
    python bench/transfer_study.py --out runs/transfer-study --corpora sotu --sizes nano,tiny --stage measure
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SIZES = {
    # name: model shape, batch (sequences), peak LR; every size trains 512 tokens a step
    "nano": {"model": {"n_layer": 2, "n_head": 4, "d_model": 32, "seq_len": 64}, "batch_seqs": 8, "lr": 3e-3},
    "micro": {"model": {"n_layer": 2, "n_head": 4, "d_model": 64, "seq_len": 64}, "batch_seqs": 8, "lr": 3e-3},
    "tiny": {"model": {"n_layer": 3, "n_head": 4, "d_model": 96, "seq_len": 64}, "batch_seqs": 8, "lr": 3e-3},
    "mini": {"model": {"n_layer": 4, "n_head": 6, "d_model": 192, "seq_len": 128}, "batch_seqs": 4, "lr": 2e-3},
}
POINTS = [20_000, 60_000, 200_000, 600_000, 1_600_000]
TOTAL = 2_000_000
WINDOW = 98_304
WARMUP = 10_000
EVAL_TOKENS = 131_072  # held-out tokens per evaluation (2048 sequences of 64, 1024 of 128)


def train_config(size: str, data: Path, seed: int = 0):
    from critbatch import presets
    from critbatch.branch import continuation_checkpoints
    from critbatch.config import merge

    s = SIZES[size]
    T = s["model"]["seq_len"]
    keep = continuation_checkpoints(POINTS, WINDOW, 0.25, s["batch_seqs"] * T)
    return merge(presets.get("tiny"), {
        "model": s["model"], "optim": {"lr": s["lr"]}, "batch_seqs": s["batch_seqs"],
        "lr_schedule": {"kind": "constant", "warmup_tokens": WARMUP},
        "data": {"path": str(data), "order_seed": seed}, "seed": seed, "total_tokens": TOTAL,
        "checkpoint_tokens": POINTS + keep, "eval_seqs": EVAL_TOKENS // T, "eval_interval_tokens": 200_000})


def measure(out: Path, corpus: str, size: str, jobs: int) -> dict:
    from critbatch.branch import SweepConfig, run_sweep
    from critbatch.data import prepare
    from critbatch.train import train

    data = out / f"data-{corpus}"
    if not (data / "meta.json").is_file():
        prepare(data, corpus=corpus, tokenizer="bytes", quiet=True)
    run = out / f"{corpus}-{size}"
    t0 = time.time()
    res = train(train_config(size, data), run, progress=False)
    t1 = time.time()
    sw = run_sweep(SweepConfig(run=str(run), at=POINTS, window_tokens=WINDOW, search="adaptive", k_min=0.5, k_max=32.0,
                               cooldown_fraction=0.25, early_stop_gap=0.02, jobs=jobs, launcher="inprocess",
                               threads_per_branch=1), progress=False)
    t2 = time.time()
    return {"run": str(run), "sweep": str(sw.sweep_dir), "params": res["params"],
            "flops_per_token": res["flops_per_token"], "base_s": t1 - t0, "sweep_s": t2 - t1,
            "cost": sw.curve["cost"],
            "points": [{"tokens": p["tokens"], "low_tokens": (p["cbs_low_seqs"] or 0) * p["seq_len"],
                        "high_tokens": None if p["cbs_high_seqs"] is None else p["cbs_high_seqs"] * p["seq_len"]}
                       for p in sw.curve["points"]]}


def main() -> None:
    import torch

    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/transfer-study")
    ap.add_argument("--corpora", default="sotu,shakespeare")
    ap.add_argument("--sizes", default="nano,micro,tiny,mini")
    ap.add_argument("--stage", default="measure", choices=("measure", "predict", "all"))
    ap.add_argument("--jobs", type=int, default=1)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "measured.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if a.stage in ("measure", "all"):
        for corpus in a.corpora.split(","):
            for size in a.sizes.split(","):
                key = f"{corpus}-{size}"
                r = measure(out, corpus, size, a.jobs)
                state[key] = r
                state_path.write_text(json.dumps(state, indent=1))
                ivs = "; ".join(f"{p['tokens'] // 1000}k: [{p['low_tokens']:g}, {p['high_tokens']}]" for p in r["points"])
                print(f"[{key}] params {r['params']:,}  base {r['base_s']:.0f}s  sweep {r['sweep_s']:.0f}s  "
                      f"{r['cost']['branch_tokens_over_base']:.2f}x  CBS tokens {ivs}", flush=True)
    if a.stage in ("predict", "all"):
        try:
            from critbatch.transfer import leave_one_out  # noqa: F401
        except ImportError:
            sys.exit("transfer_study: the predict stage needs critbatch.transfer")


if __name__ == "__main__":
    main()
