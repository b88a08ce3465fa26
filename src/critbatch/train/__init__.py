from .callbacks import Callback
from .checkpoint import kept_checkpoints, list_checkpoints, load_checkpoint
from .loop import Trainer, resolve_config, train

__all__ = ["Callback", "Trainer", "train", "resolve_config", "list_checkpoints", "kept_checkpoints",
           "load_checkpoint"]
