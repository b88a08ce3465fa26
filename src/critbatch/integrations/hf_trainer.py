"""A Hugging Face ``transformers.Trainer`` callback that applies a critbatch batch schedule: the batch
grows through gradient accumulation (the per-device micro-batch stays), the learning rate is
multiplied by the schedule's rule at every phase, thresholds are in tokens; optionally it logs the
online gradient noise scale.

    from critbatch.integrations.hf_trainer import BatchScheduleCallback
    trainer = Trainer(model, args, train_dataset=..., callbacks=[BatchScheduleCallback("schedule.json", seq_len=1024)])

How it works, and what it asks of the Trainer:

* ``args.per_device_train_batch_size`` × ranks × ``args.gradient_accumulation_steps`` must be the
  schedule's first batch (in sequences of ``seq_len`` tokens); every phase's batch must be a
  multiple of the per-device batch × ranks. The callback changes ``args.gradient_accumulation_steps``
  between optimizer steps; the Trainer fetches that many micro-batches for the next step and
  normalises the loss by their tokens (``num_items_in_batch``).
* A phase starts at the first optimizer step that starts at or after its threshold *and* at which
  the micro-batches already taken in this epoch are a multiple of the new accumulation: the Trainer
  decides when to step the optimizer by counting micro-batches modulo the accumulation, so a change
  at any other step would step in the middle of a batch. With doublings this delays a change by at
  most one step of the old batch; the callback records every delay (``delays``).
* The LR: the Trainer's scheduler sets each step's LR; the callback multiplies it by
  rule(batch / first batch) just before the optimizer step and restores it after (the scheduler's
  own shape over steps is the Trainer's; count it in tokens by giving it ``max_steps`` in tokens'
  worth, or use a constant/WSD schedule).
* ``noise_scale=True`` logs ``gns/b_simple`` (sequences) from the micro-batch gradients against
  their sum (McCandlish et al. 2018, as :class:`critbatch.gns.NoiseScaleCallback`); steps whose
  gradient the Trainer clipped are skipped (the norm before clipping is not visible to callbacks).
"""

from __future__ import annotations

import math
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
        """Per optimizer step: tokens before it, its batch (sequences) and LR multiplier."""
        self.delays: list[dict] = []
        self._saved_lr: list[float] = []
        self._gns = {"g2": 0.0, "tr": 0.0, "n": 0, "micro_sq": 0.0, "micros": 0, "seen": []}

    # ---- the batch ------------------------------------------------------------------------
    def _per_step(self, args) -> int:
        return args.per_device_train_batch_size * max(args.world_size, 1)

    def on_train_begin(self, args, state, control, model=None, **kw):
        first = self.schedule.phases[0][1]
        per = self._per_step(args)
        if per * args.gradient_accumulation_steps != first:
            raise ConfigError(f"the Trainer's batch (per-device {args.per_device_train_batch_size} x ranks "
                              f"{max(args.world_size, 1)} x accumulation {args.gradient_accumulation_steps}) is not the "
                              f"schedule's first batch of {first} sequences")
        for t, b in self.schedule.phases:
            if b % per:
                raise ConfigError(f"the schedule's batch {b} (from {t:,} tokens) is not a multiple of per-device batch "
                                  f"x ranks = {per}")
        if self.noise_scale and model is not None:
            self._hooks = [p.register_hook(self._grad_hook) for p in model.parameters() if p.requires_grad]

    def on_epoch_begin(self, args, state, control, **kw):
        self.micro_in_epoch = 0

    def on_step_end(self, args, state, control, **kw):
        """After an optimizer step: count it, then set the accumulation of the next one."""
        b = self._per_step(args) * args.gradient_accumulation_steps
        self.micro_in_epoch += args.gradient_accumulation_steps
        self.tokens += b * self.schedule.seq_len
        want = self.schedule.batch_seqs_at(self.tokens) // self._per_step(args)
        if want != args.gradient_accumulation_steps:
            if self.micro_in_epoch % want == 0:
                args.gradient_accumulation_steps = want
            else:
                self.delays.append({"tokens": self.tokens, "accumulation": want, "micro_batches_in_epoch": self.micro_in_epoch})

    # ---- the learning rate ------------------------------------------------------------------
    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
        b = self._per_step(args) * args.gradient_accumulation_steps
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
