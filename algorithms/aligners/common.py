"""Pieces shared by the cross-tokenizer aligners (overlap, dskd, uld, mined).

- :class:`PairedAligner`: ``align`` from character offsets (:mod:`.offsets`) and the
  alignment-ratio metric (aligned student rows / student loss rows).
- :func:`pair_rows`: the batch's pair indices, checked.
- :func:`student_chunked_loss`: a chunked loss over the *student* vocabulary whose teacher side
  is any function of the paired teacher rows (restricted logits, a MinED-mapped distribution,
  sorted probabilities), with CE on every labelled student row from the same chunk logits.
  ``kdcore.kdloss.distill_loss`` covers teachers whose logits are ``h_t·W_tᵀ`` over the same
  vocabulary; this covers the rest, with the same memory profile: per chunk the student logits
  are built, the loss and its gradient with respect to those logits are computed at once, and
  ``∂h_s = G·W_s`` / ``∂W_s += Gᵀ·h_s`` are accumulated, so nothing ``[N, V]``-sized outlives a
  chunk (the backward pass only scales the stored gradients).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcore.aligner import AlignedBatch, Aligner, Alignment, Tokenized
from kdcore.kdloss import LossOutput
from kdflow_algorithms.aligners.offsets import offsets_alignment

IGNORE_INDEX = -100  # label value excluded from CE (kdcore.kdloss convention)


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


KdFn = Callable[[Tensor, Tensor], Tensor]
"""``kd_fn(student_logits [k, V_s] (grad), pair_ids [k] int64) -> per-token loss [k]``; computes
its teacher side itself (from the pairs ``pair_ids``) without grad."""


class _Plan:
    def __init__(self, kd_fn, pair_of_row, labels, kd_scale, ce_scale, chunk_size):
        self.kd_fn = kd_fn
        self.pair_of_row = pair_of_row  # [n] pair id of each (active) student row, -1 = no KD
        self.labels = labels  # [n] or None
        self.kd_scale = kd_scale
        self.ce_scale = ce_scale
        self.chunk_size = chunk_size
        self.kd_sum: Tensor | None = None
        self.ce_sum: Tensor | None = None

    def run(self, h_s: Tensor, w_s: Tensor, need_h: bool, need_w: bool):
        n = h_s.shape[0]
        acc = torch.promote_types(h_s.dtype, torch.float32)
        kd_sum = torch.zeros((), dtype=torch.float64, device=h_s.device)
        ce_sum = torch.zeros((), dtype=torch.float64, device=h_s.device)
        need = need_h or need_w
        g_h = torch.zeros_like(h_s) if need_h else None
        # head gradient accumulated in fp32 across chunks, cast back once
        g_w = torch.zeros(w_s.shape, dtype=torch.promote_types(w_s.dtype, torch.float32), device=w_s.device) if need_w else None
        for start in range(0, n, self.chunk_size):
            stop = min(n, start + self.chunk_size)
            hs = h_s[start:stop]
            pairs = self.pair_of_row[start:stop]
            kd_local = (pairs >= 0).nonzero().squeeze(1)
            with torch.no_grad():
                ls = hs @ w_s.T
            if need:
                ls.requires_grad_(True)
            objective = None
            with torch.enable_grad() if need else torch.no_grad():
                if kd_local.numel():
                    ls_kd = ls.index_select(0, kd_local)
                    if self.kd_scale == 0.0:
                        ls_kd = ls_kd.detach()  # KD is only a metric: no graph through it
                    per_token = self.kd_fn(ls_kd, pairs.index_select(0, kd_local))
                    if per_token.shape != (kd_local.numel(),):
                        raise ValueError(f"per-token KD has shape {tuple(per_token.shape)}, expected [{kd_local.numel()}]")
                    kd_chunk = per_token.to(acc).sum()
                    kd_sum += kd_chunk.detach()
                    if self.kd_scale != 0.0 and kd_chunk.requires_grad:
                        objective = kd_chunk * self.kd_scale
                if self.labels is not None:
                    logits = ls if self.ce_scale != 0.0 else ls.detach()
                    ce_chunk = F.cross_entropy(logits.to(acc), self.labels[start:stop], ignore_index=IGNORE_INDEX,
                                               reduction="sum")
                    ce_sum += ce_chunk.detach()
                    if self.ce_scale != 0.0 and ce_chunk.requires_grad:
                        term = ce_chunk * self.ce_scale
                        objective = term if objective is None else objective + term
            if objective is None or not need:
                continue
            (g_ls,) = torch.autograd.grad(objective, [ls])
            g_ls = g_ls.to(hs.dtype)
            if g_h is not None:
                g_h[start:stop] = g_ls @ w_s
            if g_w is not None:
                g_w.add_((g_ls.T @ hs).to(g_w.dtype))
        if g_w is not None and g_w.dtype != w_s.dtype:
            g_w = g_w.to(w_s.dtype)
        return kd_sum.to(acc), ce_sum.to(acc), g_h, g_w


class _Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, plan: _Plan):
        kd_sum, ce_sum, g_h, g_w = plan.run(h_s, w_s, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(*(g for g in (g_h, g_w) if g is not None))
        ctx.has = (g_h is not None, g_w is not None)
        plan.kd_sum, plan.ce_sum = kd_sum, ce_sum
        return kd_sum * plan.kd_scale + ce_sum * plan.ce_scale

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        scale = float(grad_out)
        g_h = saved.pop(0) if ctx.has[0] else None
        g_w = saved.pop(0) if ctx.has[1] else None
        if scale != 1.0:
            g_h = None if g_h is None else g_h * scale
            g_w = None if g_w is None else g_w * scale
        return g_h, g_w, None


def student_chunked_loss(h_s: Tensor, w_s: Tensor, *, pair_rows: Tensor, kd_fn: KdFn, labels: Tensor | None,
                         kd_scale: float, ce_scale: float, chunk_size: int) -> LossOutput:
    """``kd_scale·Σ_pairs kd_fn + ce_scale·Σ_labelled CE`` over student rows, chunk by chunk.

    - ``h_s [N, H_s]`` (grad), ``w_s [V_s, H_s]`` (same dtype): student logits ``h_s·w_sᵀ``.
    - ``pair_rows [P]``: the student row of each pair (unique); ``kd_fn`` gets the logits of the
      paired rows of a chunk and their pair ids (see :data:`KdFn`).
    - ``labels [N]`` (``-100`` ignored): CE at temperature 1 on every labelled row.
    Returns :class:`kdcore.kdloss.LossOutput` (``kd_tokens = P``).
    """
    if h_s.dim() != 2 or w_s.dim() != 2 or h_s.shape[1] != w_s.shape[1] or h_s.dtype != w_s.dtype:
        raise ValueError(f"student hidden {tuple(h_s.shape)} {h_s.dtype} and head {tuple(w_s.shape)} {w_s.dtype} "
                         "must be [N, H] and [V, H] of one dtype")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    n, v = h_s.shape[0], w_s.shape[0]
    pair_of_row = torch.full((n,), -1, dtype=torch.long, device=h_s.device)
    pair_of_row[pair_rows] = torch.arange(pair_rows.numel(), device=h_s.device)
    active = pair_of_row >= 0
    ce_tokens = 0
    if labels is not None:
        labels = labels.to(device=h_s.device, dtype=torch.long).reshape(-1)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape [{n}], got {tuple(labels.shape)}")
        labelled = labels != IGNORE_INDEX
        bad = labelled & ((labels < 0) | (labels >= v))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"labels[{i}] = {int(labels[i])} is outside the student vocabulary [0, {v})")
        ce_tokens = int(labelled.sum())
        active = active | labelled
    elif ce_scale != 0.0:
        raise ValueError(f"ce_scale = {ce_scale} needs labels")
    if not bool(active.all()):  # rows with neither KD nor CE cost nothing
        keep = active.nonzero().squeeze(1)
        h_s = h_s.index_select(0, keep)
        pair_of_row = pair_of_row.index_select(0, keep)
        labels = labels.index_select(0, keep) if labels is not None else None
    plan = _Plan(kd_fn, pair_of_row, labels if ce_tokens else None, float(kd_scale), float(ce_scale), chunk_size)
    if torch.is_grad_enabled() and (h_s.requires_grad or w_s.requires_grad):
        loss = _Fused.apply(h_s, w_s, plan)
        kd_sum, ce_sum = plan.kd_sum, plan.ce_sum
    else:
        with torch.no_grad():
            kd_sum, ce_sum, _, _ = plan.run(h_s, w_s, False, False)
        loss = kd_sum * plan.kd_scale + ce_sum * plan.ce_scale
    return LossOutput(loss=loss, kd_sum=kd_sum.detach(), ce_sum=ce_sum.detach(),
                      kd_tokens=int(pair_rows.numel()), ce_tokens=ce_tokens)


def check_hidden(batch: AlignedBatch, name: str) -> None:
    """One-line errors for hidden/head shape mismatches on either side."""
    for side, h, w in (("student", batch.student_hidden, batch.student_head),
                       ("teacher", batch.teacher_hidden, batch.teacher_head)):
        if h.dim() != 2 or w.dim() != 2 or h.shape[1] != w.shape[1]:
            raise ValueError(f"{name}: {side}_hidden {tuple(h.shape)} and {side}_head {tuple(w.shape)} must be "
                             "[N, H] and [V, H] with the same H")


def teacher_logits(h_t: Tensor, w_t: Tensor) -> Tensor:
    """``h_t·w_tᵀ`` in the head's dtype, without grad (the teacher is frozen)."""
    with torch.no_grad():
        return h_t.to(w_t.dtype) @ w_t.T


def options_dict(options: Any) -> dict[str, Any]:
    from dataclasses import asdict, is_dataclass
    return asdict(options) if is_dataclass(options) else dict(options or {})
