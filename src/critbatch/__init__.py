"""critbatch: measure the local critical batch size of LM pre-training by branched training
(Merrill et al. 2025), the gradient noise scale beside it, and the batch-size warmup that follows.

Library entry points: :func:`critbatch.train.train`, :func:`critbatch.data.prepare`,
:class:`critbatch.BatchSchedule`, :mod:`critbatch.presets`.
"""

from .version import __version__  # noqa: E402

from .config import DataConfig, LRScheduleConfig, ModelConfig, OptimConfig, TrainConfig  # noqa: E402
from .errors import CritbatchError  # noqa: E402
from .schedules import BatchSchedule  # noqa: E402

__all__ = ["__version__", "TrainConfig", "ModelConfig", "OptimConfig", "LRScheduleConfig", "DataConfig",
           "BatchSchedule", "CritbatchError"]
