"""Registries: the named implementations of one extension point (model families, decision rules,
launchers, training callbacks), in the manner of torchtitan's ``register_train_spec``.

A config field whose values name an implementation takes the registry as its ``choices``
(:func:`critbatch.config.option`), so the accepted values are the registry's keys — the command
line's choices, the validation of every config (:func:`critbatch.config.check_choices`) and its
error message all read them — and adding an implementation is one ``register`` call in one file.

Built-in entries may be given as ``"module:attribute"`` strings, imported on first use: the keys are
known without importing the implementation (a registry on the ground floor names engine modules
without importing them, and ``transformers`` is imported only for ``family='hf'``).
"""

from __future__ import annotations

import importlib
from typing import Any, Iterator

from .errors import ConfigError


class Registry:
    """Named implementations of one kind (``kind`` names it in messages)."""

    def __init__(self, kind: str, builtins: dict[str, Any] | None = None):
        self.kind = kind
        self._entries: dict[str, Any] = dict(builtins or {})

    def register(self, name: str, obj: Any = None, *, replace: bool = False) -> Any:
        """Register ``obj`` under ``name`` (as a decorator when ``obj`` is omitted). A name already
        taken is refused unless ``replace``."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a {self.kind} needs a non-empty name, not {name!r}")

        def add(o: Any) -> Any:
            if name in self._entries and not replace:
                raise ConfigError(f"{self.kind} {name!r} is already registered; pass replace=True to replace it")
            self._entries[name] = o
            return o

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def __getitem__(self, name: str) -> Any:
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}; accepted: {', '.join(self)}")
        obj = self._entries[name]
        if isinstance(obj, str) and ":" in obj:  # a built-in, imported on first use
            module, _, attr = obj.partition(":")
            obj = getattr(importlib.import_module(module), attr)
            self._entries[name] = obj
        return obj

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self._entries else default

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        return list(self._entries)

    def check(self, value: Any, where: str) -> None:
        """A ConfigError naming ``where``, the value and the accepted names, unless it is one."""
        if value not in self._entries:
            raise ConfigError(f"{where}={value!r} is not one of {', '.join(self)}")

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self)})"


MODEL_FAMILIES = Registry("model family", {"gpt": "critbatch.model.gpt:FAMILY", "hf": "critbatch.model.hf:FAMILY"})
"""Model families (:class:`critbatch.model.family.ModelFamily`): the built-in GPT and causal LMs
from ``transformers``. ``ModelConfig.family`` takes its values from here."""

TRAINING_CALLBACKS = Registry("training callback", {
    "gns": "critbatch.gns.online:NoiseScaleCallback",
    "tensorboard": "critbatch.train.trackers:TensorBoardTracker",
    "wandb": "critbatch.train.trackers:WandbTracker",
})
"""Training callbacks a run may name (in ``job.json``, in ``TrainConfig.log_to``, on the command line):
name -> a :class:`critbatch.train.Callback` class built with no arguments. ``tensorboard`` and
``wandb`` are the experiment trackers (:mod:`critbatch.train.trackers`)."""
