"""``same_vocab``: student and teacher share one tokenizer; position i learns from position i.

The teacher receives the student's own token ids (``cross_tokenizer = False``), so every
student loss position pairs with the same teacher position and KD compares full next-token
distributions over the shared vocabulary. Heads padded to different sizes within a model family
are sliced to the real vocabulary (:mod:`kdcore.modeling.vocab`).

When the vocabularies are checked: the tokenizers' vocabularies are compared once, when the
aligner is built (a genuine mismatch fails at startup, before any model loads); the head sizes
are checked by :meth:`SameVocabAligner.check_heads`, which ``forward`` calls on every micro-batch
(an integer comparison after the first call) — the trainer may also call it once when it has
loaded the heads, to fail before the first step.
"""

from __future__ import annotations

from typing import Any

import torch

from kdcore.distill.aligner import AlignedBatch, Aligner, Alignment, LossSpec, Tokenized
from kdcore.distill.loss import LossOutput, distill_loss
from kdcore.modeling.vocab import check_head_rows, same_vocab_size


class SameVocabAligner(Aligner):
    """Identity alignment over a shared vocabulary of ``vocab_size`` ids."""

    cross_tokenizer = False

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self._checked: tuple[int, int] | None = None  # head sizes already validated

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}"

    def check_heads(self, student_rows: int, teacher_rows: int) -> int:
        """Validate the heads' row counts; returns the rows to keep (``vocab_size``).

        Raises :class:`kdcore.modeling.vocab.VocabMismatchError` when a head has fewer rows than the
        vocabulary; extra rows are padding and are sliced off by ``forward``.
        """
        if self._checked != (student_rows, teacher_rows):
            check_head_rows(self.vocab_size, student_rows, teacher_rows)
            self._checked = (student_rows, teacher_rows)
        return self.vocab_size

    def align(self, student: Tokenized, teacher: Tokenized | None = None) -> Alignment:
        """Pair student loss position ``k`` with the same teacher position.

        ``teacher`` (optional) must hold the same token ids as ``student``: the core sends the
        student's ids to the teacher for this aligner.
        """
        if teacher is not None and list(teacher.input_ids) != list(student.input_ids):
            at = next((i for i, (a, b) in enumerate(zip(student.input_ids, teacher.input_ids)) if a != b),
                      min(len(student.input_ids), len(teacher.input_ids)))
            raise ValueError(
                f"same_vocab: teacher token ids differ from the student's at position {at} "
                f"({len(student.input_ids)} vs {len(teacher.input_ids)} tokens); the teacher must receive the "
                f"student's ids"
            )
        positions = list(student.loss_positions)
        pairs = list(range(len(positions)))
        return Alignment(teacher_positions=positions, student_index=pairs, teacher_index=list(pairs))

    def forward(self, batch: AlignedBatch, loss: LossSpec) -> LossOutput:
        """KD on the paired rows, CE on every student row with a label, over ``W[:vocab_size]``.

        ``batch.student_hidden [N_s, H_s]``, ``batch.teacher_hidden [N_t, H_t]``, pairs
        ``batch.student_index``/``batch.teacher_index [P]`` (one-to-one), ``batch.labels [N_s]``.
        """
        v = self.check_heads(batch.student_head.shape[0], batch.teacher_head.shape[0])
        h_s, h_t = batch.student_hidden, batch.teacher_hidden
        s_idx, t_idx = batch.student_index.long(), batch.teacher_index.long()
        n, p = h_s.shape[0], s_idx.numel()
        identity = (p == n == h_t.shape[0]
                    and torch.equal(s_idx, torch.arange(n, device=s_idx.device))
                    and torch.equal(t_idx, torch.arange(n, device=t_idx.device)))
        if identity:  # the usual case: no copy of the teacher rows
            teacher_rows, kd_mask = h_t, None
        else:
            if torch.unique(s_idx).numel() != p:
                raise ValueError("same_vocab: a student row is paired with more than one teacher row")
            teacher_rows = h_t.new_zeros(n, h_t.shape[1])
            teacher_rows[s_idx] = h_t[t_idx]
            kd_mask = torch.zeros(n, dtype=torch.bool, device=h_s.device)
            kd_mask[s_idx] = True
        return distill_loss(
            h_s, batch.student_head[:v], teacher_rows, batch.teacher_head[:v],
            loss_fn=loss.fn, loss_options=loss.options, labels=batch.labels, kd_mask=kd_mask,
            temperature=loss.temperature, kd_scale=loss.kd_scale, ce_scale=loss.ce_scale,
            chunk_size=loss.chunk_size,
        )


def same_vocab(*, student_tokenizer: Any, teacher_tokenizer: Any, options: Any = None,
               cache_dir: Any = None) -> SameVocabAligner:
    """One tokenizer for both models: each position learns from the same teacher position.

    Compares the tokenizers' vocabularies now and raises
    :class:`kdcore.modeling.vocab.VocabMismatchError` (naming both sizes and the cross-tokenizer
    aligners) when they differ. ``options`` and ``cache_dir`` are unused (no options, no maps).
    """
    return SameVocabAligner(same_vocab_size(student_tokenizer, teacher_tokenizer))
