"""The rollout interface: which sequences the student learns on at each step.

A policy's ``select(batch, ctx)`` gets the data set's micro-batch (a list of samples) and a
``RolloutContext`` and returns the samples to learn on: the batch itself (off-policy),
student samples, teacher samples, or a mix. Sampled token ids are used as they are.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class RolloutContext:
    step: int
    rng: random.Random  # seeded from train.seed and the rank, so runs repeat
    # Sampling callables, provided by the trainer when a sampling engine is configured:
    # sample_fn(samples, n=1) -> list of samples whose response tokens were generated.
    sample_student: Callable[..., list[Any]] | None = None
    sample_teacher: Callable[..., list[Any]] | None = None
    buffer: list[Any] = field(default_factory=list)  # replay buffer owned by the policy
    last_eval_loss: float | None = None


class RolloutPolicy:
    """Base class; ``select`` returns the samples the student learns on."""

    #: True when the policy never samples, so the trainer need not build a sampling engine.
    needs_sampling: bool = False

    def select(self, batch: list[Any], ctx: RolloutContext) -> list[Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        return {}
