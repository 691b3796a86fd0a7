"""Training: the loop and the parts it drives (see docs/architecture.md)."""

from kdcore.training.trainer import Trainer, train
from kdcore.training.types import TrainingError, TrainResult

__all__ = ["Trainer", "train", "TrainingError", "TrainResult"]
