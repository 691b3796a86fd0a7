"""The student side of one micro-batch: forward, then the aligner's loss against the teacher rows.

Token counts of a step are all-reduced before its first backward (:mod:`kdcore.training.steps`),
so each micro-batch's sums are scaled by ``world_size / global_count``: with FSDP averaging
gradients over ranks, the step's gradient is exactly that of the token mean over the global
batch, whatever the split into micro-batches and ranks. The loss is
``(1 - kd_ratio) * CE + kd_ratio * KD``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from kdcore.aligner import AlignedBatch, LossSpec
from kdcore.training.types import PreparedMicroBatch


class DistillForward:
    """Student forward and the registered loss through the aligner (chunked, no ``[N, V]``)."""

    def __init__(self, *, student, aligner, distill_cfg, loss_fn, loss_options: dict, teacher_head: torch.Tensor,
                 device, world_size: int):
        from kdcore import student as kstudent

        self.student = student
        self.aligner = aligner
        self.distill_cfg = distill_cfg
        self.loss_fn = loss_fn
        self.loss_options = loss_options
        self.teacher_head = teacher_head  # [V_t, H_t]; replaced when self-distillation refreshes the teacher
        self.device = device
        self.world_size = world_size
        self._kstudent = kstudent

    def spec(self, kd_global: int, ce_global: int, *, loss_fn=None, options: dict | None = None,
             eval_mode: bool = False) -> LossSpec:
        """Training: scales that turn this rank's sums into its share of the global token mean.
        Evaluation: unit scales, only the sums are read."""
        d = self.distill_cfg
        r = d.kd_ratio
        if eval_mode:
            kd_scale = ce_scale = 1.0
        else:
            kd_scale = r * self.world_size / kd_global if kd_global else 0.0
            ce_scale = (1 - r) * self.world_size / ce_global if ce_global else 0.0
        return LossSpec(
            fn=loss_fn or self.loss_fn, options=self.loss_options if options is None else options,
            temperature=d.temperature, kd_ratio=r, chunk_size=d.chunk_size, kd_scale=kd_scale, ce_scale=ce_scale,
        )

    def student_head(self) -> torch.Tensor:
        return self._kstudent.student_head_weight(self.student.model)

    def losses(self, pmb: PreparedMicroBatch, teacher_rows: Callable[[], torch.Tensor],
               specs: list[LossSpec]) -> tuple[list[Any], torch.Tensor]:
        """One student forward, then one aligner loss per spec; returns (outputs, hidden states).

        ``teacher_rows()`` is called after the student forward, so a teacher still computing
        this micro-batch overlaps with it."""
        b = pmb.batch
        dev = self.device
        hidden = self._kstudent.student_hidden(self.student.model, b.input_ids.to(dev), b.attention_mask.to(dev))
        h_s = hidden.reshape(-1, hidden.shape[-1])[b.loss_index.to(dev)]
        w_s = self.student_head()
        h_t = teacher_rows()
        batch = AlignedBatch(
            student_hidden=h_s, student_head=w_s, labels=b.labels.to(dev),
            teacher_hidden=h_t.to(dev), teacher_head=self.teacher_head,
            student_index=pmb.student_index.to(dev), teacher_index=pmb.teacher_index.to(dev), extra=pmb.extra,
        )
        return [self.aligner(batch, spec) for spec in specs], hidden
