"""OLMo-core's ``BatchSizeSchedulerCallback`` from a critbatch schedule.

``schedule.json``'s ``exports.olmo_core_batch_size_scheduler`` (``batch_sizes`` in tokens, ``schedule``
as token Durations) is the callback's config: OLMo-core's own decoding turns it into the callback
(``olmo_core.config``'s ``decode(BatchSizeSchedulerCallback, d)``, or inside a trainer config with
``"_CLASS_": "olmo_core.train.callbacks.BatchSizeSchedulerCallback"``). For configs built in Python,
:func:`callback` returns the object itself (its ``schedule`` entries must be ``Duration`` objects).

What OLMo-core also needs, which the callback does not do for you:

* the data loader's ``global_batch_size`` equal to the schedule's first batch, in tokens;
* an LR scheduler whose shape does not depend on steps: ``units="tokens"`` (or a constant/WSD
  scheduler, or ``t_max`` set), else OLMo-core refuses the callback;
* the ``sqrt`` LR rule: the callback multiplies the base LR by sqrt(new/old) itself, and changes no
  other optimizer setting (so an Adam rule other than ``none`` is not reproduced).
"""

from __future__ import annotations

from ..errors import ConfigError
from ..schedules import BatchSchedule
from ..schedules.export import to_olmo_core

CALLBACK_CLASS = "olmo_core.train.callbacks.BatchSizeSchedulerCallback"


def callback_config(schedule: BatchSchedule, *, with_class: bool = False) -> dict:
    """The callback's config as JSON-able data (with ``_CLASS_`` for a trainer config file)."""
    d = to_olmo_core(schedule)
    return {"_CLASS_": CALLBACK_CLASS, **d} if with_class else d


def callback(schedule: BatchSchedule):
    """The real ``BatchSizeSchedulerCallback`` (ai2-olmo-core must be installed)."""
    if schedule.rule != "sqrt":
        raise ConfigError(f"OLMo-core's callback rescales the LR by sqrt; this schedule's rule is {schedule.rule!r}")
    if schedule.adam_rule != "none":
        raise ConfigError(f"OLMo-core's callback changes only the LR; this schedule's adam rule is {schedule.adam_rule!r}")
    try:
        from olmo_core.train.callbacks import BatchSizeSchedulerCallback
        from olmo_core.train.common import Duration
    except ImportError:
        raise ConfigError("the OLMo-core callback needs the ai2-olmo-core package") from None
    d = to_olmo_core(schedule)
    return BatchSizeSchedulerCallback(batch_sizes=list(d["batch_sizes"]),
                                      schedule=[Duration.tokens(x["value"]) for x in d["schedule"]])
