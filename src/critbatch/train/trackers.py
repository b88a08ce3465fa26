"""Experiment trackers beside ``metrics.jsonl``: TensorBoard and Weights & Biases, as training callbacks
(``--log-to tensorboard,wandb``, registered in :data:`critbatch.registry.TRAINING_CALLBACKS`), and a
sweep's CBS curve written to the same sinks (:func:`log_curve`).

What a run logs: every number of every record of ``metrics.jsonl`` under its own key (the losses,
``eval/loss`` and ``eval/loss_se``, ``optim/lr``, ``train/batch_seqs``, ``train/batch_tokens``,
``perf/tokens_per_s``, ``gns/*`` with ``--gns``, ...), on the main rank only, with the record's
``step`` as the x-axis and its ``tokens`` logged as a value beside it. Why the step and not tokens:
both trackers want a step that counts up by whole numbers from the start of a run, and the step is
what other trainers' logs use; W&B charts can take ``tokens`` as their x-axis, TensorBoard shows it
as its own chart. A sweep has no steps: its points are logged at their tokens. A session hides from
TensorBoard what earlier sessions logged from its first step on (``purge_step``), as metrics.jsonl
drops what came after the checkpoint a run resumes from.

Where: ``RUN/tb/`` (event files) and ``RUN/wandb/`` (an offline run unless ``WANDB_MODE`` says
otherwise; ``wandb sync`` uploads it; project ``WANDB_PROJECT`` or ``critbatch``; each session of a
resumed run is its own W&B run). A sweep writes to ``SWEEP_DIR/tb/`` (rewritten with cbs.json) and
``SWEEP_DIR/wandb/``. The packages are the ``trackers`` extra; naming a sink without its package is
refused before anything is written.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
from pathlib import Path
from typing import Iterable

from ..config import to_dict
from ..errors import ConfigError
from ..registry import TRAINING_CALLBACKS
from .callbacks import Callback

EXTRA = "critbatch[trackers]"


def numbers(record: dict) -> dict[str, float]:
    """The numbers of a metrics record (``step`` aside; flags and reasons are not numbers)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardSink:
    """Scalars into ``directory/tb`` (``torch.utils.tensorboard``). ``purge_step`` hides the events of
    earlier files from that step on; ``fresh`` removes earlier event files first."""

    subdir = "tb"

    def __init__(self, directory: Path, name: str, config: dict, *, purge_step: int | None = None,
                 fresh: bool = False):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = Path(directory) / self.subdir
        if fresh and log_dir.is_dir():
            shutil.rmtree(log_dir)
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def write(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, global_step=step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A new W&B run under ``directory/wandb``: offline unless ``WANDB_MODE`` is set (every session is
    a run of its own, so ``purge_step`` has nothing to hide)."""

    def __init__(self, directory: Path, name: str, config: dict, *, purge_step: int | None = None,
                 fresh: bool = False):
        import wandb

        self.run = wandb.init(dir=str(directory), project=os.environ.get("WANDB_PROJECT") or "critbatch", name=name,
                              config=config, mode=None if os.environ.get("WANDB_MODE") else "offline",
                              reinit="create_new")

    def write(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Tracker(Callback):
    """A training callback that writes every logged record to a sink on the main rank (a run without
    a directory logs nothing)."""

    package = ""
    """The package the sink needs (checked when the callback is built, before the run writes anything)."""
    sink_class: type | None = None
    """:class:`TensorBoardSink` or :class:`WandbSink`: built with the run's directory, name and config."""

    def __init__(self):
        require(self.name, self.package)
        self.sink = None

    def on_train_start(self, trainer) -> None:
        if trainer.out_dir is None or not trainer.dist.is_main:
            return
        first = trainer.state.step + (1 if trainer.resume_from is not None else 0)  # the first step it logs
        self.sink = self.sink_class(trainer.out_dir, trainer.out_dir.name, to_dict(trainer.cfg), purge_step=first)

    def on_log(self, trainer, record: dict) -> None:
        if self.sink is not None:
            step = record.get("step")
            self.sink.write(numbers(record), trainer.state.step if step is None else int(step))

    def _close(self, trainer, *_) -> None:
        if self.sink is not None:
            self.sink.close()
            self.sink = None

    on_pause = on_train_end = _close


class TensorBoardTracker(Tracker):
    """``--log-to tensorboard``: ``RUN/tb/``."""

    name = "tensorboard"
    package = "tensorboard"
    sink_class = TensorBoardSink


class WandbTracker(Tracker):
    """``--log-to wandb``: ``RUN/wandb/``, offline unless ``WANDB_MODE`` says otherwise."""

    name = "wandb"
    package = "wandb"
    sink_class = WandbSink


def require(name: str, package: str) -> None:
    """A one-line ConfigError naming the extra to install when ``package`` is missing."""
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"--log-to {name} needs the {package} package: pip install '{EXTRA}'")


def curve_trackers(names: Iterable[str]) -> list[type]:
    """The tracker classes a sweep's ``log_to`` names (each a tracker, its package installed)."""
    out = []
    for n in names:
        cls = TRAINING_CALLBACKS[n]
        if not (isinstance(cls, type) and issubclass(cls, Tracker)):
            trackers = [k for k in TRAINING_CALLBACKS if isinstance(TRAINING_CALLBACKS[k], type)
                        and issubclass(TRAINING_CALLBACKS[k], Tracker)]
            raise ConfigError(f"--log-to {n} cannot log a sweep's curve; a sweep logs to {', '.join(trackers)}")
        require(n, cls.package)
        out.append(cls)
    return out


def curve_values(point: dict) -> dict[str, float]:
    """One point of cbs.json as tracker values, in tokens: the CBS interval's ends and their geometric
    mean (where the interval has them) and the noise scale B_simple (where it was measured)."""
    ns = point.get("noise_scale") or {}
    values = {"tokens": point["tokens"], "cbs/low_tokens": point.get("cbs_low_tokens"),
              "cbs/high_tokens": point.get("cbs_high_tokens"), "cbs/geomean_tokens": point.get("cbs_geomean_tokens"),
              "gns/b_simple_tokens": ns.get("b_simple_tokens")}
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}


def log_curve(curve: dict, directory: str | Path, names: Iterable[str], name: str) -> None:
    """Write a sweep's curve (``cbs.json``) to the named trackers in ``directory``: one record per
    branch point, at its tokens. TensorBoard's events are rewritten each time, as cbs.json is."""
    classes = curve_trackers(names)
    config = {k: curve.get(k) for k in ("decide_by", "rule", "eps", "confidence", "seq_len", "lr_rule")}
    for cls in classes:
        sink = cls.sink_class(Path(directory), name, config, fresh=True)
        try:
            for p in sorted(curve["points"], key=lambda p: p["tokens"]):
                sink.write(curve_values(p), int(p["tokens"]))
        finally:
            sink.close()
