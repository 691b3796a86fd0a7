"""Types every data module shares: the two data errors, :class:`Sample`, config field access."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kdcore.distill.aligner import Tokenized


class DataError(ValueError):
    """A data problem that stops preparation; the message names the file (and row)."""


class BadRow(ValueError):
    """One row that cannot become a sample; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class OverlongRow(ValueError):
    """A sample dropped by the max-length policy."""


@dataclass
class Sample:
    """One training sequence.

    ``teacher`` is None when both sides share a tokenizer: the teacher then receives the
    student's ids. ``source`` is the normalised row (``{"messages": [...], "train": [...]}``,
    or ``{"prompt": ..., "completion": ...}`` / ``{"text": ...}``) so that rollouts can rebuild
    a sample with a new response (see :func:`build_sample`).
    """

    text: str
    student: Tokenized
    teacher: Tokenized | None
    row: int  # row number in the source (0-based)
    source: dict[str, Any] | None = field(default=None, repr=False)
    response_spans: list[tuple[int, int]] = field(default_factory=list)  # trained content, canonical coords
    # several teachers or context distillation (kdcore.data.teacher_views): each named teacher's
    # own tokenization, offsets in this sample's canonical text; empty on the single-teacher path
    teachers: dict[str, Tokenized] = field(default_factory=dict, repr=False)
    route: tuple[str, ...] | None = None  # data.teacher_column: the teachers of this row; None = all
    context: str = ""  # data.teacher_context: what the teachers read before this row ('' when off)

    def __len__(self) -> int:
        return len(self.student.input_ids)


def _cfg(cfg: Any, key: str, default: Any) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)
