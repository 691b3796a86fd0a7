"""Training: the loop and the parts it drives, the rollout policy interface and the sampler
policies sample with (see docs/architecture.md).

``kdcore.training.train`` / ``Trainer`` / ``TrainingError`` / ``TrainResult`` are the public
names. They load on first use, because plugin rollouts import ``kdcore.training.rollout_policy``
(a plain-Python protocol) and loading the registry must not build the whole trainer (torch,
engines, data) for that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kdcore.training.trainer import Trainer, train
    from kdcore.training.types import TrainingError, TrainResult

__all__ = ["Trainer", "train", "TrainingError", "TrainResult"]
_HOME = {"Trainer": "trainer", "train": "trainer", "TrainingError": "types", "TrainResult": "types"}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'kdcore.training' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"kdcore.training.{_HOME[name]}"), name)
