"""The data that passes between the parts of a training run (see docs/architecture.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdcore.aligner import Alignment


class TrainingError(RuntimeError):
    """Training stopped; the message says why, at which step, and what was kept."""


@dataclass
class PreparedMicroBatch:
    """One micro-batch ready for the teacher and the student: padded tensors, the aligner's
    pairs flattened over the batch, and the teacher ticket once submitted."""

    step: int
    index: int  # within the step
    last: bool  # last micro-batch of the step
    batch: Any  # kdcore.data.MicroBatch
    alignments: list[Alignment]
    teacher_positions: list[list[int]]
    student_index: torch.Tensor
    teacher_index: torch.Tensor
    extra: dict
    kd_rows: int  # student rows paired with a teacher row
    ce_rows: int  # student rows with a label
    ticket: Any = None
    # several teachers (kdcore.training.teachers): each teacher's share of this micro-batch, a
    # PreparedMicroBatch of its own (its rows, pairs and ticket; ``batch.teacher_input_ids`` are
    # what it reads), for the teachers that teach at least one of its rows. Empty: this
    # micro-batch is the one teacher's share itself.
    teachers: dict[str, "PreparedMicroBatch"] = field(default_factory=dict)
    submitted: bool = False  # its teacher requests are in flight (released by the schedule)

    def shares(self, default: str) -> dict[str, "PreparedMicroBatch"]:
        """Teacher name → that teacher's share (``default`` names the one teacher's)."""
        return self.teachers or {default: self}


@dataclass
class PreparedStep:
    """One optimizer step of this rank, with the step's token counts over every rank."""

    step: int
    micro_batches: list[PreparedMicroBatch]
    data_next: Any  # kdcore.data.DataPosition after this step
    kd_global: int = 0
    ce_global: int = 0
    kd_by_teacher: dict[str, int] = field(default_factory=dict)  # several teachers: each one's KD rows


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
