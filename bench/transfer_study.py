"""Does the CBS measured on a cheap proxy transfer to a larger model on the same data? The study of
docs/LOG.md ("proxy to target transfer", issue 23), one command, resumable.

Stage ``measure``: for each corpus and model size, a base run with kept checkpoints at log-spaced
points and an adaptive branch search at each (the demo's settings: cooldown probes, eval-decided,
early stopping of settled failures). Every size trains the same tokens a step (512) with the same
LR schedule shape in tokens (constant after a 10k-token warmup), each at its own peak LR: the transfer
assumes the target's LR schedule matched in tokens, and the study holds it so. Runs and sweeps are
content-addressed: a rerun trains only what is missing.

Stage ``cheap``: the largest size predicted from the cheapest proxies alone (each smaller size on its
own, the two smallest together): overlap, compute ratio and the derived target schedule.

Stage ``predict`` (once ``critbatch.transfer`` exists): leave one size out, predict it from the
others, and report the fraction of its measured intervals the 90% band overlaps, the fitted size
exponent with its interval, and the proxy compute over the target run's.

    OMP_NUM_THREADS=1 python bench/transfer_study.py --out runs/transfer-study
    python bench/transfer_study.py --out runs/transfer-study --corpora sotu --sizes nano,tiny --stage measure
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

SIZES = {
    # name: model shape, batch (sequences), peak LR; every size trains 512 tokens a step
    "nano": {"model": {"n_layer": 2, "n_head": 4, "d_model": 32, "seq_len": 64}, "batch_seqs": 8, "lr": 3e-3},
    "micro": {"model": {"n_layer": 2, "n_head": 4, "d_model": 64, "seq_len": 64}, "batch_seqs": 8, "lr": 3e-3},
    "tiny": {"model": {"n_layer": 3, "n_head": 4, "d_model": 96, "seq_len": 64}, "batch_seqs": 8, "lr": 3e-3},
    "mini": {"model": {"n_layer": 4, "n_head": 6, "d_model": 192, "seq_len": 128}, "batch_seqs": 4, "lr": 2e-3},
    # 32x the nano at the nano's sequence length and peak LR: the size the nano alone costs <= 10% of
    "small": {"model": {"n_layer": 4, "n_head": 4, "d_model": 128, "seq_len": 64}, "batch_seqs": 8, "lr": 3e-3},
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


def observations(state: dict, corpus: str, sizes: list[str]):
    from critbatch.analysis.transfer import Observation
    from critbatch.config import TrainConfig, from_dict
    from critbatch.io import read_json
    from critbatch.model import count_params

    obs = []
    for size in sizes:
        r = state[f"{corpus}-{size}"]
        N = count_params(from_dict(TrainConfig, read_json(Path(r["run"]) / "config.json")).model, embeddings=False)
        obs += [Observation(N, p["tokens"], p["low_tokens"], p["high_tokens"], size) for p in r["points"]]
    return obs


def predict(out: Path, state: dict, corpora: list[str], sizes: list[str]) -> None:
    """Leave one size out: the held-out intervals the 90% bands overlap, the size exponent, the
    proxies' compute over the held-out size's run."""
    from critbatch.analysis.transfer import fit_transfer, leave_one_size_out

    res = {}
    for corpus in corpora:
        obs = observations(state, corpus, sizes)
        full = fit_transfer(obs, bootstrap=200)
        loo = leave_one_size_out(obs, bootstrap=200)
        for r, size in zip(loo, sorted(sizes, key=lambda s: next(o.size for o in obs if o.label == s))):
            others = [state[f"{corpus}-{x}"] for x in sizes if x != size]
            proxy = sum(o["flops_per_token"] * (TOTAL + o["cost"]["branch_tokens"]) for o in others)
            r["label"] = size
            r["flops_ratio"] = proxy / (state[f"{corpus}-{size}"]["flops_per_token"] * TOTAL)
        n = sum(len(r["points"]) for r in loo)
        res[corpus] = {"fit": full.to_dict(), "loo": loo,
                       "overlap_fraction": sum(p["overlap"] for r in loo for p in r["points"]) / n,
                       "curve_overlap_fraction": sum(p["curve_overlap"] for r in loo for p in r["points"]) / n}
        print(f"[{corpus}] all sizes: alpha {full.alpha:.3f} {tuple(round(x, 3) for x in full.interval('alpha'))}, "
              f"beta {full.beta:+.3f} {tuple(round(x, 3) for x in full.interval('beta'))} ({full.size_effect()}); "
              f"held-out intervals in the 90% band: {res[corpus]['overlap_fraction']:.0%} "
              f"(curve band {res[corpus]['curve_overlap_fraction']:.0%})", flush=True)
        for r in loo:
            print(f"  predict {r['label']} from the others: {r['overlap_fraction']:.0%} of its intervals in the band "
                  f"(curve band {r['curve_overlap_fraction']:.0%}); beta {r['fit']['beta']:+.3f} "
                  f"{[round(x, 3) for x in r['fit']['beta_interval']]}; proxy FLOPs {r['flops_ratio']:.0%} of its run",
                  flush=True)
    (out / "predicted.json").write_text(json.dumps(res, indent=1, default=float))


def target_train_config(size: str, corpus: str, out: Path):
    """The target run of stage ``target``: the size at TARGET_START sequences, its LR by the sqrt rule."""
    from critbatch.config import merge

    return merge(train_config(size, out / f"data-{corpus}"), {
        "batch_seqs": TARGET_START, "checkpoint_tokens": [],
        "optim": {"lr": SIZES[size]["lr"] * math.sqrt(TARGET_START / SIZES[size]["batch_seqs"])}})


def cheap(out: Path, state: dict, corpora: list[str]) -> None:
    """The cheapest proxies that could predict a larger size: each smaller size alone (the size
    exponent held at 0) and the smallest ones together. For each: the fraction of the target size's
    measured intervals the 90% band overlaps, the proxies' compute over the target's run, and the
    schedule the transfer derives for the target run of stage ``target`` (issue 23's ≤ 10% compute bar)."""
    from critbatch.analysis.transfer import fit_transfer, overlaps
    from critbatch.config import to_dict
    from critbatch.io import write_json_atomic
    from critbatch.transfer import TransferConfig, run_transfer

    res = {}
    order = ["nano", "micro", "tiny", "small", "mini"]
    for corpus in corpora:
        for tgt in ("small", "mini"):
            if f"{corpus}-{tgt}" not in state:
                continue
            measured = observations(state, corpus, [tgt])
            cfg_file = out / f"cheap-{corpus}-{tgt}-target.json"
            write_json_atomic(cfg_file, to_dict(target_train_config(tgt, corpus, out)))
            smaller = [x for x in order[:order.index(tgt)] if f"{corpus}-{x}" in state and x != "small"]
            for proxies in [[x] for x in smaller] + [smaller[:2], smaller[:3]]:
                f = fit_transfer(observations(state, corpus, proxies), bootstrap=200)
                lo, hi = f.band([o.tokens for o in measured], measured[0].size, 0.9)
                hits = [overlaps(a, b, o.low, o.high) for o, a, b in zip(measured, lo, hi)]
                doc = run_transfer(TransferConfig(
                    sweeps=[state[f"{corpus}-{x}"]["sweep"] for x in proxies], config=str(cfg_file),
                    out=str(out / f"cheap-{corpus}-{tgt}-from-{'-'.join(proxies)}.json"),
                    total_tokens=TOTAL + DECAY, decay_tokens=DECAY, launcher="inprocess"))
                key = f"{corpus}:{'+'.join(proxies)}->{tgt}"
                res[key] = {"overlap": sum(hits) / len(hits), "hits": hits,
                            "band": [[float(a), float(b)] for a, b in zip(lo, hi)],
                            "beta": f.beta, "beta_measured": f.beta_measured,
                            "flops_ratio": doc["transfer"]["compute"]["flops_ratio"],
                            "params_x_tokens_ratio": doc["transfer"]["compute"]["params_x_tokens_ratio"],
                            "schedule": [[p["start_tokens"], p["batch_seqs"]] for p in doc["phases"]],
                            "notes": doc["notes"]}
                r = res[key]
                print(f"[{key}] {r['overlap']:.0%} of the target's intervals in the 90% band; proxy FLOPs "
                      f"{r['flops_ratio']:.1%} ({r['params_x_tokens_ratio']:.1%} params x tokens); schedule "
                      + ", ".join(f"{b} @{t:,}" for t, b in r["schedule"]), flush=True)
    (out / "cheap.json").write_text(json.dumps(res, indent=1, default=float))


TARGET_START = 2  # the mini at 2 x 128 = 256 tokens a step (the small: 128): the band allows a doubling (docs/LOG.md)
DECAY = 204_800


def target(out: Path, state: dict, corpus: str, seeds: str, jobs: int, size: str = "mini",
           proxies: tuple[str, ...] = ("nano", "micro", "tiny")) -> None:
    """A size as the target (the mini: from the three smaller sizes; the small: from the nano alone,
    under 10% of its compute): its schedule transferred from the proxies, the confirming probe on its
    own run, then the schedule against its small- and large-batch controls."""
    from critbatch.config import merge, to_dict
    from critbatch.io import write_json_atomic
    from critbatch.train import train
    from critbatch.transfer import TransferConfig, describe, run_transfer
    from critbatch.warmup import CompareConfig, run_compare

    t = out / (f"target-{corpus}-{size}" if size == "mini" else f"target-{corpus}-{size}-from-{'-'.join(proxies)}")
    t.mkdir(parents=True, exist_ok=True)
    cfg = target_train_config(size, corpus, out)
    cfg_file = t / "target-config.json"
    write_json_atomic(cfg_file, to_dict(cfg))
    sweeps = [state[f"{corpus}-{s}"]["sweep"] for s in proxies]
    tc = TransferConfig(sweeps=sweeps, out=str(t / "schedule-unconfirmed.json"), config=str(cfg_file),
                        total_tokens=TOTAL + DECAY, decay_tokens=DECAY, jobs=jobs, launcher="inprocess")
    doc = run_transfer(tc)
    print("\n".join(describe(doc)), flush=True)
    plan = doc["transfer"]["confirm_plan"]
    final = t / "schedule.json"
    if plan:  # the target trained to its first doubling, then the confirming probe
        run = t / "confirm-run"
        train(merge(cfg, {"total_tokens": plan["tokens"], "checkpoint_tokens": [plan["tokens"]],
                          "lr_schedule": {"horizon_tokens": TOTAL}}), run, progress=False)
        import dataclasses

        doc = run_transfer(dataclasses.replace(tc, out=str(final), confirm_run=str(run)))
        print("\n".join(describe(doc)), flush=True)
    else:
        final = Path(tc.out)
    comp = run_compare(CompareConfig(out=str(t / "compare"), schedule=str(final), config=str(cfg_file),
                                     total_tokens=TOTAL, anneal_tokens=DECAY, seeds=[int(x) for x in seeds.split(",")],
                                     jobs=jobs, launcher="local"), progress=False)
    runs = {n: {"schedule": r["batch_schedule"], "steps_saved_pct": r["steps_saved_pct"],
                "gap_before": (r.get("gap_to_small") or {}).get("final_eval_loss"),
                "gap_after": (r.get("gap_to_small") or {}).get("anneal_eval_loss")} for n, r in comp["runs"].items()}
    (t / "result.json").write_text(json.dumps({"transfer": doc["transfer"], "schedule": doc["phases"], "runs": runs},
                                              indent=1, default=float))
    print(json.dumps(runs, indent=1, default=float), flush=True)


def main() -> None:
    import torch

    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/transfer-study")
    ap.add_argument("--corpora", default="sotu,shakespeare")
    ap.add_argument("--sizes", default="nano,micro,tiny,mini")
    ap.add_argument("--stage", default="measure", choices=("measure", "predict", "cheap", "target", "all"))
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--target-corpus", default="sotu")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--target-size", default="mini", choices=sorted(SIZES))
    ap.add_argument("--proxies", default="nano,micro,tiny", help="the sizes the target's schedule transfers from")
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
                if state_path.is_file():  # another process (one per corpus) may have added its sizes meanwhile
                    state = {**json.loads(state_path.read_text()), **state}
                state[key] = r
                state_path.write_text(json.dumps(state, indent=1))
                ivs = "; ".join(f"{p['tokens'] // 1000}k: [{p['low_tokens']:g}, {p['high_tokens']}]" for p in r["points"])
                print(f"[{key}] params {r['params']:,}  base {r['base_s']:.0f}s  sweep {r['sweep_s']:.0f}s  "
                      f"{r['cost']['branch_tokens_over_base']:.2f}x  CBS tokens {ivs}", flush=True)
    if a.stage in ("predict", "all"):
        predict(out, state, a.corpora.split(","), a.sizes.split(","))
    if a.stage in ("cheap", "all"):
        cheap(out, state, a.corpora.split(","))
    if a.stage in ("target", "all"):
        target(out, state, a.target_corpus, a.seeds, a.jobs, a.target_size, tuple(a.proxies.split(",")))


if __name__ == "__main__":
    main()
