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
calls the aligner's ``forward``, which returns a ``kdcore.distill.loss.LossOutput``. Aligners call
the chunked driver ``kdcore.distill.loss.chunked_distill`` (or its same-vocabulary form
``distill_loss``), giving it per-chunk views for restricted, mapped or projected
distributions, so no ``[N, V]`` tensor is built.

Everything the core calls on an aligner is declared on :class:`Aligner` with a default, so an
aligner overrides only what it needs and the core never probes with ``hasattr``.
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
    # a vision-language side's pixel inputs for this sample (kdcore.data.images.VisionInputs);
    # None for text
    vision: Any = field(default=None, repr=False, compare=False)


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
    """Base class for aligners; subclasses implement ``align`` and ``forward``.

    The core calls, in this order: ``setup`` (once, with the hidden sizes), ``parameters()``
    and ``lr_scale`` (to build the optimizer), ``check_heads`` (once, with the loaded heads),
    then per sample ``align``, per micro-batch ``collate`` and ``forward``, and ``metrics()``
    whenever it writes a record. ``cross_tokenizer`` and ``vocab_size`` are read as attributes.
    ``parameters()`` is ``nn.Module``'s: modules and parameters an aligner registers (e.g.
    DSKD's projectors) are trained, kept equal across ranks and checkpointed by the core; the
    base has none.
    """

    #: True when the aligner needs teacher tokenization (cross-tokenizer); False lets the core
    #: send the student's own token ids to the teacher. Default True: the general case.
    cross_tokenizer: bool = True

    #: learning-rate multiplier for this module's parameters: the core trains them at
    #: ``lr * lr_scale`` (e.g. DSKD's randomly initialised projectors learn faster). Default 1.0:
    #: the student's own rate.
    lr_scale: float = 1.0

    #: the number of token ids both models share when they share one vocabulary (same-tokenizer
    #: aligners); the core compares the two heads' first ``vocab_size`` rows for the top-1
    #: agreement metric. Default None: the vocabularies are not one (cross-tokenizer).
    vocab_size: int | None = None

    def setup(self, *, student_hidden_size: int, teacher_hidden_size: int) -> None:
        """Called once by the core with the models' hidden sizes, before it builds the optimizer
        (and before it restores a checkpoint); aligners with parameters create them here.
        Default: nothing to build."""

    def check_heads(self, student_rows: int, teacher_rows: int) -> int | None:
        """Called once by the core with the row counts of the loaded student and teacher heads,
        before the first step, to fail early on heads that do not fit the tokenizers. Raises
        ``ValueError`` naming the head; may return the number of head rows ``forward`` keeps.
        Default: any heads are accepted (returns None)."""
        return None

    def align(self, student: Tokenized, teacher: Tokenized) -> Alignment:  # pragma: no cover - interface
        """Per sample: the teacher positions whose hidden states cross the channel and the
        pairs of student loss positions with them."""
        raise NotImplementedError

    def collate(self, extras: list[dict[str, Any]], student_offsets: list[int], teacher_offsets: list[int]) -> dict[str, Any]:
        """Merge per-sample ``Alignment.extra`` into a batch (row offsets given per sample).
        Default: no extra data (an empty dict)."""
        return {}

    def forward(self, batch: AlignedBatch, loss: LossSpec):  # pragma: no cover - interface
        """Per micro-batch: the ``kdcore.distill.loss.LossOutput`` of ``batch`` under ``loss``."""
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        """Extra scalars for metrics.jsonl (e.g. projector accuracy) since the previous call;
        reading them starts a new window. Default: none (an empty dict)."""
        return {}
