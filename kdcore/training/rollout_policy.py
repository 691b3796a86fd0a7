"""The rollout interface: which sequences the student learns on at each step.

A policy's ``select(batch, ctx)`` gets the data set's micro-batch (a list of samples) and a
``RolloutContext`` and returns the samples to learn on: the batch itself (off-policy),
student samples, teacher samples, or a mix. Sampled token ids are used as they are.

The trainer calls ``select`` once per micro-batch, on every rank (each rank samples its own
prompts), in step order. For a policy with ``needs_sampling = True`` it builds the sampling
callables (``kdcore.training.sampler.RolloutSampler``) and prepares a step only after the previous
step's optimizer update, so student samples come from the current weights (up to
``rollout.sync_every - 1`` updates old). Samples returned may be more or fewer than the batch
(``rollout.n`` samples per prompt); the loss is a token mean over whatever is returned.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Optional


@dataclass
class RolloutContext:
    step: int  # 0-based optimizer step being prepared
    rng: random.Random  # seeded from train.seed and the rank, so runs repeat
    # Sampling callables, provided by the trainer when the policy needs_sampling:
    # sample_fn(samples, **overrides) -> samples whose responses were generated, n per prompt,
    # prompt-major; overrides: max_new_tokens, temperature (0 = greedy), top_p, n; end_at: a rule
    # for where an answer ends (text -> character index or None; RolloutSampler's docstring).
    sample_student: Optional[Callable[..., list[Any]]] = None
    sample_teacher: Optional[Callable[..., list[Any]]] = None
    # Replay buffer: the same list at every step of a run (policies own its contents and
    # capacity); it starts empty on --resume.
    buffer: list[Any] = field(default_factory=list)
    last_eval_loss: Optional[float] = None  # eval_kd of the latest held-out evaluation
    # The latest evaluation record (step, eval_kd, eval_ppl, eval_teacher_kl, ...), or None.
    last_eval: Optional[dict[str, Any]] = None
    max_steps: int = 0  # train.max_steps, for schedules over training progress
    micro_batch: int = 0  # index of the micro-batch within the step
    teacher_version: int = 0  # bumped each time self-distillation refreshes the teacher's weights


class RolloutPolicy:
    """Base class; ``select`` returns the samples the student learns on."""

    #: True when the policy samples; False lets the trainer skip building a sampler and keep
    #: the teacher a full step ahead.
    needs_sampling: bool = False
    #: Who the policy samples from ("student", "teacher"): the student copy is only built and
    #: kept in sync when "student" is listed. Empty with needs_sampling = both.
    sample_sources: tuple[str, ...] = ()
    #: Origins of the samples ("student", "teacher") that take no CE themselves when kd_ratio < 1:
    #: the data's references of their prompts carry the CE half instead
    #: (kdcore/training/steps.py). Student samples always: CE on a model's own samples is noise.
    ce_from_data: tuple[str, ...] = ("student",)

    def select(self, batch: list[Any], ctx: RolloutContext) -> list[Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        """Per-step figures for metrics.jsonl (called once per optimizer step, then reset at will)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Small JSON-able state kept in checkpoints (e.g. an adaptive probability)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def require(fn: Optional[Callable[..., Any]], policy: str, what: str) -> Callable[..., Any]:
    """``fn`` or a clear error saying the trainer did not provide it."""
    if fn is None:
        raise RuntimeError(f"rollout '{policy}' needs {what}, but the trainer provided none "
                           "(is needs_sampling set on the policy?)")
    return fn
