"""A small callback surface. Callbacks with state return it from ``state_dict`` (tensors, numbers,
strings, lists and dicts only) and it is saved in every checkpoint."""

from __future__ import annotations


class Callback:
    name: str = "callback"

    def on_train_start(self, trainer) -> None:
        """After the model, optimizer and state are ready, before the first step of this session."""

    def on_micro_backward(self, trainer, micro_index: int, n_micro: int) -> None:
        """After the backward pass of one micro-batch (gradients accumulate in ``.grad``)."""

    def on_before_optim_step(self, trainer, record: dict) -> None:
        """After gradients are complete (and synchronised), before clipping and the step."""

    def on_step_end(self, trainer, record: dict) -> None:
        """After the optimizer step; may add ``namespace/name`` keys to ``record``."""

    def on_train_end(self, trainer, result: dict) -> None:
        """After the run finished (not when it paused)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
