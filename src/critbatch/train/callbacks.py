"""Callbacks: everything around the optimizer step that the training loop does not know by name.

The loop (:mod:`critbatch.train.loop`) plans a step, runs the pure step, advances its state and
calls these hooks; evaluation, checkpoints, the metrics file, throughput records, the progress bar
and the online noise scale are callbacks. Callbacks with state return it from ``state_dict``
(tensors, numbers, strings, lists and dicts only) and it is saved in every checkpoint.

Order of the hooks in one session::

    on_train_start
    per step:   on_micro_backward (each micro-batch) -> on_before_optim_step -> on_step_end
                -> (the step's record is logged) -> on_boundary
    then either on_pause (stopped early; a resume checkpoint follows), or
                on_finish -> (result assembled) -> on_train_end -> (result.json written) -> on_complete
    on_log receives every record logged (step, eval, perf).

The order of the callbacks themselves is :func:`run_callbacks`'s. Callbacks a run may name (in
``job.json``, on the command line) are registered in :data:`critbatch.registry.TRAINING_CALLBACKS`.
"""

from __future__ import annotations

import math
import statistics
import time

from ..io import JsonlWriter, truncate_jsonl, write_npy_atomic
from ..progress import Progress
from ..registry import TRAINING_CALLBACKS
from .checkpoint import EVAL_LOSSES_FILE, prune_resume_checkpoints


