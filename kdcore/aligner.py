"""The aligner interface: how student loss positions learn from teacher positions.

Terms used throughout (one sample):

- A *loss position* ``p`` of a tokenization is a position whose hidden state predicts token
  ``p + 1`` and whose target is in the loss (the response, or every token for plain text).
- ``Tokenized`` is one side's view of a sample: token ids, character offsets of each token in
  the sample's text, and its loss positions.
- ``Alignment`` (per sample) lists the teacher positions whose last hidden states the teacher
  engine must return (nothing else crosses the channel), and pairs student loss positions with
  them. Aligners may put extra per-sample data in ``extra``; ``collate`` merges it.

Per micro-batch the core builds an ``AlignedBatch`` (everything flattened over the batch) and
calls the aligner's ``forward``, which returns a ``kdcore.kdloss.LossOutput``. Aligners whose
divergence is a registered loss over (restricted or projected) logits call
``kdcore.kdloss.distill_loss``, the chunked driver, so no ``[N, V]`` tensor is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class Tokenized:
    input_ids: list[int]
    offsets: list[tuple[int, int]]  # character span of each token in the sample's text
    loss_positions: list[int]  # positions whose next-token prediction is trained


@dataclass
class Alignment:
    teacher_positions: list[int]  # teacher positions to fetch hidden states for
    student_index: list[int]  # per pair: index into the student's loss_positions
    teacher_index: list[int]  # per pair: index into teacher_positions
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossSpec:
    """The chosen divergence and how to mix it (from the recipe's ``distill`` section)."""

    fn: Callable[..., torch.Tensor]
    options: dict[str, Any]
    temperature: float
    kd_ratio: float
    chunk_size: int
    kd_scale: float  # multiplies the KD sum: kd_ratio / global KD token count
    ce_scale: float  # multiplies the CE sum: (1 - kd_ratio) / global CE token count


@dataclass
class AlignedBatch:
    student_hidden: torch.Tensor  # [N_s, H_s] at the student loss positions (requires grad)
    student_head: torch.Tensor  # [V_s, H_s]
    labels: torch.Tensor  # [N_s] next-token targets of the student loss positions
    teacher_hidden: torch.Tensor  # [N_t, H_t] at the requested teacher positions (no grad)
    teacher_head: torch.Tensor  # [V_t, H_t]
    student_index: torch.Tensor  # [P] pairs, indices into student rows
    teacher_index: torch.Tensor  # [P] pairs, indices into teacher rows
    extra: dict[str, Any] = field(default_factory=dict)


class Aligner(nn.Module):
    """Base class for aligners; subclasses implement ``align`` and ``forward``."""

    #: True when the aligner needs teacher tokenization (cross-tokenizer); False lets the core
    #: send the student's own token ids to the teacher.
    cross_tokenizer: bool = True

    #: learning-rate multiplier for this module's parameters: the core trains them at
    #: ``lr * lr_scale`` (e.g. DSKD's randomly initialised projectors learn faster).
    lr_scale: float = 1.0

    def setup(self, *, student_hidden_size: int, teacher_hidden_size: int) -> None:
        """Called once by the core with the models' hidden sizes, before it builds the optimizer
        (and before it restores a checkpoint); aligners with parameters create them here."""

    def align(self, student: Tokenized, teacher: Tokenized) -> Alignment:  # pragma: no cover - interface
        raise NotImplementedError

    def collate(self, extras: list[dict[str, Any]], student_offsets: list[int], teacher_offsets: list[int]) -> dict[str, Any]:
        """Merge per-sample ``Alignment.extra`` into a batch (row offsets given per sample)."""
        return {}

    def forward(self, batch: AlignedBatch, loss: LossSpec):  # pragma: no cover - interface
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        """Extra scalars for metrics.jsonl (e.g. projector accuracy)."""
        return {}
