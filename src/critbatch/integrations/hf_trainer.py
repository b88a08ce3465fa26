"""A Hugging Face ``transformers.Trainer`` callback that applies a critbatch batch schedule: the batch
grows through gradient accumulation (the per-device micro-batch stays), the learning rate is
multiplied by the schedule's rule at every phase, thresholds are in tokens; optionally it logs the
online gradient noise scale.

    from critbatch.integrations.hf_trainer import BatchScheduleCallback
    trainer = Trainer(model, args, train_dataset=...)
    BatchScheduleCallback("schedule.json", seq_len=1024).attach(trainer)   # or Trainer(callbacks=[...])

How it works, and what it asks of the Trainer:

* ``args.per_device_train_batch_size`` × ranks × ``args.gradient_accumulation_steps`` must be the
  schedule's first batch (in sequences of ``seq_len`` tokens); every phase's batch must be a
  multiple of the per-device batch × ranks, and no phase's batch may be smaller than the one before.
  The callback changes ``args.gradient_accumulation_steps`` between optimizer steps; the Trainer
  fetches that many micro-batches for the next step and normalises the loss by their tokens
  (``num_items_in_batch``).
* A phase starts at the first optimizer step that starts at or after its threshold *and* at which
  the micro-batches already taken in this epoch are a multiple of the new accumulation (or at the
  start of an epoch): the Trainer decides when to step the optimizer by counting micro-batches modulo
  the accumulation, so a change at any other step would step in the middle of a batch. With
  doublings this delays a change by at most one step of the old batch; the callback records every
  delay (``delays``).
* The LR: the Trainer's scheduler sets each step's LR; the callback multiplies it by
  rule(batch / first batch) just before the optimizer step and restores it after (the scheduler's
  own shape over steps is the Trainer's; count it in tokens by giving it ``max_steps`` in tokens'
  worth, or use a constant/WSD schedule). The batch is the one the step actually took: the last step
  of an epoch takes only the micro-batches left, and gets the LR of that smaller batch.
* Epochs: the Trainer plans its epochs and the steps in each at the first batch's accumulation; a
  larger batch uses an epoch up in fewer steps, so a run that crosses epochs would stop before
  ``max_steps``. The callback works out the steps the Trainer will take and refuses such a run at
  its start, naming a ``max_steps`` that it reaches (exactly with ``dataloader_drop_last=True``).
* Logging: every training log record (``state.log_history`` and the ``report_to`` sinks) gets the
  LR the optimizer applied as ``learning_rate`` (the scheduler's as ``base_learning_rate``) and
  ``batch_seqs``, ``batch_tokens`` and ``tokens`` of the latest step. The Trainer calls its
  ``report_to`` sinks before callbacks given in ``Trainer(callbacks=...)``; :meth:`attach` puts this
  one first, so the sinks show the schedule too.
* ``noise_scale=True`` logs ``gns/b_simple`` (sequences) from the micro-batch gradients against
  their sum (McCandlish et al. 2018, as :class:`critbatch.gns.NoiseScaleCallback`); steps whose
  gradient the Trainer clipped are skipped (the norm before clipping is not visible to callbacks).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

from ..errors import ConfigError
from ..gns.estimators import two_batch_estimates
from ..schedules import BatchSchedule

try:
    from transformers import TrainerCallback
except ImportError:  # the callback needs transformers; importing this module without it says so
    raise ImportError("critbatch.integrations.hf_trainer needs the transformers package") from None


class BatchScheduleCallback(TrainerCallback):
    def __init__(self, schedule: BatchSchedule | str | Path | dict, *, seq_len: int | None = None,
                 noise_scale: bool = False, ema_beta: float = 0.95):
        if not isinstance(schedule, BatchSchedule):
            if seq_len is None:
                raise ConfigError("give seq_len (tokens per sequence) with a schedule file or spec")
            schedule = BatchSchedule.parse(schedule, seq_len)
        self.schedule = schedule
        self.noise_scale = noise_scale
        self.ema_beta = ema_beta
        self.tokens = 0
        self.micro_in_epoch = 0
        self.history: list[dict] = []
        """Per optimizer step: tokens before it, its batch (sequences), LR multiplier and LR."""
        self.delays: list[dict] = []
        self._saved_lr: list[float] = []
        self._step = {"micro": 0, "seqs": 0}
        """The step in progress on this rank: micro-batches and sequences taken so far."""
        self._taken = (0, 0)
        """(micro-batches, global batch in sequences) of the latest optimizer step."""
        self._first = False
        self._hooks: list = []
        self._gns = {"g2": 0.0, "tr": 0.0, "n": 0, "micro_sq": 0.0, "micros": 0, "seen": []}

    def attach(self, trainer):
        """Add this callback to ``trainer`` ahead of its others (the ``report_to`` sinks among them),
        so that the sinks log the applied batch and LR. Returns the trainer."""
        handler = trainer.callback_handler
        handler.callbacks = [self] + [cb for cb in handler.callbacks if cb is not self]
        self._first = True
        return trainer

    # ---- the batch ------------------------------------------------------------------------
    def _per_step(self, args) -> int:
        return args.per_device_train_batch_size * max(args.world_size, 1)

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kw):
        first = self.schedule.phases[0][1]
        per = self._per_step(args)
        if per * args.gradient_accumulation_steps != first:
            raise ConfigError(f"the Trainer's batch (per-device {args.per_device_train_batch_size} x ranks "
                              f"{max(args.world_size, 1)} x accumulation {args.gradient_accumulation_steps}) is not the "
                              f"schedule's first batch of {first} sequences")
        for (t, b), (_, before) in zip(self.schedule.phases, ((0, first), *self.schedule.phases)):
            if b % per:
                raise ConfigError(f"the schedule's batch {b} (from {t:,} tokens) is not a multiple of per-device batch "
                                  f"x ranks = {per}")
            if b < before:
                raise ConfigError(f"the schedule's batch falls from {before} to {b} sequences at {t:,} tokens: with the "
                                  f"HF Trainer it may only grow (the Trainer counts an epoch's steps at the first batch, "
                                  f"so a smaller one would leave part of every epoch untrained)")
        if train_dataloader is not None and hasattr(train_dataloader, "__len__") and state.max_steps > 0:
            self._check_epochs(len(train_dataloader), state.max_steps, state.num_train_epochs, per)
        if model is not None:
            self._hooks = [model.register_forward_pre_hook(self._count_seqs, with_kwargs=True)]
            if self.noise_scale:
                self._hooks += [p.register_hook(self._grad_hook) for p in model.parameters() if p.requires_grad]
        if args.report_to and not self._first:
            warnings.warn("critbatch: the Trainer's report_to sinks run before callbacks given in Trainer(callbacks=...), "
                          "so they show the scheduler's LR and no batch; add this callback with "
                          "BatchScheduleCallback.attach(trainer) instead", stacklevel=2)

    def _count_seqs(self, module, args, kwargs):
        """A training forward pass: count its sequences (the last micro-batch of an epoch may be short)."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if module.training and isinstance(ids, torch.Tensor) and ids.dim() > 0:
            self._step["seqs"] += ids.shape[0]

    def on_epoch_begin(self, args, state, control, **kw):
        """A new epoch: no micro-batch taken yet, so any accumulation starts on a step boundary."""
        self.micro_in_epoch = 0
        args.gradient_accumulation_steps = self.schedule.batch_seqs_at(self.tokens) // self._per_step(args)

    def on_step_end(self, args, state, control, **kw):
        """After an optimizer step: count it, then set the accumulation of the next one."""
        micro, b = self._taken
        self.micro_in_epoch += micro
        self.tokens += b * self.schedule.seq_len
        want = self.schedule.batch_seqs_at(self.tokens) // self._per_step(args)
        if want != args.gradient_accumulation_steps:
            if self.micro_in_epoch % want == 0:
                args.gradient_accumulation_steps = want
            else:
                self.delays.append({"tokens": self.tokens, "accumulation": want, "micro_batches_in_epoch": self.micro_in_epoch})

    def _check_epochs(self, micro_per_epoch: int, max_steps: int, epochs: int, per: int) -> None:
        """Refuse a run the Trainer would end before ``max_steps`` (see :meth:`planned_steps`)."""
        ends = self.planned_steps(micro_per_epoch, max_steps, epochs, per)
        if ends[-1] >= max_steps:
            return
        acc0 = self.schedule.phases[0][1] // per
        updates = -(-micro_per_epoch // acc0)
        reach = max(s for e, s in enumerate(ends) if s > e * updates)  # max_steps=s plans the e + 1 epochs that take s
        raise ConfigError(f"the Trainer would stop after {ends[-1]} of max_steps={max_steps} optimizer steps: it plans "
                          f"{epochs} epoch(s) of {updates} steps at the first batch's accumulation ({acc0}), and this "
                          f"schedule's larger batches use an epoch's {micro_per_epoch} micro-batches up in fewer steps; "
                          f"set max_steps={reach}, or give it more data an epoch (e.g. "
                          f"torch.utils.data.ConcatDataset([dataset] * 2))")

    def planned_steps(self, micro_per_epoch: int, max_steps: int, epochs: int, per: int) -> list[int]:
        """The optimizer steps the Trainer takes by the end of each epoch (at most ``max_steps``): it
        runs ``epochs`` epochs of at most ceil(micro-batches / first accumulation) steps, each step
        takes the accumulation this callback sets (the last one of an epoch what is left), with full
        micro-batches of ``per`` sequences over the ranks."""
        updates = -(-micro_per_epoch // (self.schedule.phases[0][1] // per))
        tokens = steps = 0
        ends = []
        for _ in range(epochs):
            acc, micro, n = self.schedule.batch_seqs_at(tokens) // per, 0, 0
            while micro < micro_per_epoch and n < updates and steps < max_steps:
                take = min(acc, micro_per_epoch - micro)
                micro, n, steps, tokens = micro + take, n + 1, steps + 1, tokens + take * per * self.schedule.seq_len
                want = self.schedule.batch_seqs_at(tokens) // per
                acc = want if micro % want == 0 else acc
            ends.append(steps)
            if steps >= max_steps:
                break
        return ends

    # ---- the learning rate ------------------------------------------------------------------
    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
        micro = self._step["micro"] + 1  # the step's last micro-batch has no on_substep_end
        ranks = max(args.world_size, 1)
        b = self._step["seqs"] * ranks or micro * self._per_step(args)
        self._taken, self._step = (micro, b), {"micro": 0, "seqs": 0}
        mult = self.schedule.lr_multiplier_for(b)
        self._saved_lr = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * mult
        self.history.append({"tokens": self.tokens, "batch_seqs": b, "lr_multiplier": mult,
                             "lr": optimizer.param_groups[0]["lr"]})
        if self.noise_scale:
            self._noise_scale_step(args, b, optimizer, state)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
        for g, lr in zip(optimizer.param_groups, self._saved_lr):
            g["lr"] = lr

    def on_log(self, args, state, control, logs=None, **kw):
        """A training record gets the applied LR and the batch of the latest step (and so do the
        sinks that come after this callback, and ``state.log_history``)."""
        if not logs or "learning_rate" not in logs or not self.history:
            return
        h = self.history[-1]
        add = {"base_learning_rate": logs["learning_rate"], "learning_rate": h["lr"], "batch_seqs": h["batch_seqs"],
               "batch_tokens": h["batch_seqs"] * self.schedule.seq_len, "tokens": self.tokens}
        logs.update(add)
        last = state.log_history[-1] if state.log_history else {}
        if last.get("step") == state.global_step and "learning_rate" in last:
            last.update(add)

    # ---- the noise scale ----------------------------------------------------------------------
    def _grad_hook(self, g):
        self._gns["seen"].append(g.detach())

    def _close_micro(self) -> None:
        s = self._gns
        if s["seen"]:
            s["micro_sq"] += float(torch.stack(torch._foreach_norm(s["seen"])).double().square().sum())
            s["micros"] += 1
            s["seen"] = []

    def on_substep_end(self, args, state, control, **kw):
        self._step["micro"] += 1
        if self.noise_scale:
            self._close_micro()

    def _noise_scale_step(self, args, b: int, optimizer, state) -> None:
        s = self._gns
        self._close_micro()
        micros, micro_sq = s["micros"], s["micro_sq"]
        s["micros"], s["micro_sq"] = 0, 0.0
        if micros < 2:
            return
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        big_sq = float(torch.stack(torch._foreach_norm([p.grad for p in params])).double().square().sum())
        if args.max_grad_norm and math.sqrt(big_sq) >= args.max_grad_norm * (1 - 1e-6):
            return  # clipped: the unclipped norm is not visible here
        b_small = b // micros
        # each micro-batch's gradient is (1/N)·∇(its loss sum); its own mean-loss gradient is micros x that
        small_sq = micro_sq / micros * micros ** 2
        g2, tr = two_batch_estimates([small_sq], [big_sq], b_small, b)
        s["n"] += 1
        s["g2"] = self.ema_beta * s["g2"] + (1 - self.ema_beta) * float(g2[0])
        s["tr"] = self.ema_beta * s["tr"] + (1 - self.ema_beta) * float(tr[0])
        corr = 1 - self.ema_beta ** s["n"]
        g2h, trh = s["g2"] / corr, s["tr"] / corr
        b_simple = max(trh, 0.0) / g2h if g2h > 0 else float("inf")
        self.history[-1]["gns/b_simple"] = b_simple
        state.log_history.append({"step": state.global_step + 1, "gns/b_simple": b_simple, "gns/b_small": b_small})

    def on_train_end(self, args, state, control, **kw):
        for h in getattr(self, "_hooks", []):
            h.remove()
        self._hooks = []
