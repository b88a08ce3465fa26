"""The state of a training run between steps: a typed record saved in every checkpoint.

Everything the loop advances step by step lives here — the position (step, stream offset), the
smoothed training loss and where this run directory started — and is saved in ``state.pt`` (with the
RNG and the callbacks' state beside it), so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

EMA_ALPHA = 0.5
"""Merrill et al. 2025: the training loss smoothed by an EMA with alpha = 0.5 over steps."""


def ema_update(previous: float | None, value: float, alpha: float = EMA_ALPHA) -> float:
    """One step of the training-loss EMA (the first value starts it). The one place it is computed:
    the trainer, and a branch that reads its start from the parent's logged step losses."""
    return value if previous is None else alpha * value + (1 - alpha) * previous


@dataclass
class TrainerState:
    """Where a run is, between two optimizer steps."""

    step: int = 0
    """Optimizer steps since the run's very start (a branch counts its parent's)."""
    offset_seqs: int = 0
    """Sequences of the stream consumed: the loader's whole state (tokens = offset × seq_len)."""
    loss_ema: float | None = None
    """The training loss smoothed by :func:`ema_update`."""
    last_loss: float | None = None
    """The last step's mean training loss."""
    start_step: int = 0
    """Where this run directory started (a branch: its checkpoint's step)."""
    start_tokens: int = 0
    elapsed_s: float = 0.0
    """Training wall time of this run directory, over all its sessions."""
    eval_s: float = 0.0
    """Wall time of its held-out evaluations, over all its sessions (those inside the training loop
    are in ``elapsed_s`` too; the one at the end is not)."""

    def advance(self, batch_seqs: int, loss: float) -> None:
        """After a finished step of ``batch_seqs`` sequences with mean loss ``loss``."""
        self.step += 1
        self.offset_seqs += batch_seqs
        self.loss_ema = ema_update(self.loss_ema, loss)
        self.last_loss = loss

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_session(self, saved: dict) -> None:
        """Take a resumed run's saved session fields (those a checkpoint has; older ones lack some)."""
        for key in ("loss_ema", "start_step", "start_tokens", "elapsed_s", "last_loss", "eval_s"):
            if key in saved:
                setattr(self, key, saved[key])
