"""``critbatch gns``: the noise scale at a run's kept checkpoints, on data the model has not seen.

For a checkpoint after ``offset`` training sequences, the batches are the next ``n_batches × b_big``
sequences of the training stream (unseen by the model at that point; nothing is trained on them
here). Results go to ``RUN/gns.json``: per point ``tokens``, ``b_simple_seqs``, ``b_simple_tokens``,
``ci_low_seqs``, ``ci_high_seqs`` (and tokens), the |G|² and tr(Σ) estimates and the seconds spent.
Points already measured with the same settings are kept; other settings start a new file (the old
one is kept as ``gns-<settings-hash>.json``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..analysis.curve import attach_noise_scale
from ..branch import write_curve
from ..config import TrainConfig, check_choices, config_hash, from_dict, how, option
from ..data import SequenceStream, open_data
from ..data.dataset import check_capacity
from ..dist import resolve_device
from ..errors import ConfigError, DataError
from ..io import check_output, read_json, write_json_atomic
from ..records import read_curve
from ..model import build_model
from ..train.checkpoint import find_kept, load_checkpoint
from .probe import _check, estimate_noise_scale

# CPU-sized defaults (the paper: B_small = 1, B_big = 64, 4096 batches). 64 batches of 64 give
# intervals of roughly ±20% on the tiny preset in ~10 s a checkpoint here (docs/LOG.md).
DEFAULT_B_SMALL = 1
DEFAULT_B_BIG = 64
DEFAULT_BATCHES = 64


@dataclass
class GNSConfig:
    """The gradient noise scale at a run's kept checkpoints."""

    run: str
    """Run directory with kept checkpoints."""
    at: list[int] | None = None
    """Token counts of kept checkpoints; ``None``: all of them."""
    b_small: int = DEFAULT_B_SMALL
    """The small batch in sequences (the paper: 1)."""
    b_big: int = DEFAULT_B_BIG
    """The big batch in sequences (the paper: 64)."""
    n_batches: int = option(DEFAULT_BATCHES, aliases=("batches",))
    """Big batches averaged (the paper used 4096 on GPUs)."""
    confidence: float = 0.95
    """Confidence of the intervals."""
    interval: str = option("delta", choices=("delta", "paper"))
    """``delta`` (the delta method on the ratio of means) or ``paper`` (tr(Σ) as exponential, |G|² as normal)."""
    method: str = option("auto", choices=("auto", "vmap", "loop"))
    """``auto`` (vmap, falling back to a loop), ``vmap`` or ``loop``."""
    device: str = how("auto")
    """Device of the estimate."""


def _settings(cfg: GNSConfig) -> dict:
    return {"b_small": cfg.b_small, "b_big": cfg.b_big, "n_batches": cfg.n_batches, "confidence": cfg.confidence,
            "interval": cfg.interval, "data": "training stream after the checkpoint's offset"}


def gns_at_checkpoints(cfg: GNSConfig, progress: bool | None = None) -> dict:
    check_choices(cfg)
    run = Path(cfg.run)
    if not (run / "config.json").is_file():
        raise DataError(f"run {run} is missing or incomplete (no config.json)")
    if cfg.n_batches < 1:
        raise ConfigError(f"n_batches={cfg.n_batches} must be >= 1")
    if not 0.5 <= cfg.confidence < 1:
        raise ConfigError(f"confidence={cfg.confidence} must be in [0.5, 1)")
    check_output(run / "gns.json", "the run directory", "file")
    train_cfg = from_dict(TrainConfig, read_json(run / "config.json"))
    points = find_kept(run, cfg.at)
    if not points:
        raise ConfigError(f"{run} has no kept checkpoints; train with --checkpoint-tokens")
    # validate the estimator's arguments before any work
    with torch.device("meta"):
        _check(build_model(train_cfg.model), cfg.b_small, cfg.b_big)
    T = train_cfg.model.seq_len
    stream = SequenceStream(open_data(train_cfg.data.path, verify=False), T, train_cfg.data.order_seed)
    need = max(c.meta["offset_seqs"] for c in points) + cfg.n_batches * cfg.b_big
    check_capacity(stream, need, train_cfg.data.allow_repeat, "the estimate", "use fewer --batches or a smaller --b-big")

    out_p = run / "gns.json"
    settings = _settings(cfg)
    key = config_hash(settings)
    existing = read_json(out_p) if out_p.is_file() else None
    if existing and existing.get("settings_hash") != key:
        write_json_atomic(run / f"gns-{existing.get('settings_hash', 'old')}.json", existing)
        existing = None
    done = {p["tokens"]: p for p in (existing or {}).get("points", [])}
    device = resolve_device(cfg.device)
    loss_fn = lambda model, batch: model.loss_sum(batch[0]) / (batch[0].shape[0] * T)  # noqa: E731 token mean

    bar = tqdm(points, desc="noise scale", unit="ckpt", disable=True if progress is False else None)
    for ck in bar:
        if ck.tokens in done:
            continue
        t0 = time.perf_counter()
        model = build_model(train_cfg.model)
        model.load_state_dict(load_checkpoint(ck.path)["model"])
        model.to(device)
        off = int(ck.meta["offset_seqs"])
        batches = (stream.batch(off + i * cfg.b_big, cfg.b_big).to(device) for i in range(cfg.n_batches))
        ns = estimate_noise_scale(model, loss_fn, batches, cfg.b_small, cfg.b_big, confidence=cfg.confidence,
                                  interval=cfg.interval, method=cfg.method)
        tok = lambda v: v * T if v is not None else None  # noqa: E731
        done[ck.tokens] = {
            "tokens": ck.tokens, "requested_tokens": ck.requested_tokens,
            "b_simple_seqs": ns.b_simple, "b_simple_tokens": tok(ns.b_simple),
            "ci_low_seqs": ns.ci_low, "ci_high_seqs": ns.ci_high,
            "ci_low_tokens": tok(ns.ci_low), "ci_high_tokens": tok(ns.ci_high),
            "grad_sq": ns.grad_sq, "trace_cov": ns.trace_cov, "n_batches": ns.n_batches,
            "ci_paper_seqs": ns.ci_paper, "method": ns.method, "seconds": time.perf_counter() - t0,
        }
        write_json_atomic(out_p, {"run": str(run), "settings": settings, "settings_hash": key, "seq_len": T,
                                  "points": [done[t] for t in sorted(done)]})
    result = read_json(out_p)
    refresh_sweeps(run)
    return result


def refresh_sweeps(run: Path) -> None:
    """Attach the noise scale to every sweep's curve of this run (cbs.json, plots)."""
    gns_p = Path(run) / "gns.json"
    if not gns_p.is_file():
        return
    for cbs in sorted((Path(run) / "sweeps").glob("*/cbs.json")):
        curve = read_curve(cbs)
        attach_noise_scale(curve, read_json(gns_p))
        write_curve(cbs.parent, curve)
