"""The student side of one micro-batch: forward, then the aligner's loss against the teacher rows.

Token counts of a step are all-reduced before its first backward (:mod:`kdcore.training.steps`),
so each micro-batch's sums are scaled by ``world_size / global_count``: with FSDP averaging
gradients over ranks, the step's gradient is exactly that of the token mean over the global
batch, whatever the split into micro-batches and ranks. The loss is
``(1 - kd_ratio) * CE + kd_ratio * KD`` with KD ``Σ_teachers weight · KD_teacher`` (weights as
the recipe gives them, not normalised; one teacher has weight 1).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from kdcore.distill.aligner import AlignedBatch, LossSpec
from kdcore.training.types import PreparedMicroBatch
from kdcore.modeling import student as kstudent
from kdcore.modeling.vision import model_inputs


class DistillForward:
    """Student forward and the registered loss through each teacher's aligner (chunked, no ``[N, V]``).

    One student forward, then one aligner loss per teacher present in the micro-batch, scaled
    ``weight · kd_ratio · world / that teacher's global KD count``; CE is counted once, by the first teacher present (its aligner computes CE over every labelled
    student row, whichever rows it pairs)."""

    def __init__(self, *, student, parts, distill_cfg, loss_fn, loss_options: dict, device, world_size: int):
        self.student = student
        self.parts = {p.name: p for p in parts}  # kdcore.training.teachers.TeacherPart by name
        self.distill_cfg = distill_cfg
        self.loss_fn = loss_fn
        self.loss_options = loss_options
        self.device = device
        self.world_size = world_size
        self._kstudent = kstudent

    def spec(self, kd_count: int, ce_count: int, *, teacher: str, loss_fn=None, options: dict | None = None,
             eval_mode: bool = False, with_ce: bool = True) -> LossSpec:
        """Training: scales that turn this rank's sums into its share of the global token mean
        (``teacher``'s weight and temperature over its global KD count; ``with_ce`` False: CE is
        another teacher's to count). Evaluation: unit scales, only the sums are read."""
        d = self.distill_cfg
        r = d.kd_ratio
        part = self.parts[teacher]
        if eval_mode:
            kd_scale = ce_scale = 1.0
        else:
            kd_scale = part.weight * r * self.world_size / kd_count if kd_count else 0.0
            ce_scale = (1 - r) * self.world_size / ce_count if ce_count and with_ce else 0.0
        return LossSpec(
            fn=loss_fn or self.loss_fn, options=self.loss_options if options is None else options,
            temperature=part.temperature, kd_ratio=r, chunk_size=d.chunk_size, kd_scale=kd_scale, ce_scale=ce_scale,
        )

    def training_specs(self, pmb: PreparedMicroBatch, prepared) -> dict[str, list[LossSpec]]:
        """Per teacher present in the micro-batch, its one training spec (CE counted by the first)."""
        return {n: [self.spec(prepared.kd_by_teacher[n], prepared.ce_global, teacher=n, with_ce=k == 0)]
                for k, n in enumerate(pmb.teachers)}

    def student_head(self) -> torch.Tensor:
        return self._kstudent.student_head_weight(self.student.model)

    def losses_by_teacher(self, pmb: PreparedMicroBatch, teacher_rows: Callable[[str], torch.Tensor],
                          specs: dict[str, list[LossSpec]]) -> tuple[dict[str, list[Any]], torch.Tensor]:
        """One student forward, then per teacher one aligner loss per spec; returns (outputs by
        teacher, hidden states).

        ``teacher_rows(name)`` is called after the student forward, so teachers still computing
        this micro-batch overlap with it."""
        b = pmb.batch
        dev = self.device

        hidden = self._kstudent.student_hidden(self.student.model, b.input_ids.to(dev), b.attention_mask.to(dev),
                                               **model_inputs(b.vision, dev))
        h_s = hidden.reshape(-1, hidden.shape[-1])[b.loss_index.to(dev)]
        w_s = self.student_head()
        labels = b.labels.to(dev)
        shares = pmb.teachers
        outs = {}
        for name, share_specs in specs.items():
            share, part = shares[name], self.parts[name]
            h_t = teacher_rows(name)
            if h_t is None:  # no pair, no request (kd_ratio 0): the aligner sees no teacher row
                h_t = part.head.new_zeros((0, part.head.shape[1]))
            batch = AlignedBatch(
                student_hidden=h_s, student_head=w_s, labels=labels,
                teacher_hidden=h_t.to(dev), teacher_head=part.head,
                student_index=share.student_index.to(dev), teacher_index=share.teacher_index.to(dev),
                extra=share.extra,
            )
            outs[name] = [part.aligner(batch, spec) for spec in share_specs]
        return outs, hidden
