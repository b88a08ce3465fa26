"""Checkpoints: the full state (model, optimizer, loader offset, schedule position, RNG, callback
state) in one directory, written to a temporary sibling and renamed into place, loaded with
``weights_only=True``.

Layout: ``RUN/ckpt/tok_000000102400/{model.pt, optim.pt, state.pt, meta.json}`` for kept
checkpoints (branch points) and ``RUN/ckpt/resume_tok_…`` for the newest periodic one.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import to_dict
from ..errors import CheckpointError, ConfigError, DataError
from ..io import dumps, public_mode, sha256_file

FORMAT = "critbatch-ckpt-v1"
EVAL_LOSSES_FILE = "eval_seq_losses.npy"  # per-sequence held-out losses (of a run's final evaluation, or at a kept checkpoint)
KEPT_PREFIX = "tok_"
RESUME_PREFIX = "resume_tok_"


@dataclass
class CheckpointInfo:
    path: Path
    tokens: int
    kept: bool
    meta: dict

    @property
    def requested_tokens(self) -> int:
        return int(self.meta.get("requested_tokens", self.tokens))


def ckpt_dirname(tokens: int, kept: bool) -> str:
    return f"{KEPT_PREFIX if kept else RESUME_PREFIX}{tokens:012d}"


def save_checkpoint(ckpt_root: Path, *, tokens: int, kept: bool, model_state: dict, optim_state: dict,
                    state: dict, meta: dict, arrays: dict | None = None) -> Path:
    """Write a checkpoint atomically; returns its directory. An existing one is left as it is.
    ``arrays``: extra ``name -> numpy array`` saved as ``name.npy`` (e.g. the per-sequence eval losses)."""
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / ckpt_dirname(tokens, kept)
    if (final / "meta.json").is_file():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=ckpt_root))
    try:
        torch.save(model_state, tmp / "model.pt")
        torch.save(optim_state, tmp / "optim.pt")
        torch.save(state, tmp / "state.pt")
        for name, arr in (arrays or {}).items():
            np.save(tmp / f"{name}.npy", arr, allow_pickle=False)
        sums = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
        (tmp / "meta.json").write_text(dumps({"format": FORMAT, "tokens": tokens, "kept": kept, **meta,
                                              "sha256": sums}) + "\n")
        if final.exists():  # a torn directory without meta.json (cannot happen with rename, but be safe)
            shutil.rmtree(final)
        public_mode(tmp, directory=True)
        os.rename(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(f"the disk is full: the checkpoint at {tokens:,} tokens was not written (nothing is "
                                  f"lost); free space and run the same command again to resume") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def scan_checkpoints(run_dir: str | Path) -> tuple[list[CheckpointInfo], list[tuple[Path, str]]]:
    """(the complete checkpoints of a run sorted by tokens, kept before resume at equal tokens; the
    checkpoint directories whose meta.json is damaged, with why)."""
    root = Path(run_dir) / "ckpt"
    out: list[CheckpointInfo] = []
    damaged: list[tuple[Path, str]] = []
    if not root.is_dir():
        return out, damaged
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        meta_p = d / "meta.json"
        if not meta_p.is_file():
            damaged.append((d, "it has no meta.json"))
            continue
        try:
            meta = json.loads(meta_p.read_text())
            out.append(CheckpointInfo(d, int(meta["tokens"]), bool(meta.get("kept")), meta))
        except (json.JSONDecodeError, UnicodeDecodeError):
            damaged.append((d, "its meta.json is not valid JSON"))
        except (KeyError, TypeError, ValueError):
            damaged.append((d, "its meta.json has no token count"))
    out.sort(key=lambda c: (c.tokens, not c.kept))
    return out, damaged


def list_checkpoints(run_dir: str | Path) -> list[CheckpointInfo]:
    """Complete checkpoints of a run, sorted by tokens (kept before resume at equal tokens)."""
    return scan_checkpoints(run_dir)[0]


def kept_checkpoints(run_dir: str | Path) -> list[CheckpointInfo]:
    return [c for c in list_checkpoints(run_dir) if c.kept]


def find_kept(run_dir: str | Path, tokens: list[int] | None = None) -> list[CheckpointInfo]:
    """The kept checkpoints at ``tokens`` (each matched by its actual token count, else by the
    count that was requested), or all of them for ``None``; an unknown count is a ConfigError that
    lists the kept ones."""
    kept = kept_checkpoints(run_dir)
    if tokens is None:
        return kept
    out = []
    for t in sorted(set(tokens)):
        match = [c for c in kept if c.tokens == t] or [c for c in kept if c.requested_tokens == t]
        if not match:
            bad = [(d, why) for d, why in scan_checkpoints(run_dir)[1] if d.name.startswith(KEPT_PREFIX)]
            if bad:
                raise DataError(f"no readable kept checkpoint at {t} tokens in {run_dir}: {bad[0][0].name} is damaged "
                                f"({bad[0][1]})" + (f" and {len(bad) - 1} more" if len(bad) > 1 else ""))
            have = ", ".join(f"{c.tokens}" + (f" (requested {c.requested_tokens})" if c.requested_tokens != c.tokens else "")
                             for c in kept) or "none"
            raise ConfigError(f"no kept checkpoint at {t} tokens in {run_dir}; kept checkpoints: {have}")
        out.append(match[0])
    return out


def training_meta(state, cfg, schedule, *, tokens: int, requested: int | None, config_hash: str,
                  eval_loss: float | None, eval_loss_se: float | None) -> dict:
    """``meta.json`` of a training checkpoint (``state``: the run's :class:`critbatch.train.state.TrainerState`): where the run is, and the batch and LR multiplier it
    continues with from here (a branch's base B)."""
    return {"step": state.step, "offset_seqs": state.offset_seqs,
            "requested_tokens": requested if requested is not None else tokens,
            "model": to_dict(cfg.model), "config_hash": config_hash,
            "train_loss_ema": state.loss_ema, "eval_loss": eval_loss,
            "eval_loss_se": eval_loss_se if eval_loss is not None else None,
            "batch_seqs": schedule.batch_seqs_at(tokens), "lr_multiplier": schedule.lr_multiplier_at(tokens),
            "lr_ref_batch_seqs": schedule.reference, "seq_len": cfg.model.seq_len}


def prune_resume_checkpoints(run_dir: str | Path, keep: Path | None) -> None:
    """Delete resume checkpoints other than ``keep`` (all of them for ``None``) and the leftovers
    of killed writers; an emptied ``ckpt`` directory goes too."""
    for c in list_checkpoints(run_dir):
        if not c.kept and c.path != keep:
            shutil.rmtree(c.path, ignore_errors=True)
    root = Path(run_dir) / "ckpt"
    for d in root.glob(".tmp-*"):
        shutil.rmtree(d, ignore_errors=True)
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint directory into fresh tensors: {'model', 'optim', 'state', 'meta'}."""
    path = Path(path)
    meta_p = path / "meta.json"
    if not meta_p.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no meta.json)")
    try:
        meta = json.loads(meta_p.read_text())
        for name, expect in (meta.get("sha256") or {}).items():
            if sha256_file(path / name) != expect:
                raise CheckpointError(f"checkpoint {path} is corrupt: the checksum of {name} does not match the one "
                                      f"written with it (the file changed since)")
        out = {"meta": meta}
        for key in ("model", "optim", "state"):
            out[key] = torch.load(path / f"{key}.pt", map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to read is a corrupt checkpoint
        raise CheckpointError(f"checkpoint {path} is corrupt: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return out


def copy_checkpoint_state(ckpt: dict) -> dict:
    """An untouched deep copy: ``Optimizer.load_state_dict`` keeps references to same-device
    tensors it is given, so two runs from one in-memory checkpoint must not share them."""
    return copy.deepcopy(ckpt)


def check_model_matches(ckpt_meta: dict, model_cfg: dict, where: str) -> None:
    saved = ckpt_meta.get("model")
    if saved is None:
        raise CheckpointError(f"checkpoint {where} records no model config")
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs {model_cfg.get(k)!r}" for k in sorted(set(saved) | set(model_cfg))
             if saved.get(k) != model_cfg.get(k)]
    if diffs:
        raise CheckpointError(f"checkpoint {where} is from a different model config ({'; '.join(diffs)})")
