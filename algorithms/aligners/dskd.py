"""``dskd``: Dual-Space Knowledge Distillation with cross-tokenizer alignment.

Zhang, Zhang, Xu, Fan 2024, "Dual-Space Knowledge Distillation for Large Language Models"
(EMNLP). Two trainable projectors carry hidden states across the models:

- teacher → student, ``P_t2s: H_t → H_s``: the projected teacher hidden state goes through the
  student's own head (detached), giving a teacher distribution *in the student's vocabulary*
  ``p_t2s = softmax(P_t2s(h_t)·W_sᵀ)``. It is trained with cross-entropy on the student's
  targets, and the student learns from it with the recipe's loss ``D(p_t2s.detach(), q_s)``;
- student → teacher, ``P_s2t: H_s → H_t``: the projected student hidden state goes through the
  teacher's head, ``q_s2t = softmax(P_s2t(h_s)·W_tᵀ)``, and learns ``D(p_t, q_s2t)``; this
  gradient reaches the student through the projector.

KD = CE(p_t2s, y) + D(p_t2s, q_s) + D(p_t, q_s2t), summed over KD rows (``kd_sum``). As in the
paper's code, the student-space term is kept only on rows where the projected teacher predicts
the target (``acc_mask``): a random projector at the start of training would otherwise teach
noise. Which student position meets which teacher position, ``mode``:

- ``eta`` — exact token alignment: the pairs of positions that have read the same text
  (:mod:`.offsets`; the "exact token alignment" of DSKD's follow-up, which pairs tokens whose
  strings match). Only paired teacher positions cross the channel.
- ``cma`` — cross-model attention (the paper's cross-tokenizer method): every student loss
  position attends over every teacher loss position of its sample. Queries are the student's
  embeddings of the input and target tokens, ``P_q([e_s(x); e_s(y)])`` (``P_q: 2H_s → 2H_t``),
  keys the teacher's ``[e_t(x); e_t(y)]``, values ``P_t2s(h_t + e_t(y))`` (each term scaled by
  its standard deviation), ``a = softmax(Q·Kᵀ/√(2H_t))``; the transposed attention carries
  ``P_s2t(h_s)`` to the teacher positions. The student-space terms cover every labelled student
  row, the teacher-space term every teacher row. Token embeddings are read from the output
  heads (``W_s``, ``W_t``; equal to the input embeddings for tied models), so the channel still
  carries only last hidden states, and they are detached: they locate tokens, they are not
  trained by the alignment.

Teacher hidden states (and CMA's keys and target embeddings) are divided by their standard
deviation before projection in both modes, which keeps a freshly initialised projector in range
whatever the teacher's scale. The paper divides by one standard deviation over the batch; here
it is per row, so a sample's loss does not depend on what else is in its micro-batch and
gradient accumulation stays exact.

Projectors are parameters of this module: the core calls :meth:`DSKDAligner.setup` with the two
hidden sizes before it builds the optimizer, trains them at ``lr · lr_scale``, keeps them equal
across ranks and saves them in checkpoints (``state_dict``). ``metrics()`` reports
``align_ratio`` and ``projector_acc``: the fraction of labelled student rows (paired rows in
``eta``) where the argmax of the projected teacher distribution ``p_t2s`` is the student's
target token — the projector's top-1 accuracy in the student's vocabulary, the quantity the
paper's ``acc_mask`` thresholds on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kdcore.distill.aligner import AlignedBatch, Alignment, LossSpec, Tokenized
from kdcore.distill.loss import IGNORE_INDEX, LossOutput, distill_loss
from kdflow_algorithms.aligners.common import PairedAligner, check_hidden, pair_rows
from kdflow_algorithms.checks import check_choice, check_range

MODES = ("eta", "cma")


@dataclass
class DSKDOptions:
    # the paper's cross-tokenizer alignment; "eta" pairs same-text positions only
    mode: str = field(default="cma", metadata={"choices": MODES})
    # Projector lr = student lr x this. 1.0 because 10x (DSKD's 1e-3 projectors against 1e-4
    # students) diverged in a smoke run at student lr 1e-3 while 1.0 fell steadily; raise it
    # for students fine-tuned at small rates (1e-5), whose random projectors would lag.
    projector_lr_scale: float = 1.0
    acc_mask: bool = True  # student-space KD only where the projected teacher is right (paper's code)
    # Hidden sizes, normally given by the core through setup(); > 0 builds the projectors at once.
    student_hidden_size: int = 0
    teacher_hidden_size: int = 0

    def __post_init__(self):
        check_choice("mode", self.mode, MODES)
        check_range("projector_lr_scale", self.projector_lr_scale, low=0.0, low_open=True)
        check_range("student_hidden_size", self.student_hidden_size, low=0)
        check_range("teacher_hidden_size", self.teacher_hidden_size, low=0)


def _std_scale(x: Tensor) -> Tensor:
    """Each row divided by its standard deviation (rows with zero std, e.g. the zero embedding of
    an ignored target, are left as they are)."""
    if x.shape[-1] < 2:
        return x
    s = x.detach().std(dim=-1, keepdim=True)
    return x / torch.where(s > 0, s, torch.ones_like(s))


class DSKDAligner(PairedAligner):
    """Dual-space KD; see the module docstring. Projectors exist after :meth:`setup`."""

    def __init__(self, options: DSKDOptions):
        super().__init__()
        self.mode = options.mode
        self.fetch_all_teacher = options.mode == "cma"
        self.lr_scale = float(options.projector_lr_scale)
        self.acc_mask = bool(options.acc_mask)
        self.t2s: nn.Linear | None = None
        self.s2t: nn.Linear | None = None
        self.query: nn.Linear | None = None
        self._correct = 0
        self._evaluated = 0
        if options.student_hidden_size > 0 and options.teacher_hidden_size > 0:
            self.setup(student_hidden_size=options.student_hidden_size, teacher_hidden_size=options.teacher_hidden_size)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, lr_scale={self.lr_scale}, acc_mask={self.acc_mask}"

    def setup(self, *, student_hidden_size: int, teacher_hidden_size: int) -> None:
        """Create the projectors for these hidden sizes (idempotent for the same sizes)."""
        h_s, h_t = int(student_hidden_size), int(teacher_hidden_size)
        if h_s <= 0 or h_t <= 0:
            raise ValueError(f"dskd: hidden sizes must be positive, got student {h_s}, teacher {h_t}")
        if self.t2s is not None:
            if (self.t2s.out_features, self.t2s.in_features) != (h_s, h_t):
                raise ValueError(f"dskd: projectors were built for student {self.t2s.out_features} / teacher "
                                 f"{self.t2s.in_features} hidden sizes, not {h_s} / {h_t}")
            return
        self.t2s = nn.Linear(h_t, h_s)
        self.s2t = nn.Linear(h_s, h_t)
        if self.mode == "cma":
            self.query = nn.Linear(2 * h_s, 2 * h_t)

    # ------------------------------------------------------------------ alignment data

    def align(self, student: Tokenized, teacher: Tokenized) -> Alignment:
        al = super().align(student, teacher)
        if self.mode == "cma":
            s_ids, t_ids = student.input_ids, teacher.input_ids
            al.extra["student_inputs"] = [int(s_ids[p]) for p in student.loss_positions]
            al.extra["teacher_inputs"] = [int(t_ids[q]) for q in al.teacher_positions]
            al.extra["teacher_targets"] = [int(t_ids[q + 1]) if q + 1 < len(t_ids) else IGNORE_INDEX
                                           for q in al.teacher_positions]
        return al

    def collate(self, extras: list[dict[str, Any]], student_offsets: list[int], teacher_offsets: list[int]) -> dict[str, Any]:
        """CMA: token ids per row (``student_inputs [N_s]``, ``teacher_inputs``/``teacher_targets
        [N_t]``) and the sample of each row (``student_sample``, ``teacher_sample``)."""
        if self.mode != "cma":
            return {}
        out: dict[str, list[int]] = {k: [] for k in ("student_inputs", "teacher_inputs", "teacher_targets",
                                                     "student_sample", "teacher_sample")}
        for i, e in enumerate(extras):
            for k in ("student_inputs", "teacher_inputs", "teacher_targets"):
                out[k].extend(e[k])
            out["student_sample"].extend([i] * len(e["student_inputs"]))
            out["teacher_sample"].extend([i] * len(e["teacher_inputs"]))
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}

    # ------------------------------------------------------------------ the loss

    def _require_setup(self, h_s: int, h_t: int) -> None:
        if self.t2s is None:
            raise RuntimeError("dskd: projectors not built; call aligner.setup(student_hidden_size=..., "
                               "teacher_hidden_size=...) before building the optimizer (the core does this)")
        if (self.t2s.out_features, self.t2s.in_features) != (h_s, h_t):
            raise ValueError(f"dskd: hidden sizes are student {h_s} / teacher {h_t} but the projectors were built for "
                             f"{self.t2s.out_features} / {self.t2s.in_features}")

    def _project_eta(self, batch: AlignedBatch, s_idx: Tensor, t_idx: Tensor):
        dtype = self.t2s.weight.dtype
        h_t = _std_scale(batch.teacher_hidden.detach().to(dtype).index_select(0, t_idx))
        h_t2s = self.t2s(h_t)  # [P, H_s], rows s_idx
        h_s2t = self.s2t(batch.student_hidden.index_select(0, s_idx).to(dtype))  # [P, H_t]
        return h_t2s, s_idx, h_s2t, t_idx

    def _project_cma(self, batch: AlignedBatch):
        ex = batch.extra
        missing = [k for k in ("student_inputs", "teacher_inputs", "teacher_targets", "student_sample", "teacher_sample")
                   if k not in ex]
        if missing:
            raise ValueError(f"dskd (cma): batch.extra lacks {missing}; build batches with this aligner's align/collate")
        dev = batch.student_hidden.device
        n_s, n_t = batch.student_hidden.shape[0], batch.teacher_hidden.shape[0]
        s_in, s_sample = ex["student_inputs"].to(dev), ex["student_sample"].to(dev)
        t_in, t_tgt, t_sample = ex["teacher_inputs"].to(dev), ex["teacher_targets"].to(dev), ex["teacher_sample"].to(dev)
        if s_in.numel() != n_s or t_in.numel() != n_t:
            raise ValueError(f"dskd (cma): extra has {s_in.numel()} student / {t_in.numel()} teacher rows, the batch "
                             f"{n_s} / {n_t}")
        dtype = self.t2s.weight.dtype
        w_s, w_t = batch.student_head.detach(), batch.teacher_head.detach()

        def embed(w: Tensor, ids: Tensor) -> Tensor:
            valid = ids != IGNORE_INDEX
            e = w.index_select(0, ids.clamp_min(0)).to(dtype)
            return e * valid.unsqueeze(1).to(dtype)

        labels = batch.labels.to(dev).long()
        q_in = torch.cat([embed(w_s, s_in), embed(w_s, labels)], dim=-1)  # [N_s, 2H_s]
        t_x, t_y = embed(w_t, t_in), embed(w_t, t_tgt)
        keys = _std_scale(torch.cat([t_x, t_y], dim=-1))  # [N_t, 2H_t]
        values_t = self.t2s(_std_scale(batch.teacher_hidden.detach().to(dtype)) + _std_scale(t_y))  # [N_t, H_s]
        values_s = self.s2t(batch.student_hidden.to(dtype))  # [N_s, H_t]
        queries = self.query(q_in)  # [N_s, 2H_t]
        scale = 1.0 / math.sqrt(keys.shape[1])
        parts_t2s, parts_s2t, rows_s, rows_t = [], [], [], []
        # Attention stays within a sample: one [n_s, n_t] score block per sample, never [N_s, N_t].
        for b in torch.unique(s_sample).tolist():
            rs = (s_sample == b).nonzero().squeeze(1)
            rt = (t_sample == b).nonzero().squeeze(1)
            if rt.numel() == 0:  # a sample without teacher rows has nothing to attend to
                continue
            scores = queries.index_select(0, rs) @ keys.index_select(0, rt).T * scale  # [n_s, n_t]
            parts_t2s.append(torch.softmax(scores, dim=-1) @ values_t.index_select(0, rt))
            parts_s2t.append(torch.softmax(scores.T, dim=-1) @ values_s.index_select(0, rs))
            rows_s.append(rs)
            rows_t.append(rt)
        if not rows_s:
            empty = torch.zeros(0, dtype=torch.long, device=dev)
            return values_t[:0], empty, values_s[:0], empty
        return torch.cat(parts_t2s), torch.cat(rows_s), torch.cat(parts_s2t), torch.cat(rows_t)

    def forward(self, batch: AlignedBatch, loss: LossSpec) -> LossOutput:
        """Dual-space KD; CE on every labelled student row. Shapes as in
        :class:`kdcore.distill.aligner.AlignedBatch`; ``kd_tokens`` is the number of aligned pairs."""
        check_hidden(batch, "dskd")
        s_idx, t_idx = pair_rows(batch, "dskd")
        h_s, w_s = batch.student_hidden, batch.student_head
        w_t = batch.teacher_head
        self._require_setup(h_s.shape[1], batch.teacher_hidden.shape[1])
        if self.mode == "eta":
            h_t2s, rows_s, h_s2t, rows_t = self._project_eta(batch, s_idx, t_idx)
        else:
            h_t2s, rows_s, h_s2t, rows_t = self._project_cma(batch)
        n_s = h_s.shape[0]
        labels = batch.labels.to(h_s.device).long()
        t2s_labels = labels.index_select(0, rows_s)
        w_s_frozen = w_s.detach()
        h_t2s = h_t2s.to(w_s.dtype)

        # Projector top-1 accuracy in the student vocabulary (also the acc_mask).
        correct = torch.zeros(rows_s.numel(), dtype=torch.bool, device=h_s.device)
        with torch.no_grad():
            for start in range(0, rows_s.numel(), loss.chunk_size):
                stop = min(rows_s.numel(), start + loss.chunk_size)
                pred = (h_t2s[start:stop] @ w_s_frozen.T).argmax(dim=-1)
                correct[start:stop] = pred == t2s_labels[start:stop]
        labelled = t2s_labels != IGNORE_INDEX
        self._correct += int((correct & labelled).sum())
        self._evaluated += int(labelled.sum())

        # Student space: CE on all student rows + D(p_t2s, q_s) on rows with a projected teacher.
        kd_rows = labelled & correct if self.acc_mask else labelled
        teacher_rows = h_t2s.detach().new_zeros(n_s, h_t2s.shape[1])
        teacher_rows[rows_s] = h_t2s.detach()
        kd_mask = torch.zeros(n_s, dtype=torch.bool, device=h_s.device)
        kd_mask[rows_s[kd_rows]] = True
        common = dict(temperature=loss.temperature, chunk_size=loss.chunk_size)
        student_space = distill_loss(h_s, w_s, teacher_rows, w_s_frozen, loss_fn=loss.fn, loss_options=loss.options,
                                     labels=labels, kd_mask=kd_mask, kd_scale=loss.kd_scale, ce_scale=loss.ce_scale,
                                     **common)
        # The t2s projector learns to predict the student's targets through the student's head.
        no_teacher_h = h_t2s.new_zeros(h_t2s.shape[0], 0)
        no_teacher_w = w_s_frozen.new_zeros(w_s.shape[0], 0)
        projector_ce = distill_loss(h_t2s, w_s_frozen, no_teacher_h, no_teacher_w, loss_fn=loss.fn,
                                    loss_options=loss.options, labels=t2s_labels,
                                    kd_mask=torch.zeros(h_t2s.shape[0], dtype=torch.bool, device=h_s.device),
                                    kd_scale=0.0, ce_scale=loss.kd_scale, **common)
        # Teacher space: D(p_t, q_s2t), gradient to the student through the s2t projector.
        h_t_rows = batch.teacher_hidden.detach().index_select(0, rows_t.to(batch.teacher_hidden.device)).to(w_t.dtype)
        teacher_space = distill_loss(h_s2t.to(w_t.dtype), w_t.detach(), h_t_rows, w_t.detach(), loss_fn=loss.fn,
                                     loss_options=loss.options, kd_scale=loss.kd_scale, **common)
        self._count(s_idx.numel(), n_s)
        kd_sum = student_space.kd_sum + projector_ce.ce_sum + teacher_space.kd_sum
        return LossOutput(loss=student_space.loss + projector_ce.loss + teacher_space.loss, kd_sum=kd_sum,
                          ce_sum=student_space.ce_sum, kd_tokens=int(s_idx.numel()), ce_tokens=student_space.ce_tokens)

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        if self._evaluated:
            out["projector_acc"] = self._correct / self._evaluated
        self._correct = self._evaluated = 0
        return out


def dskd(*, student_tokenizer: Any, teacher_tokenizer: Any, options: DSKDOptions | None = None,
         cache_dir: Any = None) -> DSKDAligner:
    """DSKD (Zhang et al. 2024): dual-space KD with trainable projectors, ETA or CMA alignment.

    ``cache_dir`` is unused (no vocabulary map). Projectors are built by ``setup``.
    """
    return DSKDAligner(options or DSKDOptions())
