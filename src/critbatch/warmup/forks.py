"""Comparison runs that start where another run already is: a shared prefix is trained once.

Every run of a comparison takes the small-batch control's steps until its first batch change (the
same initialisation, data order, batch, LR and Adam hyperparameters at every step; the step plans
are pure functions of tokens). Such a run starts from the small control's checkpoint at that step
boundary and trains only the rest. A finished run given as a prefix source (the base run a sweep
branched from, say) can likewise start any run whose steps it took, the small control included,
from its latest checkpoint inside the shared stretch. The numbers are those of the run trained
whole (bit for bit on the same device and thread count; a test checks it), at the cost of the
part that differs: in the demo the controls and the warmup share most of their tokens with the
base run.

A run's records (``metrics.jsonl``) then hold only its own part; :func:`run_records` prepends its
source's records up to the start, so losses, curves and optimizer steps count the whole run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..branch import agreeing_steps
from ..config import TrainConfig, from_dict
from ..errors import ConfigError
from ..io import read_json, read_jsonl
from ..train import EVAL_LOSSES_FILE
from ..train.checkpoint import kept_checkpoints, list_checkpoints


@dataclass(frozen=True)
class Fork:
    """Where a comparison run starts: ``source``'s state at ``tokens`` (the checkpoint ``checkpoint``,
    or, for ``checkpoint`` None, the one the comparison's small control keeps there)."""

    source: str
    tokens: int
    checkpoint: str | None = None
    loss_ema: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def read_run_config(run: str | Path) -> TrainConfig:
    """The resolved config of a finished run directory (its ``config.json``), data path resolved."""
    p = Path(run) / "config.json"
    if not p.is_file():
        raise ConfigError(f"prefix run {run} has no config.json: give a critbatch run directory")
    cfg = from_dict(TrainConfig, read_json(p))
    if cfg.data.path:
        cfg.data.path = str(Path(cfg.data.path).resolve())
    return cfg


def _from_sources(cfg: TrainConfig, sources: list[tuple[Path, TrainConfig, list]]) -> Fork | None:
    """The latest checkpoint of a source run up to which a run of ``cfg`` takes exactly its steps
    (and evaluates on the same held-out sample, so the source's eval records are the run's)."""
    best = None
    for run, scfg, ckpts in sources:
        if scfg.eval_seqs != cfg.eval_seqs:
            continue
        reach = set(agreeing_steps(scfg, cfg, 0, cfg.total_tokens - 1, 0))
        for c in ckpts:
            if c.tokens in reach and (best is None or c.tokens > best.tokens):
                best = Fork(str(run), c.tokens, str(c.path), c.meta.get("train_loss_ema"))
    return best


def plan_forks(resolved: dict[int, dict[str, TrainConfig]], small_dirs: dict[int, Path], prefix_runs: list[str],
               share: bool = True) -> dict[tuple[int, str], Fork]:
    """Where each run of a comparison starts (runs trained from scratch are absent): ``resolved`` are
    the runs' resolved configs by seed and name, ``small_dirs`` each seed's small-control directory,
    ``prefix_runs`` finished runs whose checkpoints may start runs; ``share``: runs may start from
    the small control's checkpoint at their first batch change."""
    sources = []
    for d in prefix_runs:
        if not (Path(d) / "result.json").is_file():
            raise ConfigError(f"prefix run {d} is not finished (no result.json): a comparison starts only from a "
                              f"finished run")
        sources.append((Path(d).resolve(), read_run_config(d), list_checkpoints(d)))
    forks: dict[tuple[int, str], Fork] = {}
    for seed, runs in resolved.items():
        small = runs["small"]
        start = _from_sources(small, sources)
        if start is not None:
            forks[(seed, "small")] = start
        for name, cfg in runs.items():
            if name == "small":
                continue
            best = _from_sources(cfg, sources)
            shared = max(agreeing_steps(small, cfg, 0, cfg.total_tokens - 1, 0), default=0) if share else 0
            if shared > (start.tokens if start else 0) and (best is None or shared > best.tokens):
                best = Fork(str(small_dirs[seed].resolve()), shared)
            if best is not None:
                forks[(seed, name)] = best
    return forks


def _started_from(run: Path, forks: dict[str, dict]) -> dict | None:
    """Where a run began: its fork, or, for a job that began from another run's checkpoint (a
    closed-loop segment from the segment before it), that run and the checkpoint's tokens."""
    f = forks.get(str(run.resolve()))
    if f is not None or not (run / "job.json").is_file():
        return f
    init = read_json(run / "job.json").get("init_from")
    if not init:
        return None
    ck = (run / init).resolve()
    src = ck.parent.parent  # RUN/ckpt/tok_N
    match = [c for c in list_checkpoints(src) if c.path.resolve() == ck]
    return {"source": str(src), "tokens": match[0].tokens} if match else None


def run_records(run: Path, forks: dict[str, dict]) -> list[dict]:
    """A run's ``metrics.jsonl`` records, its source's up to where it started first (``forks``:
    :class:`Fork` dicts by resolved run directory; a job begun from another run's checkpoint
    follows it the same way)."""
    own = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
    f = _started_from(run, forks)
    if f is None:
        return own
    before = [r for r in run_records(Path(f["source"]), forks) if r["tokens"] <= f["tokens"]]
    return before + [r for r in own if r["tokens"] > f["tokens"]]


def losses_at(run: Path, tokens: int, forks: dict[str, dict]) -> np.ndarray | None:
    """Per-sequence held-out losses of a run at the kept checkpoint requested at ``tokens`` (or, for
    a run that started at or after it, its source's there, or at the source's end where it started)."""
    for ck in kept_checkpoints(run):
        if ck.requested_tokens == tokens and (ck.path / EVAL_LOSSES_FILE).is_file():
            return np.load(ck.path / EVAL_LOSSES_FILE, allow_pickle=False)
    f = _started_from(run, forks)
    if f is None or f["tokens"] < tokens:
        return None
    src = Path(f["source"])
    got = losses_at(src, tokens, forks)
    if got is None and (src / EVAL_LOSSES_FILE).is_file() and read_json(src / "result.json").get("tokens") == f["tokens"]:
        got = np.load(src / EVAL_LOSSES_FILE, allow_pickle=False)
    return got


__all__ = ["Fork", "plan_forks", "run_records", "losses_at", "read_run_config"]
