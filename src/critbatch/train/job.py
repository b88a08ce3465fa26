"""A job: one training run described by ``job.json`` in its own directory — a resolved config, the
checkpoint it starts from, trainer options and the named callbacks it trains with. Branches, the
closed loop's segments and the runs of a comparison are jobs; every launcher (in process, worker
processes, torchrun, Slurm, stacked) builds its Trainer from here, so what a job computes never
depends on where it runs.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..config import TrainConfig, from_dict, to_dict
from ..io import read_json, write_json_atomic
from ..registry import TRAINING_CALLBACKS
from .callbacks import Callback, make_callbacks


@dataclass
class JobSpec:
    """``job.json``."""

    config: dict
    """The run's TrainConfig as a dict."""
    init_from: str | None = None
    """The checkpoint to start from, relative to the job directory."""
    eval_at_start: bool = True
    keep_final_checkpoint: bool = True
    callbacks: list[str] = field(default_factory=list)
    """Names in :data:`critbatch.registry.TRAINING_CALLBACKS`."""
    init_loss_ema: float | None = None

    @classmethod
    def read(cls, job_dir: str | Path) -> "JobSpec":
        d = read_json(Path(job_dir) / "job.json")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def train_config(self) -> TrainConfig:
        return from_dict(TrainConfig, self.config)

    def trainer(self, job_dir: str | Path, callbacks: Iterable[Callback] = (), *, stop_on_signals: bool = False):
        """The job's Trainer (quiet, no progress bar): its named callbacks, then ``callbacks``, then the
        early stop of a directory that holds a stop rule (:mod:`critbatch.train.early_stop`)."""
        from .early_stop import STOP_RULE_FILE, EarlyStop
        from .loop import Trainer

        d = Path(job_dir)
        init = (d / self.init_from) if self.init_from else None
        cbs = [*make_callbacks(self.callbacks), *callbacks]
        if (d / STOP_RULE_FILE).is_file():
            cbs.append(EarlyStop(read_json(d / STOP_RULE_FILE)))
        return Trainer(self.train_config(), d, init_from=init, progress=False, quiet=True,
                       eval_at_start=self.eval_at_start, keep_final_checkpoint=self.keep_final_checkpoint,
                       callbacks=cbs, init_loss_ema=self.init_loss_ema, stop_on_signals=stop_on_signals)


def write_job(job_dir: str | Path, config: TrainConfig, init_from: str | Path | None = None, *,
              eval_at_start: bool = True, keep_final_checkpoint: bool = True, callbacks: Iterable[str] = (),
              init_loss_ema: float | None = None) -> Path:
    """Create ``job_dir/job.json`` (once: an existing one is left as it is)."""
    d = Path(job_dir)
    if (d / "job.json").is_file():
        return d
    for c in callbacks:
        TRAINING_CALLBACKS.check(c, "job callback")
    d.mkdir(parents=True, exist_ok=True)
    rel = None if init_from is None else os.path.relpath(Path(init_from).resolve(), d.resolve())
    spec = JobSpec(to_dict(config), rel, eval_at_start, keep_final_checkpoint, list(callbacks), init_loss_ema)
    write_json_atomic(d / "job.json", dataclasses.asdict(spec))
    return d
