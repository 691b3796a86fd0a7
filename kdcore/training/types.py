"""The data that passes between the parts of a training run (see docs/architecture.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdcore.distill.aligner import Alignment


class TrainingError(RuntimeError):
    """Training stopped; the message says why, at which step, and what was kept."""


@dataclass
class TeacherShare:
    """One teacher's share of a micro-batch: the rows it reads, the aligner's pairs flattened
    over the batch, and its ticket once submitted. ``batch.teacher_input_ids`` are what the
    teacher reads (the student's ``input_ids`` when the batch has none)."""

    batch: Any  # kdcore.data.MicroBatch
    rows: list[int]  # the micro-batch sample of each row of ``batch``
    alignments: list[Alignment]
    teacher_positions: list[list[int]]  # per row of ``batch``; an empty row is not sent
    student_index: torch.Tensor
    teacher_index: torch.Tensor
    extra: dict
    kd_rows: int  # student rows paired with one of this teacher's rows
    ticket: Any = None


@dataclass
class PreparedMicroBatch:
    """One micro-batch ready for the teachers and the student: the student's padded tensors
    and one :class:`TeacherShare` per teacher (one teacher: a dict of one), in the run's
    teacher order, for the teachers that teach at least one of its rows."""

    step: int
    index: int  # within the step
    last: bool  # last micro-batch of the step
    batch: Any  # kdcore.data.MicroBatch
    ce_rows: int  # student rows with a label
    teachers: dict[str, TeacherShare] = field(default_factory=dict)
    submitted: bool = False  # its teacher requests are in flight (released by the schedule)

    @property
    def kd_rows(self) -> int:
        return sum(s.kd_rows for s in self.teachers.values())


@dataclass
class PreparedStep:
    """One optimizer step of this rank, with the step's token counts over every rank."""

    step: int
    micro_batches: list[PreparedMicroBatch]
    data_next: Any  # kdcore.data.DataPosition after this step
    ce_global: int = 0
    kd_by_teacher: dict[str, int] = field(default_factory=dict)  # each teacher's KD rows over every rank


@dataclass
class LatestEval:
    """The latest held-out evaluation: its record, and its ``eval_kd`` (which a resumed run
    restores from the checkpoint before it has evaluated anything)."""

    record: dict | None = None
    loss: float | None = None


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    metrics_file: Path
    export_dir: Path | None
    evals: list[dict] = field(default_factory=list)