class Callback:
    name: str = "callback"
    description: str = ""
    """How error messages name it (default: the name)."""
    supports_fsdp: bool = True
    """False for callbacks that need every rank to hold whole gradients (the trainer refuses them
    under ``parallel='fsdp'``)."""
    inherit: bool = False
    """True: a run started from another run's checkpoint (a branch) starts from this callback's state
    there, not afresh (the divergence guard's baselines)."""

    def on_train_start(self, trainer) -> None:
        """After the model, optimizer and state are ready, before the first step of this session."""

    def on_micro_backward(self, trainer, micro_index: int, n_micro: int) -> None:
        """After the backward pass of one micro-batch (gradients accumulate in ``.grad``)."""

    def on_before_optim_step(self, trainer, record: dict) -> None:
        """After gradients are complete (and synchronised), before clipping and the step."""

    def on_step_end(self, trainer, record: dict) -> None:
        """After the optimizer step, before the record is logged; may add ``namespace/name`` keys."""

    def on_boundary(self, trainer, tokens_before: int) -> None:
        """At the step boundary after a step that started at ``tokens_before`` tokens."""

    def on_log(self, trainer, record: dict) -> None:
        """A record (step, eval or perf) was logged."""

    def on_pause(self, trainer) -> None:
        """The run stops before its end (stop_after_tokens or a stop signal)."""

    def on_finish(self, trainer) -> None:
        """The last step is done (or the run diverged); before the result is assembled."""

    def on_train_end(self, trainer, result: dict) -> None:
        """After the run finished (not when it paused), before result.json is written."""

    def on_complete(self, trainer) -> None:
        """After result.json is written: the run is complete."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class MetricsLog(Callback):
    """``metrics.jsonl``: one JSON record a line, on the main rank. A resumed run first drops what
    came after its checkpoint; a fresh run replaces what a run killed before its first checkpoint left."""

    name = "metrics"

    def __init__(self):
        self.writer = None

    def on_train_start(self, trainer) -> None:
        if trainer.out_dir is None or not trainer.dist.is_main:
            return
        path = trainer.out_dir / "metrics.jsonl"
        if trainer.resume_from is not None:
            truncate_jsonl(path, trainer.tokens)
        elif path.exists():
            path.unlink()
        self.writer = JsonlWriter(path)

    def on_log(self, trainer, record: dict) -> None:
        if self.writer is not None:
            self.writer.write(record)

    def _close(self, trainer) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    on_pause = _close
    on_train_end = lambda self, trainer, result: self._close(trainer)  # noqa: E731


class PerfLog(Callback):
    """``perf/tokens_per_s`` and ``perf/mfu`` every ``log_interval_steps`` steps."""

    name = "perf"

    def on_train_start(self, trainer) -> None:
        self.t, self.tokens = time.perf_counter(), trainer.tokens

    def on_boundary(self, trainer, tokens_before: int) -> None:
        if trainer.state.step % trainer.cfg.log_interval_steps:
            return
        now = time.perf_counter()
        tps = (trainer.tokens - self.tokens) / max(now - self.t, 1e-9)
        rec = {"step": trainer.state.step, "tokens": trainer.tokens, "perf/tokens_per_s": tps}
        if trainer.peak_flops:
            rec["perf/mfu"] = tps * trainer.flops_per_token / (trainer.peak_flops * trainer.dist.world_size)
        trainer.log(rec)
        self.t, self.tokens = now, trainer.tokens


class ProgressBar(Callback):
    """Progress on the main rank: a tqdm bar over tokens when stderr is a terminal (or forced with
    ``enabled=True``); otherwise a plain line (tokens, tokens/s, step, loss, ETA) every
    ``progress_interval_s`` seconds (:class:`critbatch.progress.Progress`); nothing with ``enabled=False``."""

    name = "progress"

    def __init__(self, enabled: bool | None = None, desc: str | None = None):
        self.enabled, self.desc, self.bar = enabled, desc, None

    def on_train_start(self, trainer) -> None:
        c = trainer.cfg
        self.bar = Progress(c.total_tokens, initial=min(trainer.tokens, c.total_tokens), unit="tokens",
                            desc=self.desc or (trainer.out_dir.name if trainer.out_dir else "train"),
                            enabled=self.enabled if trainer.dist.is_main else False,
                            interval_s=c.progress_interval_s, unit_scale=True, dynamic_ncols=True, leave=False,
                            mininterval=0.5)

    def on_boundary(self, trainer, tokens_before: int) -> None:
        total = trainer.cfg.total_tokens
        self.bar.set_postfix(step=trainer.state.step, loss=f"{trainer.state.loss_ema:.3f}")
        self.bar.update(min(trainer.tokens, total) - min(tokens_before, total))

    def _close(self, trainer, *_) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    on_pause = on_finish = _close


class Evaluator(Callback):
    """Held-out evaluation: at the start of a fresh run (``at_start``), whenever the step crosses a
    multiple of ``eval_interval_tokens`` (0: never in between) or reaches a kept checkpoint (unless
    ``eval_at_checkpoints`` is off), and at the end. A non-finite eval loss is a divergence. The final
    per-sequence losses are kept."""

    name = "eval"

    def __init__(self, at_start: bool = True):
        self.at_start = at_start

    def _evaluate(self, trainer) -> float:
        ev = trainer.evaluate()
        rec = {"step": trainer.state.step, "tokens": trainer.tokens, "eval/loss": ev, "eval/loss_se": trainer.last_eval_se}
        if not math.isfinite(ev):
            rec["train/diverged"] = True
            trainer.log(rec)
            trainer.diverge(trainer.tokens, f"the eval loss is {ev}")
        else:
            trainer.log(rec)
        return ev

    def on_train_start(self, trainer) -> None:
        if trainer.resume_from is None and self.at_start:
            self._evaluate(trainer)

    def on_boundary(self, trainer, tokens_before: int) -> None:
        every = trainer.cfg.eval_interval_tokens
        crossed = bool(every) and trainer.tokens // every > tokens_before // every
        at_kept = trainer.cfg.eval_at_checkpoints and trainer.kept_due(tokens_before)
        if (crossed or at_kept) and trainer.tokens < trainer.cfg.total_tokens:
            self._evaluate(trainer)

    def on_finish(self, trainer) -> None:
        if trainer.diverged_at is not None:
            return
        ev = self._evaluate(trainer)
        if trainer.out_dir is not None and trainer.dist.is_main and math.isfinite(ev):
            write_npy_atomic(trainer.out_dir / EVAL_LOSSES_FILE, trainer.last_eval_per_seq.numpy())


class Checkpointer(Callback):
    """Kept checkpoints at the requested token counts (each at the first step boundary at or after
    it, with the eval loss measured there), the newest resume checkpoint every
    ``save_interval_tokens`` and when the run pauses, and a final one unless ``keep_final`` is off
    (branches), in which case resume checkpoints are pruned once the run is complete."""

    name = "checkpoint"

    def __init__(self, keep_final: bool = True):
        self.keep_final = keep_final

    def on_train_start(self, trainer) -> None:
        if trainer.resume_from is None:
            for req in trainer.kept_due(None):  # requested at the very start
                trainer.save_checkpoint(kept=True, requested=req)

    def on_boundary(self, trainer, tokens_before: int) -> None:
        if trainer.diverged_at is not None or trainer.tokens >= trainer.cfg.total_tokens:
            return  # the end is on_finish's: after the final evaluation
        due = trainer.kept_due(tokens_before)
        for req in due:
            trainer.save_checkpoint(kept=True, requested=req)
        every = trainer.cfg.save_interval_tokens
        if not due and trainer.tokens // every > tokens_before // every:
            trainer.save_checkpoint(kept=False)

    def on_pause(self, trainer) -> None:
        trainer.save_checkpoint(kept=False)

    def on_finish(self, trainer) -> None:
        if trainer.diverged_at is not None:
            return
        for req in trainer.kept_due(trainer.last_boundary):
            trainer.save_checkpoint(kept=True, requested=req)
        if self.keep_final:
            trainer.save_checkpoint(kept=False)

    def on_complete(self, trainer) -> None:
        if not self.keep_final and trainer.out_dir is not None and trainer.dist.is_main:
            prune_resume_checkpoints(trainer.out_dir, keep=None)


class DivergenceGuard(Callback):
    """A loss that explodes without turning NaN is a divergence too. Two readings are each compared
    with their own lowest value so far in this run (a branch starts from its parent's): the median
    training loss of the last ``WINDOW`` steps (a median, so a single-batch spike that the run
    recovers from is not a divergence) and the eval loss. A reading above both ``FACTOR`` × that
    lowest value and the lowest value + ``MARGIN`` nats stops the run, recorded as diverged with the
    reason in result.json. (A learning-rate-3 run of the demo model reached an eval loss of 378
    without a NaN.)"""

    name = "divergence"
    inherit = True  # a branch is judged against its parent's losses: even its first steps can be flagged
    FACTOR = 2.0
    MARGIN = 1.0
    WINDOW = 9

    def __init__(self):
        self.best: dict[str, float] = {}
        self.recent: list[float] = []

    def _check(self, trainer, key: str, label: str, v: float, record: dict) -> bool:
        b = self.best.get(key)
        if b is not None and v > self.FACTOR * b and v > b + self.MARGIN:
            why = f"the {label} rose to {v:.4g}, above {self.FACTOR:g}x its lowest value {b:.4g} in this run"
            tokens = record.get("tokens", trainer.tokens)
            trainer.diverge(tokens, why)
            trainer.log({"step": record.get("step"), "tokens": tokens, "train/diverged": True,
                         "train/diverged_reason": why})
            return True
        self.best[key] = v if b is None else min(b, v)
        return False

    def on_log(self, trainer, record: dict) -> None:
        loss = record.get("train/loss")
        if loss is not None and math.isfinite(loss):
            self.recent = (self.recent + [float(loss)])[-self.WINDOW:]
            med = statistics.median(self.recent)
            if len(self.recent) < self.WINDOW:  # too few steps for a median that ignores a spike
                self.best["train"] = min(self.best.get("train", med), med)
            elif self._check(trainer, "train", f"median training loss of the last {self.WINDOW} steps", med, record):
                return
        ev = record.get("eval/loss")
        if ev is not None and math.isfinite(ev):
            self._check(trainer, "eval", "eval loss", float(ev), record)

    def state_dict(self) -> dict:
        return {"best": dict(self.best), "recent": list(self.recent)}

    def load_state_dict(self, state: dict) -> None:
        self.best = {k: float(v) for k, v in state.get("best", {}).items()}
        self.recent = [float(x) for x in state.get("recent", [])]


def make_callbacks(names) -> list[Callback]:
    """Instances of the named callbacks (:data:`critbatch.registry.TRAINING_CALLBACKS`), in order."""
    return [TRAINING_CALLBACKS[n]() for n in names]


def run_callbacks(user: list[Callback], *, progress: bool | None, desc: str | None, eval_at_start: bool,
                  keep_final_checkpoint: bool) -> list[Callback]:
    """Every callback of a run, in the order their hooks run:

    1. the metrics file: it opens before anything is logged and closes after the last record;
    2. the caller's callbacks, in the order given (they see a step before the built-ins act on it);
    3. the divergence guard, throughput, progress;
    4. evaluation, then checkpoints (a kept checkpoint records the eval loss measured at its boundary).
    """
    return [MetricsLog(), *user, DivergenceGuard(), PerfLog(), ProgressBar(progress, desc), Evaluator(eval_at_start),
            Checkpointer(keep_final_checkpoint)]
