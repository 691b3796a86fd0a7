"""Pieces shared by the cross-tokenizer aligners (overlap, dskd, uld, mined).

- :class:`PairedAligner`: ``align`` from character offsets (:mod:`.offsets`) and the
  alignment-ratio metric (aligned student rows / student loss rows).
- :func:`pair_rows`: the batch's pair indices, checked.
- :func:`paired_loss`: the batch's pairs handed to the chunked driver
  (:func:`kdcore.distill.loss.chunked_distill`) with a frozen teacher, KD on the paired student rows
  and CE on every labelled one.
- :func:`check_hidden`: one-line errors for hidden/head shape mismatches.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from kdcore.distill.aligner import AlignedBatch, Aligner, Alignment, LossSpec, Tokenized
from kdcore.distill.loss import ChunkView, LossOutput, chunked_distill
from kdflow_algorithms.aligners.offsets import offsets_alignment


class PairedAligner(Aligner):
    """Aligns by character offsets and reports ``align_ratio`` from ``metrics()``.

    ``align_ratio`` = aligned student rows / student loss rows, over the ``forward`` calls since
    the previous ``metrics()`` call (reading it starts a new window).
    """

    cross_tokenizer = True
    fetch_all_teacher = False  # True: every teacher loss position crosses the channel (DSKD CMA)

    def __init__(self) -> None:
        super().__init__()
        self._aligned = 0
        self._student_rows = 0

    def align(self, student: Tokenized, teacher: Tokenized) -> Alignment:
        return offsets_alignment(student, teacher, fetch_all_teacher=self.fetch_all_teacher)

    def _count(self, aligned: int, student_rows: int) -> None:
        self._aligned += int(aligned)
        self._student_rows += int(student_rows)

    def metrics(self) -> dict[str, float]:
        out = {}
        if self._student_rows:
            out["align_ratio"] = self._aligned / self._student_rows
        self._aligned = self._student_rows = 0
        return out


def pair_rows(batch: AlignedBatch, name: str) -> tuple[Tensor, Tensor]:
    """``(student_index, teacher_index)`` as int64 on the student's device, validated:
    in range, and each student row paired at most once."""
    s = batch.student_index.to(device=batch.student_hidden.device, dtype=torch.long).reshape(-1)
    t = batch.teacher_index.to(device=batch.student_hidden.device, dtype=torch.long).reshape(-1)
    if s.shape != t.shape:
        raise ValueError(f"{name}: student_index has {s.numel()} pairs but teacher_index has {t.numel()}")
    n_s, n_t = batch.student_hidden.shape[0], batch.teacher_hidden.shape[0]
    if s.numel():
        if int(s.min()) < 0 or int(s.max()) >= n_s:
            raise ValueError(f"{name}: student_index outside the {n_s} student rows")
        if int(t.min()) < 0 or int(t.max()) >= n_t:
            raise ValueError(f"{name}: teacher_index outside the {n_t} teacher rows")
        if torch.unique(s).numel() != s.numel():
            raise ValueError(f"{name}: a student row is paired with more than one teacher row")
    return s, t


def paired_loss(batch: AlignedBatch, loss: LossSpec, pairs: tuple[Tensor, Tensor], *,
                loss_fn: Callable[..., Tensor] | None = None, loss_options: dict[str, Any] | None = None,
                teacher_head: Tensor | None = None, student_view: ChunkView | None = None,
                teacher_view: ChunkView | None = None) -> LossOutput:
    """``kd_scale·Σ_pairs KD + ce_scale·Σ_labelled CE`` over the student rows of ``batch``.

    ``pairs``: ``(student_index, teacher_index)`` from :func:`pair_rows`. KD compares, per pair,
    the student logits ``h_s·W_sᵀ`` with the frozen teacher's logits ``h_t·W_tᵀ``
    (``teacher_head`` replaces ``batch.teacher_head``, e.g. gathered to a shared vocabulary), each
    through its optional view, with ``loss_fn`` (default: the recipe's loss and options).
    ``kd_tokens`` is the number of pairs.
    """
    s_idx, t_idx = pairs
    h_s = batch.student_hidden
    w_t = (batch.teacher_head if teacher_head is None else teacher_head).detach()
    n = h_s.shape[0]
    kd_mask = torch.zeros(n, dtype=torch.bool, device=h_s.device)
    kd_mask[s_idx] = True
    teacher_rows = torch.zeros(n, dtype=torch.long, device=h_s.device)
    teacher_rows[s_idx] = t_idx
    return chunked_distill(
        h_s, batch.student_head, batch.teacher_hidden.detach().to(w_t.dtype), w_t,
        loss_fn=loss.fn if loss_fn is None else loss_fn, loss_options=loss.options if loss_fn is None else loss_options,
        labels=batch.labels.to(device=h_s.device, dtype=torch.long).reshape(-1), kd_mask=kd_mask,
        teacher_rows=teacher_rows, student_view=student_view, teacher_view=teacher_view,
        temperature=loss.temperature, kd_scale=loss.kd_scale, ce_scale=loss.ce_scale, chunk_size=loss.chunk_size,
    )


def check_hidden(batch: AlignedBatch, name: str) -> None:
    """One-line errors for hidden/head shape mismatches on either side."""
    for side, h, w in (("student", batch.student_hidden, batch.student_head),
                       ("teacher", batch.teacher_hidden, batch.teacher_head)):
        if h.dim() != 2 or w.dim() != 2 or h.shape[1] != w.shape[1]:
            raise ValueError(f"{name}: {side}_hidden {tuple(h.shape)} and {side}_head {tuple(w.shape)} must be "
                             "[N, H] and [V, H] with the same H")
